"""Datasets, transforms, a seekable sampler and the device-side end of the input pipeline.

Every random draw of the input pipeline is seeded from (seed, epoch, position), never from state left over
by earlier batches: a run resumed mid-epoch sees exactly the samples and augmentations it would have seen,
with any number of loader workers.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import itertools
import json
import math
import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_dataset, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import fast_collate
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torch.utils.data._utils import signal_handling
from torchvision import transforms

from . import augment, logs
from .distributed import World
from .entry import make_folder
from .errors import UserError
from .recipe import AugConfig, DataConfig, TrainSizeRampConfig

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


# ---------------------------------------------------------------------------------------------- seeds

def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, so neighbouring (epoch, position) pairs are unrelated."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def sample_seed(seed: int, epoch: int, place: int) -> int:
    """The seed of every augmentation draw for the sample at `place` of `epoch`'s order, on either pipeline."""
    return derive_seed(seed, epoch, place)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # not torch.manual_seed: before CUDA is initialised it queues a callback with a stack trace on every call
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


# ---------------------------------------------------------------------------------------------- sources

class FashionMNIST:
    """Fashion-MNIST from its original idx .gz files (Debian: dataset-fashion-mnist)."""
    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: Optional[str], split: str):
        root_dir = Path(root or FASHION_MNIST_DIR)
        prefix = 'train' if split == 'train' else 't10k'
        images, labels = root_dir / f'{prefix}-images-idx3-ubyte.gz', root_dir / f'{prefix}-labels-idx1-ubyte.gz'
        for path in (images, labels):
            if not path.is_file():
                raise UserError(f'Fashion-MNIST file {path} not found: install Debian\'s dataset-fashion-mnist '
                                f'(apt-get install dataset-fashion-mnist) or pass --data-dir')
        self.images = self._read(images, magic=2051)
        self.labels = self._read(labels, magic=2049).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise UserError(f'{images} and {labels} hold different numbers of samples')

    @staticmethod
    def _read(path: Path, magic: int) -> np.ndarray:
        try:
            with gzip.open(path, 'rb') as f:
                raw = f.read()
            found, count = struct.unpack('>II', raw[:8])
            if found != magic:
                raise ValueError(f'magic number {found}, expected {magic}')
            dims = struct.unpack(f'>{"I" * (magic - 2049)}', raw[8:8 + 4 * (magic - 2049)])
            offset = 8 + 4 * len(dims)
            return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(count, *dims)
        except (OSError, ValueError, struct.error, EOFError) as e:
            raise UserError(f'{path}: not a readable idx file ({e})') from None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self):
        return len(self.labels)

    def load(self, index: int):
        return Image.fromarray(self.images[index]).convert('RGB'), int(self.labels[index])

    def describe(self, index: int) -> str:
        return f'Fashion-MNIST sample {index}'


class SyntheticImages:
    """Deterministic, learnable images: each class has its own colour and stripe direction, plus noise."""

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int, training: bool):
        self.size, self.num_classes, self.img_size = size, num_classes, img_size
        self.split_seed = seed * 2 + training
        rng = np.random.default_rng(seed)
        self.colors = rng.integers(40, 216, size=(num_classes, 3))
        self.angles = rng.uniform(0, np.pi, size=num_classes)

    def __len__(self):
        return self.size

    def load(self, index: int):
        rng = np.random.default_rng(derive_seed(self.split_seed, index))
        label = index % self.num_classes
        yy, xx = np.mgrid[0:self.img_size, 0:self.img_size] / max(self.img_size, 1)
        angle = self.angles[label]
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 12 + rng.uniform(0, 6.28))
        pixels = self.colors[label] + 40 * stripes[..., None] + rng.normal(0, 20, (self.img_size, self.img_size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), label

    def describe(self, index: int) -> str:
        return f'synthetic sample {index}'


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what PIL raises for a bad file


def open_image(source, name: str) -> Image.Image:
    """A fully decoded RGB image from a path or file object; a file PIL cannot decode is a UserError naming it."""
    try:
        with Image.open(source) as image:
            return image.convert('RGB')
    except UNREADABLE as e:
        raise UserError(f'cannot read image {name}: {e}') from None


class TimmImages:
    """Map-style datasets through timm's readers: image folders (and tar files), 'hfds/...'. class_map (folder
    name -> label) replaces timm's sorted folder names, for sets whose folders are not the labels in order."""

    def __init__(self, name: str, root: Optional[str], split: str, training: bool, class_map: Optional[dict] = None):
        if name != 'hfds' and not name.startswith('hfds/'):
            if not root:
                raise UserError('data.data_dir is not set: pass --data-dir with train/ and validation/ folders')
            if not Path(root).exists():
                raise UserError(f'data directory {root} does not exist')
        if name == 'folder' and Path(root).is_dir():
            check_split_folder(Path(root), split)
        try:
            self.dataset = create_dataset('' if name == 'folder' else name, root=root, split=split,
                                          is_training=training, class_map=class_map)
        except (FileNotFoundError, RuntimeError, ValueError, AssertionError) as e:
            raise UserError(f'cannot open {name} split {split!r} under {root}: {e}') from None
        if len(self.dataset) == 0:
            raise UserError(f'no images found for split {split!r} under {root}')
        reader = self.dataset.reader
        self.num_classes = len(getattr(reader, 'class_to_idx', None) or {}) or getattr(reader, 'num_classes', None)

    def __len__(self):
        return len(self.dataset)

    def read_bytes(self, index: int) -> tuple[bytes, int]:
        source, target = self.dataset.reader[index][:2]
        try:
            if hasattr(source, 'read'):
                return source.read(), int(target)
            with open(source, 'rb') as f:
                return f.read(), int(target)
        except OSError as e:
            raise UserError(f'cannot read image {self.describe(index)}: {e}') from None

    def load(self, index: int):
        source, target = self.dataset.reader[index][:2]
        return open_image(source, self.describe(index)), int(target)

    def describe(self, index: int) -> str:
        try:
            return str(self.dataset.reader.filename(index, absolute=True))
        except (TypeError, AttributeError):
            return f'sample {index}'


class DataUnavailable(UserError):
    """The data cannot be reached at all (a shard missing, a storage endpoint down, credentials refused): unlike one
    undecodable image, no replacement sample helps, so replacing_unreadable lets it stop the run."""


class StreamedImages:
    """One split of MDS shards written by `python -m mnv_train.shard` (raw encoded image bytes and a label), read
    by index through Mosaic's StreamingDataset (streaming-community), which downloads each shard whole into
    data.local on its first use.

    Read by index, not iterated: EpochSampler deals the epoch's order into micro-batches, as for an image folder, so
    the job's micro-batches, exact resume on any world size, evaluation without padding and replacing unreadable
    images are the folder path's, and a sample decodes and augments as its file would. The order itself is
    StreamingDataset's (shard_order) with data.stream_order shards, so the shards are read a few at a time; with
    samples it is EpochSampler's permutation, which reads them all from the first batches on.
    `shuffle` holds StreamingDataset's order settings (stream_shuffle), None for a split not read in its order.
    """

    def __init__(self, remote: str, local: str, split: str, shuffle: Optional[dict] = None):
        streaming = import_streaming()
        make_folder(Path(local), 'data.local')
        clean_stale_shared_memory_once()
        self.remote, self.split, self.shuffle = remote, split, shuffle
        try:
            self.dataset = streaming.StreamingDataset(remote=remote, local=local, split=split,
                                                      **(shuffle or {'shuffle': False}), download_retry=1,
                                                      download_timeout=30)
        except Exception as e:  # storage clients raise their own types (botocore, google, azure): all end here
            raise DataUnavailable(f'cannot open the shards of split {split!r} at data.remote {remote}: '
                                  f'{storage_error(e)}') from None
        manifest = read_shard_manifest(streaming, remote, local)
        self.num_classes = manifest.get('num_classes')
        if shuffle and manifest.get('order') != 'shuffled':
            logs.warn(f'{remote}/{split}: these shards were not written in a shuffled order (manifest order '
                      f'{manifest.get("order", "not recorded")}), so in data.stream_order shards each step sees few '
                      f'classes: write them again with python -m mnv_train.shard (shuffled by default), or set '
                      f'data.stream_order samples')
        if shuffle and len(self) < shuffle['num_canonical_nodes']:  # the library's shuffle would fail mid-run
            raise UserError(f'data.num_canonical_nodes {shuffle["num_canonical_nodes"]} is more than the {len(self)} '
                            f'samples of {remote}/{split}: lower it')

    def __len__(self):
        return self.dataset.num_samples

    def read_bytes(self, index: int) -> tuple[bytes, int]:
        try:
            sample = self.dataset.get_item(index)
        except Exception as e:  # a shard missing or unreachable, whatever the storage client raised
            shard = self.dataset.shards[self.dataset.spanner[index][0]]
            raise DataUnavailable(f'cannot read shard {shard.file_pairs[0][0].basename} of {self.remote}/{self.split} '
                                  f'({self.describe(index)}): {storage_error(e)}') from None
        return sample['image'], int(sample['label'])

    def load(self, index: int):
        encoded, label = self.read_bytes(index)
        return open_image(io.BytesIO(encoded), self.describe(index)), label

    def describe(self, index: int) -> str:
        return f'{self.remote}/{self.split} sample {index}'

    def shard_order(self, epoch: int) -> np.ndarray:
        """Every sample once, in the order StreamingDataset's own iteration yields them to one process (one node,
        rank and worker) in `epoch`. Its partition deals that sequence round-robin to the ranks of a node, as
        EpochSampler deals it to micro-batches, so the global batches are the library's at any world size. For
        canonical nodes of unequal size the library repeats a sample to even them out; the repeats are dropped."""
        from streaming.base.batching import generate_work  # optional, as in import_streaming
        from streaming.base.world import World as Layout
        work = generate_work(self.dataset.batching_method, self.dataset, Layout(1, 1, 1, 0), epoch, 0).flatten()
        return work[np.sort(np.unique(work, return_index=True)[1])]


def own_order(source) -> Optional[Callable[[int], Sequence[int]]]:
    """The source's own order of each epoch, for EpochSampler: StreamingDataset's for shards opened in it
    (data.stream_order shards, the training split); None for every other source, which EpochSampler permutes."""
    return source.shard_order if isinstance(source, StreamedImages) and source.shuffle else None


def stream_shuffle(cfg: DataConfig, seed: int) -> dict:
    """StreamingDataset's arguments that define its order, all from the recipe (train.seed is the shuffle seed).
    batch_size 1: shard_order asks for one sequence, which EpochSampler cuts into batches."""
    return {'shuffle': True, 'shuffle_algo': cfg.shuffle_algo, 'shuffle_seed': seed, 'batch_size': 1,
            'num_canonical_nodes': cfg.num_canonical_nodes, 'shuffle_block_size': cfg.shuffle_block_size}


def make_shard_cache(local: str, world: World):
    """data.local made on every rank before any dataset opens: a node that cannot create or write it stops every
    rank with the same line naming it. Later, the datasets' start-up waits for every rank in a barrier, where a
    rank that failed alone would leave the others waiting until the process group's timeout."""
    world.run_on_every_rank(lambda: make_folder(Path(local), 'data.local'), 'prepare its shard cache')


def import_streaming():
    """The streaming package, an optional dependency (pip install -e '.[streaming]'), imported on use."""
    try:
        import streaming
    except ImportError:
        raise UserError('data.dataset streaming needs Mosaic\'s StreamingDataset: pip install -e \'.[streaming]\' '
                        '(streaming-community)') from None
    return streaming


def storage_error(error: BaseException) -> str:
    """One line on a failed download. StreamingDataset words S3's 403 as 'not found', so the status code, kept on
    botocore's error, tells the user which of the two to fix."""
    response = getattr(error, 'response', None)
    code = response.get('Error', {}).get('Code') if isinstance(response, dict) else None
    if code in ('403', 'AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch'):
        return f'access denied (S3 error {code}): check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the ' \
               f'bucket\'s permissions'
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


@functools.lru_cache(maxsize=None)
def clean_stale_shared_memory_once():
    """StreamingDataset's shared memory left by a killed run would be taken for a live one's. Its cleaner is a
    collective (a barrier): every rank calls it once, before its first dataset, since later it would unlink the
    memory of the datasets this process already opened. It unlinks every StreamingDataset block on the node, a
    live job's too, so one streaming job per node."""
    from streaming.base.util import clean_stale_shared_memory  # optional, as in import_streaming
    clean_stale_shared_memory()
    # it stops at the first free slot, and a killed run's registry of its local folders past one makes the next
    # StreamingDataset on those folders refuse them ('Reused local directory'): those registries go too
    if int(os.environ.get('LOCAL_RANK', 0)) == 0:
        for registry in Path('/dev/shm').glob('[0-9][0-9][0-9][0-9][0-9][0-9]_locals'):
            registry.unlink(missing_ok=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_shard_manifest(streaming, remote: str, local: str) -> dict:
    """The shard writer's manifest.json beside the splits ({} without one): num_classes (an int) and the order the
    samples were written in."""
    path = os.path.join(local, 'manifest.json')
    try:
        if not os.path.exists(path):  # each process to its own file first: ranks may download it at once
            streaming.base.storage.CloudDownloader.direct_download(os.path.join(remote, 'manifest.json'),
                                                                   f'{path}.{os.getpid()}', 30)
            os.replace(f'{path}.{os.getpid()}', path)
        with open(path) as f:
            manifest = json.load(f)
        return {**manifest, 'num_classes': int(manifest['num_classes'])}
    except Exception:  # no manifest (shards written by another tool): model.num_classes then says it
        return {}


SPLIT_SYNONYMS = ({'train', 'training'}, {'val', 'valid', 'validation', 'eval', 'evaluation'})  # as timm's


def check_split_folder(root: Path, split: str):
    """timm falls back to the root folder when a split's folder is missing, and would then take the other
    splits' folders for classes; a missing split is an error here. An empty split means the root itself."""
    names = {split} | next((group for group in SPLIT_SYNONYMS if split in group), set())
    if split and not any((root / name).exists() for name in names):
        found = ', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())[:8]) or 'no folders'
        raise UserError(f'no {split!r} folder under {root} (it holds {found}); set data.train_split / '
                        f'data.val_split to the folder names, or \'\' for class folders directly under it')


def open_source(cfg: DataConfig, split: str, seed: int):
    """The samples of one split; data.train_split names the one that trains, any other is evaluated."""
    training = split == cfg.train_split
    if cfg.dataset == 'synthetic':
        size = cfg.synthetic_train_size if training else cfg.synthetic_val_size
        return SyntheticImages(size, cfg.synthetic_classes, cfg.img_size, seed, training)
    if cfg.dataset in ('fashion_mnist', 'fmnist'):
        return FashionMNIST(cfg.data_dir, split)
    if cfg.dataset == 'streaming':
        return StreamedImages(cfg.remote, cfg.local, split,
                              stream_shuffle(cfg, seed) if training and cfg.stream_order == 'shards' else None)
    return TimmImages(cfg.dataset, cfg.data_dir, split, training)


# ---------------------------------------------------------------------------------------------- transforms

@dataclass
class Normalization:
    mean: tuple
    std: tuple


def resolve_normalization(cfg: DataConfig, model) -> Normalization:
    model_cfg = resolve_data_config({}, model=model)
    return Normalization(tuple(cfg.mean or model_cfg['mean']), tuple(cfg.std or model_cfg['std']))


def train_transform(cfg: DataConfig, aug: AugConfig, norm: Normalization, img_size: Optional[int] = None):
    """PIL -> uint8 CHW tensor at img_size (None: data.img_size); normalising and erasing happen on the device.
    Google's RandAugment, where the recipe asks for it, runs where timm's would: after the crop and flip.

    Below data.img_size (a progressive-resolution epoch) every augmentation keeps its size relative to the image:
    timm's RandAugment translates by a share of the image (TranslateXRel, translate_pct), while Google's states
    translate and cutout in pixels at data.img_size, so those are scaled down with the image. A run warns about a
    timm RandAugment past its range once (pipeline.training_input), not once per transform built."""
    img_size = img_size or cfg.img_size
    crop_flip, colour, to_tensor = create_transform(
        img_size, is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        color_jitter=aug.color_jitter or None, auto_augment=aug.auto_augment, interpolation=aug.train_interpolation,
        mean=norm.mean, std=norm.std, use_prefetcher=True, separate=True)
    google = []
    if aug.tf_randaugment is not None:
        shrink = img_size / cfg.img_size
        tf_cfg = dataclasses.replace(aug.tf_randaugment, translate_const=aug.tf_randaugment.translate_const * shrink,
                                     cutout_const=aug.tf_randaugment.cutout_const * shrink)
        google = [augment.tf_rand_augment(tf_cfg, img_size)]
    return transforms.Compose([*crop_flip.transforms, *colour.transforms, *google, *to_tensor.transforms])


def epoch_train_size(epoch: int, img_size: int, ramp: Optional[TrainSizeRampConfig]) -> int:
    """The train size of `epoch` (0-based): FFCV's ramp (start_size until start_epoch, linear to img_size at
    end_epoch), rounded half up to the step. FFCV rounds to 32 px; below 64 px that would leave no size between
    start and end, so 8 there."""
    if ramp is None or epoch >= ramp.end_epoch:
        return img_size
    if epoch <= ramp.start_epoch:
        return ramp.start_size
    exact = ramp.start_size + (img_size - ramp.start_size) * (epoch - ramp.start_epoch) / (
        ramp.end_epoch - ramp.start_epoch)
    step = ramp.step or (8 if exact < 64 else 32)
    return min(img_size, max(ramp.start_size, math.floor(exact / step + 0.5) * step))


def train_sizes(img_size: int, ramp: Optional[TrainSizeRampConfig], epochs: int) -> Optional[list[int]]:
    """Every epoch's train size, or None without a ramp (every epoch at img_size)."""
    return None if ramp is None else [epoch_train_size(epoch, img_size, ramp) for epoch in range(epochs)]


def eval_transform(img_size: int, crop_pct: float, interpolation: str, norm: Normalization):
    return create_transform(img_size, is_training=False, interpolation=interpolation, crop_pct=crop_pct,
                            mean=norm.mean, std=norm.std, use_prefetcher=True)


MAX_CONSECUTIVE_BAD = 10  # unreadable samples in a row before a run gives up on its data


def replacing_unreadable(source, index: int, make):
    """make(sample index) for `index`, or for the next readable index after it, and how many were skipped.

    A long run should not die on one corrupt file, and exact resume needs the replacement to be the same every
    time: it is the next index of the dataset, whatever the rank, worker or epoch. Each skip is warned about,
    naming the file; MAX_CONSECUTIVE_BAD in a row means the data itself is broken.
    """
    for skipped in range(MAX_CONSECUTIVE_BAD):
        candidate = (index + skipped) % len(source)
        try:
            return make(candidate), skipped
        except DataUnavailable:
            raise
        except UserError as e:
            logs.warn_every_rank(f'{e}; skipped it, sample {(candidate + 1) % len(source)} takes its place')
    raise UserError(f'{MAX_CONSECUTIVE_BAD} unreadable images in a row from {source.describe(index)}: check the '
                    f'data with python -m mnv_train.check_data DATA_DIR')


class TransformedDataset(torch.utils.data.Dataset):
    """(index, seed) or (index, seed, size) items from the sampler -> (uint8 image, label, unreadable samples
    skipped for it).

    Every RNG a transform may touch is seeded from the item's seed first, so the result depends on nothing else.
    An item with a size (progressive resolution) takes sized[size]: the size travels with the item because the
    loader's persistent workers hold copies of this dataset made at the first epoch, which a change here at an
    epoch start would not reach.
    """

    def __init__(self, source, transform, sized: Optional[dict] = None):
        self.source, self.transform, self.sized = source, transform, sized or {}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        index, seed, *size = item
        transform = self.sized[size[0]] if size else self.transform
        (image, label), skipped = replacing_unreadable(self.source, index,
                                                       lambda i: self.transformed(i, seed, transform))
        return image, label, skipped

    def transformed(self, index: int, seed, transform):
        image, label = self.source.load(index)
        if seed is not None:
            seed_everything(seed)
        try:
            return transform(image), label
        except (OSError, ValueError) as e:
            raise UserError(f'cannot transform image {self.source.describe(index)}: {e}') from None


def collate(samples) -> tuple[torch.Tensor, torch.Tensor, int]:
    """timm's fast_collate (uint8 images, labels) plus the number of unreadable samples the batch skipped."""
    images, labels = fast_collate([(image, label) for image, label, _ in samples])
    return images, labels, sum(skipped for _, _, skipped in samples)


# ---------------------------------------------------------------------------------------------- samplers

class EpochSampler(Sampler):
    """This rank's share of an epoch as (index, sample_seed), or (index, sample_seed, the epoch's train size) with
    progressive resolution, starting at any optimizer step.

    The epoch is one order of the dataset for the whole job, cut into optimizer steps of world_size * accum *
    micro_batch samples; each step's slice is dealt round-robin into world_size * accum micro-batches, and this
    rank takes micro-batches `rank`, `rank + world_size`, ... in turn. Every draw is keyed without the rank: a
    sample's augmentation seed by (seed, epoch, place in the epoch), so 1 process with accumulation 4 sees the
    same micro-batches, identically augmented, as 4 processes without. Dealing round-robin puts timm's repeated
    samples (aug_repeats) into different micro-batches, as its RepeatAugSampler puts them on different ranks.

    epoch_order(epoch), when given, is the job's order of each epoch, every sample once (StreamedImages.shard_order);
    without it the order is a seeded permutation, or timm's repeated-augmentation order.
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, repeats: int = 0, micro_batch: int = 1,
                 accum: int = 1, sizes: Optional[list[int]] = None,
                 epoch_order: Optional[Callable[[int], Sequence[int]]] = None):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.sizes = sizes  # each epoch's train size (progressive resolution), sent with every item; None: none
        self.micro_batch, self.accum = micro_batch, accum
        # one rank of one: the job's order, whatever the world size; the ranks then take their micro-batches
        self.shuffled = None if epoch_order else (
            RepeatAugSampler(range(size), num_replicas=1, rank=0, num_repeats=repeats) if repeats
            else DistributedSampler(range(size), num_replicas=1, rank=0, shuffle=True, seed=seed))
        self.length = size if epoch_order else len(self.shuffled)
        self.epoch_order = epoch_order or self.shuffled_order
        self.epoch, self.start_step = 0, 0

    @property
    def step_size(self) -> int:
        """Samples in one optimizer step, over all ranks."""
        return self.world_size * self.accum * self.micro_batch

    @property
    def steps(self) -> int:
        """Whole optimizer steps in an epoch; the samples left over wait for the next epoch's order."""
        return self.length // self.step_size

    def set_position(self, epoch: int, start: int = 0):
        """From sample `start` of the epoch (over all ranks), rounded down to a step boundary."""
        self.epoch, self.start_step = epoch, start // self.step_size

    def micro_batch_index(self, micro_step: int) -> int:
        """The place within its optimizer step of this rank's micro-batch `micro_step` (0 to accum - 1)."""
        return micro_step * self.world_size + self.rank

    def __len__(self):
        return (self.steps - self.start_step) * self.accum * self.micro_batch

    def shuffled_order(self, epoch: int) -> list[int]:
        # RepeatAugSampler seeds its shuffle with the epoch alone; folding the run seed in keeps runs distinct
        self.shuffled.set_epoch(epoch if isinstance(self.shuffled, DistributedSampler)
                                else derive_seed(self.seed, epoch) % 2**62)
        return list(self.shuffled)

    def places(self) -> Iterator[int]:
        """This rank's places in the epoch's order, from the start step."""
        micro_batches = self.world_size * self.accum
        for step in range(self.start_step, self.steps):
            for micro_step in range(self.accum):
                first = step * self.step_size + self.micro_batch_index(micro_step)
                yield from range(first, first + micro_batches * self.micro_batch, micro_batches)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = self.epoch_order(self.epoch)
        size = () if self.sizes is None else (self.sizes[min(self.epoch, len(self.sizes) - 1)],)
        for place in self.places():
            yield indices[place], sample_seed(self.seed, self.epoch, place), *size

    def indices_and_places(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's sample indices as iterating yields them, and their places in the epoch, without the seeds:
        DALI's workers derive those (a seed costs ~15 us, 22 s an ImageNet epoch if taken at once)."""
        places = np.fromiter(self.places(), dtype=np.int64)
        return np.asarray(self.epoch_order(self.epoch), dtype=np.int64)[places], places


class ShardSampler(Sampler):
    """Every sample (of `size`, or of the given indices) exactly once across ranks, without padding: evaluation."""

    def __init__(self, size: int, rank: int, world_size: int, indices=None):
        self.indices = (range(size) if indices is None else indices)[rank::world_size]

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return ((i, None) for i in self.indices)


def make_loader(dataset, sampler, batch_size: int, num_workers: int, drop_last: bool, pin_memory: bool,
                collate_fn=collate, persistent_workers: bool = True):
    # torch's SIGCHLD handler raises a dead worker's error in whatever the main thread is doing, possibly halfway
    # through an optimizer step; without it, the loader reports the death from the next batch fetch (within its
    # 5 s status check), where the run's state is whole and can be saved
    signal_handling._SIGCHLD_handler_set = True
    # its own generator: each new iterator draws a base seed, and a resumed run makes its (persistent) iterators at
    # other points than an uninterrupted one; from the global one, that draw would leave the saved RNG state
    # different. Samples are seeded one by one, so nothing depends on that base seed.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory, drop_last=drop_last, generator=torch.Generator(),
                      persistent_workers=persistent_workers and num_workers > 0,
                      prefetch_factor=4 if num_workers > 0 else None)


# ---------------------------------------------------------------------------------------------- device side

class DeviceNormalize:
    """uint8 batch on the host -> normalised float batch on the device (timm's prefetcher idea, no stream)."""

    def __init__(self, norm: Normalization, device: torch.device, channels_last: bool):
        self.device = device
        self.mean = torch.tensor([m * 255 for m in norm.mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([s * 255 for s in norm.std], device=device).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch):
        """(uint8 images, labels, skipped) on the host -> (normalised images, labels) on the device, skipped."""
        images, targets, skipped = batch
        images = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return (images.contiguous(memory_format=self.memory_format), targets.to(self.device, non_blocking=True),
                skipped)


def loader_batches(loader, limit: Optional[int] = None):
    """The loader's batches, at most `limit` of them. A worker killed while it hands a batch over (its shared memory
    travels through multiprocessing's fd sharing) surfaces as ConnectionResetError; asked once more, the loader
    notices the dead worker and raises its usual RuntimeError naming it, which the loop reports in one line. The
    limit is counted here, not by an itertools.islice around the loader: islice ends for good at the first error, so
    the second ask would get nothing and the worker would go unnamed."""
    batches = iter(loader)
    for _ in itertools.repeat(None) if limit is None else range(limit):
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ConnectionError as lost:
            next(batches, None)
            raise RuntimeError(f'DataLoader worker (pid unknown) lost a batch ({lost})') from lost
        yield batch


def device_batches(loader, normalize: DeviceNormalize, limit: Optional[int] = None):
    """(images, labels, skipped) batches, at most `limit`, normalised on the device. On CUDA the next batch is copied
    and normalised on a side stream while the current one computes."""
    if normalize.device.type != 'cuda' or getattr(loader, 'prefetches', False):  # DALI reads ahead itself
        yield from map(normalize, loader_batches(loader, limit))
        return
    stream, ready = torch.cuda.Stream(), None
    for batch in loader_batches(loader, limit):
        with torch.cuda.stream(stream):
            upcoming = normalize(batch)
        if ready is not None:
            yield ready
        torch.cuda.current_stream().wait_stream(stream)
        for tensor in upcoming[:2]:
            tensor.record_stream(torch.cuda.current_stream())
        ready = upcoming
    if ready is not None:
        yield ready


def mixes_batches(aug: AugConfig) -> bool:
    """Whether timm's Mixup runs on the batch; it needs an even batch, since it pairs each image with its mirror."""
    return aug.mixup > 0 or aug.cutmix > 0 or aug.cutmix_minmax is not None


class BatchAugment:
    """Random erasing and Mixup/CutMix on the device batch; call after seeding the step's RNGs."""

    def __init__(self, aug: AugConfig, num_classes: int, smoothing: float, device: torch.device):
        self.erase = (RandomErasing(aug.reprob, mode=aug.remode, max_count=aug.recount, device=str(device))
                      if aug.reprob > 0 else None)
        self.mixup = None
        if mixes_batches(aug):
            mixer = augment.GoogleMixup if aug.mixup_mode == 'google' else Mixup
            self.mixup = mixer(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax,
                               prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                               label_smoothing=smoothing, num_classes=num_classes)
        self.mixup_off_epoch = aug.mixup_off_epoch

    def mixing(self, epoch: int) -> bool:
        return self.mixup is not None and not (self.mixup_off_epoch and epoch >= self.mixup_off_epoch)

    def __call__(self, images, targets, epoch: int):
        if self.erase is not None:
            images = self.erase(images)
        if self.mixing(epoch):
            if len(images) % 2:
                raise UserError(f'Mixup/CutMix needs an even per-device batch, got {len(images)}')
            images, targets = self.mixup(images, targets)
        return images, targets
