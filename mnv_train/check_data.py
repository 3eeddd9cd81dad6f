"""Decode every image of an image-folder dataset once, so a broken file turns up before a long run rather than in it.

  python -m mnv_train.check_data /data/imagenet [--workers 16] [--output unreadable.txt]

Training decodes each image through `data.open_image`. A file it cannot decode is skipped with a warning and
replaced by the next sample (data.replacing_unreadable), counted in metrics.csv, and the run stops once more than
data.max_bad_fraction of an epoch fails: the file is lost from every epoch, and a badly damaged copy of a dataset
ends a job hours in. The time to learn about such files is before epoch 1 of a 600-epoch job, so this tool runs
the very same `open_image` over every file and lists the ones that fail: a file that passes here decodes in
training.

Which files are checked: exactly those timm's folder reader loads, i.e. every file under DATA_DIR, at any depth,
whose lower-cased suffix is one of timm's image extensions (`get_img_extensions()`: .jpg, .jpeg, .png in timm 1.0).
Walking DATA_DIR recursively covers both DATA_DIR/<split>/<class>/<image> and DATA_DIR/<class>/<image>. Files with
other suffixes are never read by training, so they are not decoded; they are counted on stderr, because an image
saved as .webp or .JPEG2 in a class folder is an image that silently never trains.

The unreadable files go to --output as `PATH<TAB>reason` lines (an empty file when there are none, so no stale list
survives a clean run); that file is never written inside DATA_DIR, which may be read-only or shared. The exit status
is 1 when any file is unreadable, 0 otherwise, 2 for a usage mistake.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .data import open_image
from .entry import Parser, guarded
from .errors import UserError, one_line

try:
    from timm.data.readers.img_extensions import get_img_extensions
    IMAGE_SUFFIXES = frozenset(get_img_extensions(as_set=True))
except ImportError:  # timm before 0.9 had no such module; its folder reader used this fixed list
    IMAGE_SUFFIXES = frozenset({'.png', '.jpg', '.jpeg'})


def find_images(root: Path) -> tuple[list[Path], int]:
    """The files timm's folder reader would load (same walk: recursive, following links), and how many it skips."""
    images, others = [], 0
    for folder, _subdirs, files in os.walk(root, followlinks=True):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                images.append(Path(folder) / name)
            else:
                others += 1
    return sorted(images), others


def decode_error(path: Path) -> Optional[str]:
    """Why the harness cannot decode this file, or None; returns instead of raising, so one bad file stops nothing."""
    return why_unreadable(path, str(path))


def why_unreadable(source, name: str) -> Optional[str]:
    """decode_error for a path or a file object (an image inside a tar or an idx file), named `name`."""
    try:
        open_image(source, name)
    except UserError as e:
        message = one_line(e)
        prefix = f'cannot read image {name}: '
        reason = message[len(prefix):] if message.startswith(prefix) else message
    except Exception as e:  # a decoder crash outside data.UNREADABLE would stop training too: list the file
        reason = f'{type(e).__name__}: {e}'
    else:
        return None
    return ' '.join(reason.split()) or 'unknown error'  # one line per file, tabs only as the separator


def check(images: list[Path], workers: int) -> list[tuple[Path, str]]:
    """(path, reason) for every image that fails to decode, in path order, whatever the number of workers."""
    workers = max(1, workers)
    # Small chunks for small folders keep every worker busy; 64 keeps the per-task overhead low on ImageNet.
    chunksize = max(1, min(64, len(images) // (4 * workers)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = pool.map(decode_error, images, chunksize=chunksize)
        reasons = list(tqdm(results, total=len(images), desc='decoding', unit='img', file=sys.stderr))
    return [(path, reason) for path, reason in zip(images, reasons) if reason is not None]


def output_path(output: Path, data_dir: Path) -> Path:
    """--output, refused when it lies inside DATA_DIR (e.g. the default while the current folder is in it)."""
    resolved, root = output.resolve(), data_dir.resolve()
    if resolved == root or root in resolved.parents:
        raise UserError(f'--output {output} is inside the data folder {data_dir}: pass --output PATH outside it')
    return output


def write_list(output: Path, unreadable: list[tuple[Path, str]]):
    """A folder that is missing or not writable is the user's to fix, so it is one line, not a traceback."""
    try:
        output.write_text(''.join(f'{path}\t{reason}\n' for path, reason in unreadable))
    except OSError as e:
        raise UserError(f'cannot write --output {output}: {e.strerror or e}') from None


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.check_data', description=__doc__.split('\n\n')[0])
    p.add_argument('data_dir', type=Path, metavar='DATA_DIR', help='image folder: SPLIT/CLASS/IMAGE or CLASS/IMAGE')
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='decoding processes (default: all cores)')
    p.add_argument('--output', type=Path, default=Path('unreadable.txt'),
                   help='where to list unreadable files, as PATH<TAB>reason lines (default: ./unreadable.txt)')
    return p


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not args.data_dir.is_dir():
        raise UserError(f'data folder {args.data_dir} does not exist or is not a folder')
    output = output_path(args.output, args.data_dir)
    images, others = find_images(args.data_dir)
    if not images:
        raise UserError(f'no {"/".join(sorted(IMAGE_SUFFIXES))} images under {args.data_dir}: nothing to check')
    if others:
        print(f'note: {others} file(s) under {args.data_dir} have other suffixes; training never reads them',
              file=sys.stderr)
    write_list(output, [])  # fails now, not after hours of decoding, and clears a list left by an earlier run
    start = time.perf_counter()
    unreadable = check(images, args.workers)
    write_list(output, unreadable)
    print(f'checked {len(images)} images in {time.perf_counter() - start:.1f} s: {len(unreadable)} unreadable, '
          f'listed in {output}')
    return 1 if unreadable else 0


if __name__ == '__main__':
    raise SystemExit(main())
