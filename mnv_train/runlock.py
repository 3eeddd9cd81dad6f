"""One writer per run folder: a lock file that works on NFS and Lustre, refreshed by a heartbeat.

flock is unreliable on network file systems, so the lock is a file created with O_CREAT | O_EXCL, which is
atomic on local file systems, NFSv3 and later, and Lustre. It names its holder: host, pid, start time, and a
heartbeat that the holder rewrites while it trains. A lock is stale when its process is gone from this same
host, or when its heartbeat is older than the limit (train.lock_stale_minutes; another host's clock may be a
little off, hence minutes). A stale lock is taken over with a warning: it is first renamed away, which only one
of two jobs racing for it can do, and then created anew.

Only training takes the lock; validate.py, average and export only read a run folder.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError

LOCK_NAME = '.lock'
HEARTBEAT_SECONDS = 30  # the holder rewrites its heartbeat at most this often


@dataclass
class Holder:
    host: str
    pid: int
    started: float  # time.time() when the lock was taken
    heartbeat: float  # time.time() of its latest heartbeat

    def describe(self, now: float) -> str:
        since = time.strftime('%H:%M', time.localtime(self.started))
        return (f'pid {self.pid} on {self.host} since {since} '
                f'(heartbeat {max(0, now - self.heartbeat):.0f} s ago)')


def process_alive(pid: int, since: float) -> bool:
    """Whether pid runs on this host and started no later than `since` (a reused pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    started = process_start_time(pid)
    return started is None or started <= since + 5


def process_start_time(pid: int) -> Optional[float]:
    """Start time of a process in seconds since the epoch, from /proc (Linux); None where that cannot be read."""
    try:
        ticks = int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path('/proc/stat').read_text().splitlines()
                    if line.startswith('btime '))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf('SC_CLK_TCK')


class RunLock:
    """The lock of one run folder, held by this process from acquire() to release()."""

    def __init__(self, run_dir: Path, stale_minutes: float):
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_seconds = 60 * stale_minutes
        self.holder: Optional[Holder] = None
        self.last_beat = 0.0

    def acquire(self, force: bool = False) -> Optional[str]:
        """Take the lock; returns a warning when it took over someone else's. A live holder is a UserError."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = None
        for _ in range(3):  # another job may take a stale lock between our look and our attempt
            now = time.time()
            holder = Holder(socket.gethostname(), os.getpid(), now, now)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                warning = self.take_over(force) or warning
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(json.dumps(asdict(holder)))
                f.flush()
                os.fsync(f.fileno())
            self.holder, self.last_beat = holder, now
            return warning
        raise UserError(f'{self.path.parent}: could not take its lock {self.path} (other jobs keep taking it)')

    def take_over(self, force: bool) -> Optional[str]:
        """Moves a stale (or, with force, any) lock out of the way; a live one raises UserError."""
        now = time.time()
        holder = self.read()
        if holder is None and not force and self.age(now) < HEARTBEAT_SECONDS:
            raise UserError(f'{self.path.parent} is being locked by another job right now ({self.path})')
        if holder is not None and not force and not self.stale(holder, now):
            raise UserError(f'{self.path.parent} is in use by {holder.describe(now)}: wait for that job, or pass '
                            f'--force-unlock if it is gone')
        moved = self.path.with_name(f'{LOCK_NAME}.taken-{os.getpid()}-{now:.0f}')
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return None  # someone else moved it first; try again
        moved.unlink(missing_ok=True)
        who = holder.describe(now) if holder is not None else 'an unreadable lock'
        reason = 'forced' if force else 'stale'
        return f'took over the {reason} lock of {self.path.parent}, held by {who}'

    def read(self) -> Optional[Holder]:
        try:
            return Holder(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def age(self, now: float) -> float:
        """Seconds since the lock file was written (a lock just created may not hold its holder yet)."""
        try:
            return now - self.path.stat().st_mtime
        except FileNotFoundError:
            return float('inf')

    def stale(self, holder: Holder, now: float) -> bool:
        if holder.host == socket.gethostname() and not process_alive(holder.pid, holder.started):
            return True
        return now - holder.heartbeat > self.stale_seconds

    def heartbeat(self):
        """Rewrites the heartbeat, at most every HEARTBEAT_SECONDS (cheap to call at every step). A lock taken over
        meanwhile (--force-unlock, or a heartbeat left too old) is a UserError: two jobs must not write one folder."""
        now = time.time()
        if self.holder is None or now - self.last_beat < HEARTBEAT_SECONDS:
            return
        current = self.read()
        if current is None:
            return  # unreadable for now (a network file system's hiccup): beat next time
        if not self.holds(current):
            self.holder = None  # not ours any more: never write into another job's lock or folder
            raise UserError(f'{self.path.parent}: this job lost its lock, now held by {current.describe(now)} '
                            f'(--force-unlock?); stopping without saving so that the folder keeps one writer')
        self.holder.heartbeat, self.last_beat = now, now
        tmp = self.path.with_name(f'{LOCK_NAME}.beat-{os.getpid()}')
        tmp.write_text(json.dumps(asdict(self.holder)))
        os.replace(tmp, self.path)

    def release(self):
        """Removes the lock if it is still ours (a --force-unlock may have taken it)."""
        if self.holder is not None:
            current = self.read()
            if current is not None and self.holds(current):
                self.path.unlink(missing_ok=True)
            self.holder = None

    def holds(self, current: Holder) -> bool:
        """Whether the lock file's holder is this job."""
        return (current.host, current.pid) == (self.holder.host, self.holder.pid)
