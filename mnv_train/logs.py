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


class MetricsLog:
    """metrics.csv rewritten from the run's history (so a resumed run never shows stale rows) + TensorBoard.

    The event file is opened at the first scalar, so a tool that builds a run and logs nothing leaves no
    tensorboard/ folder. A run that goes back to an earlier step (resume, roll-back) calls restart_at: the next
    event file then tells TensorBoard to drop the events the earlier files hold from that step on.
    """

    def __init__(self, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer: Optional[SummaryWriter] = None
        self.purge_step: Optional[int] = None

    def restart_at(self, step: int):
        self.close()
        self.purge_step = step

    def scalars(self, step: int, values: dict):
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = SummaryWriter(str(self.run_dir / 'tensorboard'), purge_step=self.purge_step)
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def write_history(self, history: list[dict]):
        if not self.enabled or not history:
            return
        columns = list(dict.fromkeys(key for row in history for key in row))
        path = self.run_dir / 'metrics.csv'
        tmp = path.with_name('.metrics.csv.tmp')
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)
        tmp.replace(path)
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
