"""Shrink an image-folder dataset once, so small-resolution recipes stop paying to decode full-size JPEGs.

  python -m mnv_train.preresize /data/imagenet /data/imagenet-s256 --shorter-side 256

Every image under SOURCE is written under TARGET at the same relative path, as a JPEG whose shorter side is
--shorter-side (never enlarged). Decode cost grows with pixel count, so a 224 px recipe reading 256 px files
decodes ~4x fewer pixels than from ImageNet's ~400x350 originals. Already converted files are skipped, so an
interrupted run can be restarted.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

from PIL import Image

from .entry import Parser, guarded, make_folder
from .errors import UserError

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif'}


def shrink(source: Path, target: Path, shorter_side: int, quality: int) -> Optional[str]:
    """Writes one image atomically; returns an error line instead of raising, so one bad file stops nothing."""
    try:
        with Image.open(source) as image:
            image = image.convert('RGB')
            scale = shorter_side / min(image.size)
            if scale < 1:
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.BICUBIC, reducing_gap=3.0)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f'.{target.name}.tmp-{os.getpid()}')
            image.save(tmp, 'JPEG', quality=quality)
            os.replace(tmp, target)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f'{source}: {e}'
    return None


def plan(source_root: Path, target_root: Path) -> list[tuple[Path, Path]]:
    """(source, target) pairs still to convert."""
    jobs = []
    for source in sorted(p for p in source_root.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES):
        target = (target_root / source.relative_to(source_root)).with_suffix('.jpg')
        if not (target.exists() and target.stat().st_mtime >= source.stat().st_mtime):
            jobs.append((source, target))
    return jobs


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.preresize', description=__doc__.split('\n\n')[0])
    p.add_argument('source', type=Path)
    p.add_argument('target', type=Path)
    p.add_argument('--shorter-side', type=int, required=True, help='e.g. 1.15 x the train size: 256 for 224')
    p.add_argument('--quality', type=int, default=90)
    p.add_argument('--workers', type=int, default=os.cpu_count())
    return p


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not args.source.is_dir():
        raise UserError(f'{args.source} is not a folder')
    if args.target.resolve() == args.source.resolve():
        raise UserError('the target folder must differ from the source: originals are never overwritten')
    make_folder(args.target, 'the target folder')
    jobs = plan(args.source, args.target)
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        errors = [e for e in pool.map(shrink, *zip(*jobs), [args.shorter_side] * len(jobs),
                                      [args.quality] * len(jobs), chunksize=64) if e] if jobs else []
    for line in errors:
        print(f'skipped {line}')
    print(f'{len(jobs) - len(errors)} written, {len(errors)} unreadable, to {args.target}')
    return 1 if errors else 0


if __name__ == '__main__':
    raise SystemExit(main())
