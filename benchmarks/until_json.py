"""Run a command until it has written its JSON result, then end it, for benchmarks/gpu_check.sh's bench steps.

  python benchmarks/until_json.py FILE [--grace S] -- COMMAND...

A compiled `python -m mnv_train.bench` printed its figures and wrote its JSON, then did not exit: torch.compile's
worker processes lingered (one H200, torch 2.11, 2026-12-04), and the check's step ran into its timeout with its
result complete. So the command runs in a process group of its own; once FILE holds JSON written since the start, the
command has --grace seconds to exit by itself, then its group is stopped (SIGTERM, then SIGKILL) and the exit status
is 0, as the result is whole. A command that exits by itself keeps its own status. Whatever is left of its group at
the end, a leftover worker holding GPU memory for the next step, is killed and waited for, and so is the group when
this script is stopped from outside (timeout's SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

POLL_S = 0.5  # how often FILE is looked at while the command runs
TERM_S = 5.0  # from SIGTERM to SIGKILL
GONE_S = 10.0  # how long a killed group's processes may take to end


def written(path: Path, since: float) -> bool:
    """Whether `path` holds whole JSON written after `since` (a file left by an earlier run does not count)."""
    try:
        if path.stat().st_mtime < since:
            return False
        json.loads(path.read_text())
    except (OSError, ValueError):  # not there yet, or half written
        return False
    return True


def kill_group(group: int, sig: int):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:  # nothing of it is left
        pass


def living_members(group: int) -> list[int]:
    """The processes of `group` not yet ended (a zombie has ended: it holds no memory, only its exit status)."""
    members = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            state, _, pgrp = stat.read_text().rsplit(')', 1)[1].split()[:3]
        except (OSError, IndexError):  # ended while we looked
            continue
        if int(pgrp) == group and state not in ('Z', 'X'):
            members.append(int(stat.parent.name))
    return members


def kill_and_wait(group: int):
    """SIGKILL the group and wait until its processes have ended: a signal is only delivered, not yet acted upon, when
    killpg returns, and the next step wants the GPU memory they hold."""
    kill_group(group, signal.SIGKILL)
    deadline = time.monotonic() + GONE_S
    while (left := living_members(group)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        print(f'until_json: processes {left} of the command still run {GONE_S:g} s after SIGKILL', file=sys.stderr,
              flush=True)


def stop(process: subprocess.Popen):
    kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=TERM_S)
    except subprocess.TimeoutExpired:
        pass  # the SIGKILL that always follows ends it


def run(path: Path, grace: float, command: list[str]) -> int:
    since = time.time() - 1  # file times may be coarser than the clock
    process = subprocess.Popen(command, start_new_session=True)
    try:
        while True:
            try:
                return process.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if written(path, since):
                try:
                    return process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    print(f'until_json: {path} is written and the command still ran {grace:g} s later: stopped it',
                          file=sys.stderr, flush=True)
                    stop(process)
                    return 0
    finally:
        kill_and_wait(process.pid)
        process.wait()


def terminated(signum, frame):
    """SIGTERM from outside: leave through run's finally, which kills the command's group."""
    raise SystemExit(128 + signum)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python benchmarks/until_json.py', usage='%(prog)s FILE [--grace S] -- COMMAND...',
                                description=__doc__.split('\n\n')[0])
    p.add_argument('json', type=Path, help='the JSON file the command writes last')
    p.add_argument('--grace', type=float, default=10.0, help='seconds the command may still run once it is written')
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index('--') if '--' in argv else len(argv)
    args, command = parser().parse_args(argv[:cut]), argv[cut + 1:]
    if not command:
        parser().error('no command given after --')
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        return run(args.json, args.grace, command)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == '__main__':
    raise SystemExit(main())
