"""Write a dataset as MDS shards for data.dataset streaming, validating every image on the way.

  python -m mnv_train.shard SRC DEST [--splits train validation] [--shard-size 64mb]

SRC is an image folder (SPLIT/CLASS/IMAGE, labelled as timm's folder reader labels it), a folder of timm-layout tar
shards (`imagenet-1k-wds`: KEY.jpg + KEY.cls + KEY.json; a tar belongs to the split its file name contains), or
Fashion-MNIST's idx .gz files (train -> train, t10k -> validation). DEST gets one MDS folder per split, holding each
image's encoded bytes as they were (Fashion-MNIST's as lossless PNG) and its label, so training decodes and augments
a sample exactly as it would from the folder; and DEST/manifest.json: the source, the number of classes, and per
split the images written, their bytes, the count per class and the unreadable images, which are listed and not
written (each image is decoded as `check_data` decodes it). Upload DEST as it is (`aws s3 sync DEST s3://...`).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image
from tqdm import tqdm

from . import data
from .check_data import why_unreadable
from .entry import Parser, guarded, make_folder
from .errors import UserError

COLUMNS = {'image': 'bytes', 'label': 'int'}  # what data.StreamedImages reads


def fashion_mnist_samples(root: Path, split: str) -> tuple[int, Iterator[tuple[str, bytes, int]]]:
    """(count, (name, PNG bytes, label)...): PNG keeps the idx pixels exactly, as data.FashionMNIST loads them."""
    source = data.FashionMNIST(str(root), split)

    def samples():
        for index in range(len(source)):
            encoded = io.BytesIO()
            Image.fromarray(source.images[index]).save(encoded, 'PNG')
            yield source.describe(index), encoded.getvalue(), int(source.labels[index])
    return len(source), samples()


def folder_samples(root: Path, split: str) -> tuple[int, Iterator[tuple[str, bytes, int]]]:
    """Through timm's folder reader, as training reads the folder: the same files, the same labels."""
    source = data.TimmImages('folder', str(root), split, training=False)

    def samples():
        for index in range(len(source)):
            encoded, label = source.read_bytes(index)
            yield source.describe(index), encoded, label
    return len(source), samples()


def split_tars(root: Path, split: str) -> list[Path]:
    tars = sorted(p for p in root.glob('*.tar') if split in p.stem)
    if not tars:
        raise UserError(f'no .tar file under {root} has {split!r} in its name: pass --splits with the split names '
                        f'the tar files carry')
    return tars


def tar_samples(root: Path, split: str) -> tuple[Optional[int], Iterator[tuple[str, bytes, int]]]:
    """Samples of timm-layout tars, KEY.jpg (or .png, .jpeg) with KEY.cls; the count is unknown until read."""
    def samples():
        for path in split_tars(root, split):
            members = defaultdict(dict)
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isfile():
                            key, _, suffix = member.name.rpartition('.')
                            members[key][suffix.lower()] = tar.extractfile(member).read()
            except (OSError, tarfile.TarError) as e:
                raise UserError(f'cannot read tar shard {path}: {e}') from None
            for key, parts in members.items():
                image = next((parts[s] for s in ('jpg', 'jpeg', 'png', 'webp') if s in parts), None)
                if image is None or 'cls' not in parts:
                    raise UserError(f'{path}: sample {key} lacks an image or its .cls label ({sorted(parts)})')
                try:
                    label = int(parts['cls'].decode().strip())
                except (UnicodeDecodeError, ValueError):
                    raise UserError(f'{path}: sample {key} has a .cls that is not a whole number: '
                                    f'{parts["cls"][:20]!r}') from None
                yield f'{path.name}:{key}', image, label
    return None, samples()


def open_samples(src: Path, split: str):
    """(kind, count, samples) for one split of SRC, whichever of the three layouts it has."""
    if (src / 'train-images-idx3-ubyte.gz').is_file():
        return 'fashion_mnist', *fashion_mnist_samples(src, 'train' if split == 'train' else 'test')
    if any(src.glob('*.tar')):
        return 'tar', *tar_samples(src, split)
    return 'folder', *folder_samples(src, split)


def write_split(samples, count: Optional[int], out: Path, shard_size: int) -> dict:
    """Writes the readable samples to `out` as MDS; returns the split's part of the manifest."""
    streaming = data.import_streaming()
    per_class, unreadable, total = Counter(), [], 0
    with streaming.MDSWriter(out=str(out), columns=COLUMNS, size_limit=shard_size) as writer:
        for name, encoded, label in tqdm(samples, total=count, desc=out.name, unit='img', file=sys.stderr):
            reason = why_unreadable(io.BytesIO(encoded), name)
            if reason is not None:
                unreadable.append([name, reason])
                continue
            writer.write({'image': encoded, 'label': label})
            per_class[label] += 1
            total += len(encoded)
    for name, reason in unreadable:
        print(f'unreadable, not written: {name}: {reason}', file=sys.stderr)
    return {'images': sum(per_class.values()), 'bytes': total, 'per_class': dict(sorted(per_class.items())),
            'unreadable': unreadable}


def shard_size(text: str) -> int:
    """--shard-size in StreamingDataset's own units, checked here rather than deep inside its writer."""
    data.import_streaming()
    from streaming.base.util import bytes_to_int
    try:
        return bytes_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a size such as 64mb, got {text!r}') from None


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.shard', description=__doc__.split('\n\n')[0])
    p.add_argument('src', type=Path, metavar='SRC', help='image folder, folder of timm-layout .tar shards, or '
                                                         'Fashion-MNIST\'s idx folder')
    p.add_argument('dest', type=Path, metavar='DEST', help='output: one MDS folder per split, and manifest.json')
    p.add_argument('--splits', nargs='+', default=['train', 'validation'], help='splits to write (default: train '
                                                                                'validation)')
    p.add_argument('--shard-size', type=shard_size, default='64mb',
                   help='largest shard, e.g. 64mb (StreamingDataset downloads whole shards)')
    return p


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not args.src.is_dir():
        raise UserError(f'SRC {args.src} is not a folder')
    dest = make_folder(args.dest, 'DEST')
    manifest = {'source': str(args.src.resolve()), 'splits': {}}
    for split in args.splits:
        if (dest / split).exists():
            raise UserError(f'{dest / split} exists already: remove it or choose another DEST')
        kind, count, samples = open_samples(args.src, split)
        manifest['kind'] = kind
        manifest['splits'][split] = write_split(samples, count, dest / split, args.shard_size)
    labels = [label for split in manifest['splits'].values() for label in split['per_class']]
    manifest['num_classes'] = len(data.FASHION_MNIST_CLASSES) if manifest['kind'] == 'fashion_mnist' else (
        max(labels) + 1 if labels else 0)  # folders: timm numbers the class folders 0..n-1; tars: the .cls values
    (dest / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')
    for split, part in manifest['splits'].items():
        print(f'{split}: {part["images"]} images, {part["bytes"] / 1e6:.1f} MB, {len(part["unreadable"])} unreadable '
              f'(listed in {dest / "manifest.json"})')
    return 1 if any(part['unreadable'] for part in manifest['splits'].values()) else 0


if __name__ == '__main__':
    raise SystemExit(main())
