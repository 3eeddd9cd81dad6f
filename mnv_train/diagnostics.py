"""Making silent training failures visible. (Placeholder: filled in by the diagnostics issue.)"""
from __future__ import annotations


def epoch_summary(run, row: dict) -> str:
    """The one-line summary printed after each epoch."""
    parts = [f'epoch {row["epoch"] + 1}/{run.epochs}', f'step {row["step"]}', f'loss {row["train_loss"]:.4f}']
    for key in sorted(k for k in row if 'top1' in k):
        parts.append(f'{key} {row[key]:.2f}')
    return '  '.join(parts)


def epoch_warnings(run) -> list[str]:
    """Warnings about the run so far (called after each epoch, on every rank; printed by rank 0)."""
    return []


def dry_run(run) -> str:
    """The --dry-run report."""
    return ''
