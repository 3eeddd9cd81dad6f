"""Console messages, per-epoch metrics (CSV) and TensorBoard scalars; all of it from rank 0 only."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Optional

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

_quiet = False
_main = True


def configure(is_main: bool, quiet: bool):
    global _quiet, _main
    _main, _quiet = is_main, quiet


def info(message: str):
    if _main and not _quiet:
        print(message, flush=True)


def summary(message: str):
    """Shown even with --quiet: epoch summaries and the end of the run."""
    if _main:
        print(message, flush=True)


def warn(message: str):
    if _main:
        print(f'warning: {message}', file=sys.stderr, flush=True)


def warn_every_rank(message: str):
    """For what only one rank sees (an unreadable image in its shard), from any rank or loader worker."""
    print(f'warning: {message}', file=sys.stderr, flush=True)


def progress(total: int, initial: int, description: str):
    """A tqdm bar on rank 0 in interactive use; None when quiet, on other ranks, or without a terminal."""
    if not _main or _quiet or not sys.stderr.isatty():
        return None
    return tqdm(total=total, initial=initial, desc=description, leave=False, dynamic_ncols=True)


STEP_COLUMNS = ('step', 'epoch', 'lr', 'train_loss', 'img_per_s', 'data_wait', 'grad_norm', 'loss_scale')


class MetricsLog:
    """The run's one metrics log: metrics.csv (one row per epoch), steps.csv (one row per log point), TensorBoard,
    and the experiment trackers (W&B, MLflow) when the recipe names some; all of it from rank 0 only.

    metrics.csv is rewritten from the run's history, so a resumed run never shows stale rows. The event file is
    opened at the first scalar, so a tool that builds a run and logs nothing leaves no tensorboard/ folder. A run
    that goes back to an earlier step (resume, roll-back) calls restart_at: steps.csv drops its later rows, and the
    next event file tells TensorBoard to drop the later events of the earlier files.
    """

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer: Optional[SummaryWriter] = None
        self.purge_step: Optional[int] = None
        self.trackers = None  # tracking.Trackers, set once the run knows whether it resumes

    def restart_at(self, step: int):
        self.close()
        self.purge_step = step + 1  # TensorBoard hides events at purge_step and after: the checkpoint step stays
        path = self.run_dir / 'steps.csv'
        if self.enabled and path.is_file():
            with open(path, newline='') as f:
                kept = [row for row in csv.DictReader(f) if int(row['step']) <= step]
            self._write_csv(path, STEP_COLUMNS, kept)

    def scalars(self, step: int, values: dict):
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = SummaryWriter(str(self.run_dir / 'tensorboard'), purge_step=self.purge_step)
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)
        if self.trackers is not None:
            self.trackers.log(step, values)

    def step_row(self, row: dict):
        """One log point's row of steps.csv (STEP_COLUMNS), appended."""
        if not self.enabled:
            return
        path = self.run_dir / 'steps.csv'
        new = not path.is_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'a', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=STEP_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({key: row.get(key) for key in STEP_COLUMNS})

    def write_history(self, history: list[dict]):
        if not self.enabled or not history:
            return
        self._write_csv(self.run_dir / 'metrics.csv', list(dict.fromkeys(key for row in history for key in row)),
                        history)
        if self.writer is not None:
            self.writer.flush()

    @staticmethod
    def _write_csv(path: Path, columns, rows: list[dict]):
        tmp = path.with_name(f'.{path.name}.tmp')
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)

    def tracker_ids(self) -> dict:
        return self.trackers.ids() if self.trackers is not None else {}

    def finish_trackers(self, files: list[Path]):
        if self.trackers is not None:
            self.trackers.finish(files)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
