"""Write a dataset as MDS shards for data.dataset streaming, validating every image on the way.

  python -m mnv_train.shard SRC DEST [--splits train validation] [--shard-size 64mb] [--order shuffled|source]
                            [--seed 0]

SRC is an image folder (SPLIT/CLASS/IMAGE, labelled as timm's folder reader labels it), a folder of timm-layout tar
shards (`imagenet-1k-wds`: KEY.jpg + KEY.cls + KEY.json; a tar belongs to the split its file name contains), or
Fashion-MNIST's idx .gz files (train -> train, t10k -> validation). DEST gets one MDS folder per split, holding each
image's encoded bytes as they were (Fashion-MNIST's as lossless PNG) and its label, so training decodes and augments
a sample exactly as it would from the folder. The samples are written in a random order drawn from --seed (the same
seed, the same shards), not the source's, which lists a folder class by class (--order source keeps it); and
DEST/manifest.json: the source, the order and seed, the number of classes, and per split the images written, their
bytes, the count per class and the unreadable images, which are listed and not written (each image is decoded as
`check_data` decodes it). Upload DEST as it is (`aws s3 sync DEST s3://...`).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import data
from .check_data import why_unreadable
from .entry import Parser, guarded, make_folder
from .errors import UserError

COLUMNS = {'image': 'bytes', 'label': 'int'}  # what data.StreamedImages reads


Sample = tuple[str, bytes, int]  # name, encoded image, label
Reader = Callable[[int], Sample]  # reads sample i of a split, in the source's own order


def fashion_mnist_samples(root: Path, split: str) -> tuple[int, Reader]:
    """PNG keeps the idx pixels exactly, as data.FashionMNIST loads them."""
    source = data.FashionMNIST(str(root), split)

    def read(index: int) -> Sample:
        encoded = io.BytesIO()
        Image.fromarray(source.images[index]).save(encoded, 'PNG')
        return source.describe(index), encoded.getvalue(), int(source.labels[index])
    return len(source), read


def folder_samples(root: Path, split: str) -> tuple[int, Reader]:
    """Through timm's folder reader, as training reads the folder: the same files, the same labels."""
    source = data.TimmImages('folder', str(root), split, training=False)

    def read(index: int) -> Sample:
        encoded, label = source.read_bytes(index)
        return source.describe(index), encoded, label
    return len(source), read


def split_tars(root: Path, split: str) -> list[Path]:
    tars = sorted(p for p in root.glob('*.tar') if split in p.stem)
    if not tars:
        raise UserError(f'no .tar file under {root} has {split!r} in its name: pass --splits with the split names '
                        f'the tar files carry')
    return tars


class TarSample(NamedTuple):
    """Where one image lies in its tar, so that the samples can be read in any order without holding them."""
    tar: Path
    key: str
    offset: int
    size: int
    label: int


def index_tar(path: Path) -> list[TarSample]:
    """The samples of a timm-layout tar, KEY.jpg (or .png, .jpeg) with KEY.cls, validated; only the .cls are read."""
    members = defaultdict(dict)
    try:
        with tarfile.open(path, 'r:') as tar:  # uncompressed: the offsets are then the file's
            for member in tar:
                if member.isfile():
                    key, _, suffix = member.name.rpartition('.')
                    suffix = suffix.lower()
                    members[key][suffix] = tar.extractfile(member).read() if suffix == 'cls' else member
    except (OSError, tarfile.TarError) as e:
        raise UserError(f'cannot read tar shard {path} (an uncompressed tar): {e}') from None
    samples = []
    for key, parts in members.items():
        image = next((parts[s] for s in ('jpg', 'jpeg', 'png', 'webp') if s in parts), None)
        if image is None or 'cls' not in parts:
            raise UserError(f'{path}: sample {key} lacks an image or its .cls label ({sorted(parts)})')
        try:
            label = int(parts['cls'].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise UserError(f'{path}: sample {key} has a .cls that is not a whole number: '
                            f'{parts["cls"][:20]!r}') from None
        samples.append(TarSample(path, key, image.offset_data, image.size, label))
    return samples


def tar_samples(root: Path, split: str) -> tuple[int, Reader]:
    """The split's tars are indexed first (headers and labels), then each image is read from its offset."""
    with tqdm(split_tars(root, split), desc=f'{split}: indexing', unit='tar', file=sys.stderr) as tars:
        index = [sample for path in tars for sample in index_tar(path)]  # closed on an error: its line ends

    def read(i: int) -> Sample:
        sample = index[i]
        try:
            with open(sample.tar, 'rb') as f:
                f.seek(sample.offset)
                return f'{sample.tar.name}:{sample.key}', f.read(sample.size), sample.label
        except OSError as e:
            raise UserError(f'cannot read tar shard {sample.tar}: {e}') from None
    return len(index), read


def open_samples(src: Path, split: str) -> tuple[str, int, Reader]:
    """(kind, count, reader) for one split of SRC, whichever of the three layouts it has."""
    if (src / 'train-images-idx3-ubyte.gz').is_file():
        return 'fashion_mnist', *fashion_mnist_samples(src, 'train' if split == 'train' else 'test')
    if any(src.glob('*.tar')):
        return 'tar', *tar_samples(src, split)
    return 'folder', *folder_samples(src, split)


def write_order(count: int, order: str, seed: int) -> list[int]:
    """The source's indices in the order they are written. A folder (and Fashion-MNIST) lists its samples class by
    class, and StreamingDataset reads a shard's samples close together (data.stream_order shards), so shards in the
    source's order would give each step few classes: Mosaic's own advice is to shuffle when writing."""
    return np.random.default_rng(seed).permutation(count).tolist() if order == 'shuffled' else list(range(count))


def write_split(read: Reader, indices: list[int], out: Path, shard_size: int) -> dict:
    """Writes the readable samples to `out` as MDS, in the order of `indices`; returns the split's part of the
    manifest."""
    streaming = data.import_streaming()
    per_class, unreadable, total = Counter(), [], 0
    with streaming.MDSWriter(out=str(out), columns=COLUMNS, size_limit=shard_size) as writer:
        for index in tqdm(indices, desc=out.name, unit='img', file=sys.stderr):
            name, encoded, label = read(index)
            reason = why_unreadable(io.BytesIO(encoded), name)
            if reason is not None:
                unreadable.append([name, reason])
                continue
            writer.write({'image': encoded, 'label': label})
            per_class[label] += 1
            total += len(encoded)
    unreadable.sort()  # listed by name, whatever the order written
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


def seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f'expected a whole number 0 or more, got {text!r}')
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.shard', description=__doc__.split('\n\n')[0])
    p.add_argument('src', type=Path, metavar='SRC', help='image folder, folder of timm-layout .tar shards, or '
                                                         'Fashion-MNIST\'s idx folder')
    p.add_argument('dest', type=Path, metavar='DEST', help='output: one MDS folder per split, and manifest.json')
    p.add_argument('--splits', nargs='+', default=['train', 'validation'], help='splits to write (default: train '
                                                                                'validation)')
    p.add_argument('--shard-size', type=shard_size, default='64mb',
                   help='largest shard, e.g. 64mb (StreamingDataset downloads whole shards)')
    p.add_argument('--order', choices=['shuffled', 'source'], default='shuffled',
                   help='order of the samples in the shards: shuffled (default; a folder lists them class by class) '
                        'or source (the folder\'s, the tars\')')
    p.add_argument('--seed', type=seed, default=0, help='--order shuffled: the same seed writes the same shards')
    return p


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not args.src.is_dir():
        raise UserError(f'SRC {args.src} is not a folder')
    dest = make_folder(args.dest, 'DEST')
    manifest = {'source': str(args.src.resolve()), 'order': args.order,
                'seed': args.seed if args.order == 'shuffled' else None, 'splits': {}}
    for split in args.splits:
        if (dest / split).exists():
            raise UserError(f'{dest / split} exists already: remove it or choose another DEST')
        kind, count, read = open_samples(args.src, split)
        manifest['kind'] = kind
        manifest['splits'][split] = write_split(read, write_order(count, args.order, args.seed), dest / split,
                                                args.shard_size)
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
