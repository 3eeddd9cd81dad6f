"""How every command-line entry point runs, and the recipe arguments they share.

A UserError prints one line and exits 2; Ctrl-C exits 130 without a traceback; the process group is shut
down on the way out. Every tool takes --set KEY=VALUE and --data-dir the same way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import distributed
from .errors import UserError, one_line


def guarded(main):
    """Run a CLI entry point: a UserError prints one line and exits 2; Ctrl-C exits 130 without a traceback."""
    def wrapper(argv: Optional[list[str]] = None) -> int:
        try:
            return main(argv) or 0
        except UserError as e:
            print(f'error: {one_line(e)}', file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr)
            return 130
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
