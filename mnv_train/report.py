"""End-of-run report. (Placeholder: filled in by the diagnostics issue.)"""
from __future__ import annotations

from pathlib import Path


def write_report(run_dir: Path):
    """report.md and PNG plots from the run folder's metrics."""
