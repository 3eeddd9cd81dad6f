"""How every command-line entry point runs, and the recipe arguments they share.

A UserError prints one line and exits 2; Ctrl-C exits 130 without a traceback; the process group is shut
down on the way out. Every tool takes --set KEY=VALUE and --data-dir the same way.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from . import distributed
from .errors import UserError, one_line


class Parser(argparse.ArgumentParser):
    """argparse whose complaints (an unknown flag, --global-batch ten) are one-line UserErrors, as everything
    else the user gets wrong, instead of a usage block."""

    def error(self, message: str):
        raise UserError(f'{self.prog}: {message}')


def at_least(least: int):
    """An argparse type: a whole number of at least `least`. A batch of 0 or a negative count would otherwise fail
    deep inside torch with a traceback, or be taken for "not given"."""
    def whole_number(text: str) -> int:
        value = int(text)  # argparse turns a ValueError into "invalid whole_number value: 'x'"
        if value < least:
            raise argparse.ArgumentTypeError(f'{value} is below {least}')
        return value
    return whole_number


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1], as a crop fraction."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f'{value:g} is not in (0, 1]')
    return value


def make_folder(path: Path, what: str) -> Path:
    """path as a folder that exists, made if needed; one that cannot be made is a UserError naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create {what} {path}: {e.strerror or e}') from None
    if not os.access(path, os.W_OK | os.X_OK):  # a folder without x cannot be written into either
        raise UserError(f'cannot write into {what} {path}: permission denied')
    return path


def check_creatable(path: Path, what: str) -> Path:
    """A UserError now, naming path, if the folder could not be made later (its nearest existing ancestor is a
    file, or is not writable); nothing is created."""
    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise UserError(f'cannot create {what} {path}: {existing} is a file')
    if not os.access(existing, os.W_OK):
        raise UserError(f'cannot create {what} {path}: {existing} is not writable')
    return path


def guarded(main):
    """Run a CLI entry point: a UserError prints one line and exits 2; Ctrl-C exits 130 and a closed output pipe
    1, without a traceback."""
    def wrapper(argv: Optional[list[str]] = None) -> int:
        try:
            return main(argv) or 0
        except UserError as e:
            print(f'error: {one_line(e)}', file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Python's docs advise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            return 1
        finally:
            distributed.shutdown()
    wrapper.__doc__ = main.__doc__
    return wrapper


def add_recipe_arguments(parser: argparse.ArgumentParser):
    """--set and --data-dir, as every tool that reads a recipe takes them."""
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a recipe value, e.g. --set optim.lr=0.002 (repeatable; values are YAML)')
    parser.add_argument('--data-dir', help='dataset location (same as --set data.data_dir=...)')


def recipe_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides with --data-dir folded in, in the order they apply."""
    return list(args.overrides) + ([f'data.data_dir={args.data_dir}'] if args.data_dir else [])
