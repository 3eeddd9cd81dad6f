"""Builds an ImageNet-shaped JPEG folder (train/ and validation/, class folders, ~500x375 q90 files) from a few
photos, for measuring decode + augmentation speed where no real dataset can be downloaded.

  python benchmarks/make_images.py OUT_DIR PHOTO [PHOTO ...] [--train 2000 --val 200 --classes 10 --jobs 1]

Each file is a random crop of one of the photos, rescaled to ImageNet's typical 500x375 (or 375x500), with a
colour shift, saved at quality 90: the JPEG decoder sees natural-image statistics at a realistic size.
With --jobs N, N processes each make a contiguous share of the files, each share from its own seed, so the
folder differs from the --jobs 1 one (which stays what earlier results were measured on).
"""
import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def make_range(out: Path, sources: list, split: str, indices: range, classes: int, rng: np.random.Generator):
    for i in indices:
        source = sources[i % len(sources)]
        w, h = source.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        image = source.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
        folder = out / split / f'class{i % classes:03d}'
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f'{i:06d}.jpg', quality=90)


def make(out: Path, photos: list[Path], train: int, val: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert('RGB') for p in photos]
    for split, count in (('train', train), ('validation', val)):
        make_range(out, sources, split, range(count), classes, rng)


def make_share(out: Path, photos: list[Path], split: str, start: int, stop: int, classes: int, seed: int):
    sources = [Image.open(p).convert('RGB') for p in photos]
    make_range(out, sources, split, range(start, stop), classes, np.random.default_rng([seed, start]))


def make_parallel(out: Path, photos: list[Path], train: int, val: int, classes: int, jobs: int, seed: int = 0):
    with ProcessPoolExecutor(jobs) as pool:
        futures = []
        for split, count in (('train', train), ('validation', val)):
            share = -(-count // jobs)
            for start in range(0, count, share):
                futures.append(pool.submit(make_share, out, photos, split, start, min(count, start + share),
                                           classes, seed))
        for future in futures:
            future.result()


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', type=Path)
    p.add_argument('photos', type=Path, nargs='+')
    p.add_argument('--train', type=int, default=2000)
    p.add_argument('--val', type=int, default=200)
    p.add_argument('--classes', type=int, default=10)
    p.add_argument('--jobs', type=int, default=1, help='processes (the files then differ from a --jobs 1 run)')
    args = p.parse_args()
    if args.jobs > 1:
        make_parallel(args.out, args.photos, args.train, args.val, args.classes, args.jobs)
    else:
        make(args.out, args.photos, args.train, args.val, args.classes)
