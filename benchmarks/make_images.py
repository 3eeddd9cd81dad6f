"""Builds an ImageNet-shaped JPEG folder (train/ and validation/, class folders, ~500x375 q90 files) from a few
photos, for measuring decode + augmentation speed where no real dataset can be downloaded.

  python benchmarks/make_images.py OUT_DIR PHOTO [PHOTO ...] [--train 2000 --val 200 --classes 10]

Each file is a random crop of one of the photos, rescaled to ImageNet's typical 500x375 (or 375x500), with a
colour shift, saved at quality 90: the JPEG decoder sees natural-image statistics at a realistic size.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance


def make(out: Path, photos: list[Path], train: int, val: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert('RGB') for p in photos]
    for split, count in (('train', train), ('validation', val)):
        for i in range(count):
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


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out', type=Path)
    p.add_argument('photos', type=Path, nargs='+')
    p.add_argument('--train', type=int, default=2000)
    p.add_argument('--val', type=int, default=200)
    p.add_argument('--classes', type=int, default=10)
    args = p.parse_args()
    make(args.out, args.photos, args.train, args.val, args.classes)
