"""The training input on NVIDIA DALI (data.pipeline: dali), for small models that host cores cannot feed.

DALI decodes the JPEGs (the GPU's hardware decoder when training on CUDA, its CPU backend otherwise, which is what
the tests run), then crops, resizes, flips and runs RandAugment (nvidia.dali.auto_aug's ops) on its own stream;
the batch arrives as uint8 CHW and is normalised like the host path's (data.DeviceNormalize).

Sample order is ours: EpochSampler's indices reach DALI through a per-sample external source (EpochFiles), so
epochs, evaluation and checkpoints mean what they mean on the host path. The files are read, header-checked and
replaced when unreadable in DALI's Python workers (data.num_workers processes, its parallel external source),
PREFETCH batches ahead, not in the training process's main thread inside pipe.run(). Each sample's place comes
from DALI's SampleInfo, not from a shared iterator, so the read-ahead takes no sample twice and skips none.

DALI draws nothing itself. Each sample's crop window, flip and RandAugment ops and signs are drawn in the worker
that reads it, by the host path's own timm transforms under the host path's seed for that place of the epoch
(SampleDraws), and reach DALI beside the file's bytes. So a sample is augmented the same on any number of ranks,
workers or restarts, as on the host path: resume and a change of world size need no DALI state, and the draws
are the host path's, only the pixel work is DALI's.
"""
from __future__ import annotations

import copy
import functools
import io
import re
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import RandomHorizontalFlip

from .data import (
    UNREADABLE,
    DataUnavailable,
    EpochSampler,
    Normalization,
    open_image,
    replacing_unreadable,
    sample_seed,
    seed_everything,
    train_transform,
)
from .errors import UserError
from .recipe import AugConfig, DataConfig

MAGNITUDE_BINS = 11  # DALI's magnitude bin m of 0..10 then scales each op's range as timm's level m / 10 does
FILL = 128  # rotations, shears, translations: one grey for all channels (timm fills with the mean colour)
PREFETCH = 2  # batches DALI computes ahead of the one handed out; its Python workers read as far ahead


def import_dali():
    """nvidia.dali's fn, pipeline_def, types and auto_aug.core (select, signed_bin): an optional dependency
    (pip install -e '.[dali]'), imported on use."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug import core
    except ImportError:
        raise UserError('data.pipeline dali needs NVIDIA DALI: pip install -e \'.[dali]\' (or nvidia-dali-cuda130), '
                        'or set data.pipeline host') from None
    return fn, pipeline_def, types, core


class RandAugmentPlan:
    """timm's RandAugment string (aug.auto_augment), read by timm's own parser, as DALI's: `layers` ops per image,
    each applied with probability `prob` at magnitude bin `magnitude` of 0..10, from timm's op list (`increasing`:
    its inc1 variants)."""

    def __init__(self, auto_augment: str):
        if not auto_augment.startswith('rand'):
            raise UserError(f'aug.auto_augment {auto_augment!r}: data.pipeline dali runs RandAugment (rand-...) only')
        timm_ra = rand_augment_transform(auto_augment, {})
        op = timm_ra.ops[0]
        if op.magnitude_std or timm_ra.choice_weights is not None:
            raise UserError(f'aug.auto_augment {auto_augment!r}: DALI\'s RandAugment has no magnitude noise (mstd) '
                            f'or op weights (w); use mstd0 without w, or data.pipeline host')
        if not 0 <= op.magnitude <= MAGNITUDE_BINS - 1:
            raise UserError(f'aug.auto_augment {auto_augment!r}: magnitude {op.magnitude} is past DALI\'s full '
                            f'range (10 on timm\'s scale); lower m, or use data.pipeline host')
        self.layers, self.prob, self.magnitude = timm_ra.num_layers, op.prob, int(op.magnitude)
        self.increasing = any(o.name.endswith('Increasing') for o in timm_ra.ops)


def truncated_posterize_mask(bits: float) -> np.ndarray:
    """DALI's posterize mask for int(bits) bits kept, as timm truncates; DALI rounds (and keeps at least 1 bit)."""
    from nvidia.dali.auto_aug import augmentations as ops  # optional like DALI itself, see import_dali
    return ops.poster_mask_uint8(np.floor(bits + 1e-6))


def timm_op_list(increasing: bool) -> list:
    """DALI's RandAugment ops, in timm's list ('rand' transforms) at timm's ranges at magnitude 10; DALI's default
    suite lacks Invert and SolarizeAdd and adds Identity, and translates by 100/224 rather than 0.45."""
    from nvidia.dali.auto_aug import augmentations as ops  # optional like DALI itself, see import_dali
    if increasing:  # strength grows with the magnitude; enhance factors 1 +- 0.9 m / 10
        enhance = [op.augmentation((0, 0.9), True, ops.shift_enhance_range) for op in (ops.color, ops.contrast,
                                                                                         ops.brightness)]
        sharpness = ops.sharpness.augmentation((0, 0.9), True, ops.sharpness_kernel)
        posterize, solarize = ops.posterize.augmentation((4, 0), False), ops.solarize.augmentation((256, 0))
    else:  # timm's default: enhance factor 0.1 + 1.8 m / 10, posterize keeps 0.4 m bits, solarize at 25.6 m
        enhance = [op.augmentation((0.1, 1.9), False, None) for op in (ops.color, ops.contrast, ops.brightness)]
        sharpness = ops.sharpness.augmentation((0.1, 1.9), False, ops.sharpness_kernel_shifted)
        posterize = ops.posterize.augmentation((0, 4), False, truncated_posterize_mask)
        solarize = ops.solarize.augmentation((0, 256))
    return [ops.auto_contrast, ops.equalize, ops.invert, ops.rotate.augmentation((0, 30), True), posterize, solarize,
            ops.solarize_add.augmentation((0, 110)), *enhance, sharpness, ops.shear_x.augmentation((0, 0.3), True),
            ops.shear_y.augmentation((0, 0.3), True), ops.translate_x.augmentation((0, 0.45), True),
            ops.translate_y.augmentation((0, 0.45), True)]


def check_recipe(cfg: DataConfig, aug: AugConfig):
    """What the DALI pipeline does not do, named as one-line errors before anything is built."""
    if aug.tf_randaugment is not None or aug.color_jitter:
        raise UserError('data.pipeline dali runs timm-style RandAugment (aug.auto_augment) only: set '
                        'aug.tf_randaugment null and aug.color_jitter 0, or use data.pipeline host')
    if aug.train_interpolation not in ('bilinear', 'bicubic'):
        raise UserError(f'aug.train_interpolation {aug.train_interpolation!r}: data.pipeline dali resizes with '
                        f'bilinear or bicubic')
    if aug.auto_augment:
        RandAugmentPlan(aug.auto_augment)


class SampleDraws:
    """For one sample, what the host path's transform (data.train_transform: timm's crop, flip and RandAugment)
    draws under the sample's seed, without its pixel work: the crop window, the flip and, per RandAugment layer,
    whether an op runs, which (its place in timm's list, which timm_op_list follows) and whether its magnitude is
    negated. timm's RandAugment runs itself on copies of its ops whose image function only notes the call, so the
    draws are timm's in timm's order, however timm makes them."""

    def __init__(self, cfg: DataConfig, aug: AugConfig, norm: Normalization):
        crop, *middle, _to_tensor = train_transform(cfg, aug, norm).transforms
        flips = [t for t in middle if isinstance(t, RandomHorizontalFlip)]  # none at aug.hflip 0
        rest = [t for t in middle if isinstance(t, RandAugment)]
        if not isinstance(crop, RandomResizedCropAndInterpolation) or len(flips) + len(rest) != len(middle):
            raise RuntimeError(f'the host transform is not crop, flip, RandAugment: {middle}')  # see check_recipe
        self.crop, self.hflip = crop, flips[0].p if flips else None
        self.calls: list[tuple[int, tuple]] = []  # (op, level arguments) of each op the recording RandAugment ran
        self.rand_augment = None
        if rest:
            ops = [copy.copy(op) for op in rest[0].ops]
            for place, op in enumerate(ops):
                op.aug_fn = functools.partial(note_call, self.calls, place)
            self.rand_augment = RandAugment(ops, rest[0].num_layers, rest[0].choice_weights)
        self.layers = rest[0].num_layers if rest else 0

    def __call__(self, header: Image.Image, seed: int) -> tuple[np.ndarray, ...]:
        """(anchor x y, shape w h, flip, run per layer, op per layer, negate per layer) for an image whose header
        PIL has read (the crop draws from its size; nothing is decoded)."""
        seed_everything(seed)  # as TransformedDataset does before the same transform
        top, left, crop_height, crop_width = self.crop.get_params(header, self.crop.scale, self.crop.ratio)
        flip = self.hflip is not None and bool(torch.rand(1) < self.hflip)  # RandomHorizontalFlip's own draw
        self.calls.clear()
        if self.rand_augment is not None:
            self.rand_augment(None)
        runs, ops, negated = (np.zeros(self.layers, dtype=dtype) for dtype in (bool, np.int32, np.int32))
        for layer, (op, level) in enumerate(self.calls):
            name = self.rand_augment.ops[op].name
            runs[layer], ops[layer] = True, op
            below = bool(level) and level[0] < (1.0 if name.startswith(ENHANCE_OPS) else 0.0)
            negated[layer] = below != name.startswith(MIRRORED_OPS)
        return (np.array([left, top], dtype=np.float32), np.array([crop_width, crop_height], dtype=np.float32),
                np.array(flip, dtype=np.int32), runs, ops, negated)


ENHANCE_OPS = ('Color', 'Contrast', 'Brightness', 'Sharpness')  # their level is a factor around 1, not 0
# PIL's affine matrix maps output pixels to input ones, DALI's the other way: the same signed level moves the image
# the opposite way, so DALI takes the opposite sign
MIRRORED_OPS = ('Shear', 'Translate')


def note_call(calls: list, op: int, image, *level, **_):
    """A recording RandAugment op's image function: notes that op `op` ran with `level`, leaves the image."""
    calls.append((op, level))
    return image


OUTPUTS = 9  # EpochFiles' outputs per sample: bytes, label, skipped, then SampleDraws'


class EpochFiles:
    """DALI's per-sample source for one epoch: (file bytes, label, unreadable samples skipped, then SampleDraws')
    for each place of this rank's share of the epoch, called in DALI's Python workers (in the training process
    without workers). It is pickled into each spawned worker, so it holds the dataset, the indices and what the
    draws need, and nothing else."""

    def __init__(self, dataset, indices: np.ndarray, places: np.ndarray, seed: int, epoch: int, batch_size: int,
                 draws: SampleDraws):
        self.dataset, self.indices, self.places = dataset, indices, places
        self.seed, self.epoch, self.batch_size, self.draws = seed, epoch, batch_size, draws

    def __call__(self, sample_info) -> tuple[np.ndarray, ...]:
        at = sample_info.idx_in_epoch
        if at >= len(self.indices):
            raise StopIteration  # the epoch's last batch is out: DALI's read-ahead ends here
        seed = sample_seed(self.seed, self.epoch, int(self.places[at]))
        (data, label, drawn), skipped = replacing_unreadable(self.dataset, int(self.indices[at]),
                                                             lambda index: self.read(index, seed))
        return (np.frombuffer(data, dtype=np.uint8), np.array(label, dtype=np.int64),
                np.array(skipped, dtype=np.int64), *drawn)

    def read(self, index: int, seed: int) -> tuple[bytes, int, tuple]:
        """A file's bytes, label and draws; one whose header PIL cannot read is a UserError naming it, which
        replacing_unreadable turns into a warning and the next sample (drawn with the same seed), as on the host
        path."""
        data, label = self.dataset.read_bytes(index)
        try:
            header = Image.open(io.BytesIO(data))
        except UNREADABLE as e:
            raise UserError(f'cannot read image {self.dataset.describe(index)}: {e}') from None
        return data, label, self.draws(header, seed)

    def in_flight(self, batch: int, sample: Optional[int]) -> list[int]:
        """The sample indices DALI may hold while batch `batch` of the epoch is the next one out: that batch and the
        PREFETCH after it, only their sample `sample` where DALI named one."""
        places = range(batch * self.batch_size, min(len(self.indices), (batch + PREFETCH + 1) * self.batch_size))
        return [int(self.indices[place]) for place in places if sample is None or place % self.batch_size == sample]


def start_method(device: torch.device) -> str:
    """How DALI starts its Python workers. fork starts them at once, but CUDA forbids it once the process holds a
    context, as a GPU run does by the time its loader starts: there they are spawned, and each imports the package
    and unpickles its EpochFiles first."""
    return 'spawn' if device.type == 'cuda' else 'fork'


def define_pipeline(cfg: DataConfig, aug: AugConfig, files: EpochFiles, batch_size: int, device: torch.device):
    """DALI's pipeline: file bytes, labels, skip counts and draws from `files` -> (uint8 CHW image, label, skipped)."""
    fn, pipeline_def, types, auto_aug = import_dali()
    plan = RandAugmentPlan(aug.auto_augment) if aug.auto_augment else None
    suite = timm_op_list(plan.increasing) if plan else []
    size = cfg.img_size
    interp = types.INTERP_CUBIC if aug.train_interpolation == 'bicubic' else types.INTERP_LINEAR
    on_gpu = device.type == 'cuda'
    workers = cfg.num_workers
    parallel = {'parallel': True, 'prefetch_queue_depth': PREFETCH} if workers else {}  # without workers: in-process

    # seed: DALI draws nothing here (every random choice comes from `files`); fixed, so a draw added by mistake
    # would at least repeat
    @pipeline_def(batch_size=batch_size, num_threads=max(1, workers), device_id=(device.index or 0) if on_gpu else None,
                  seed=0, enable_conditionals=plan is not None, prefetch_queue_depth=PREFETCH,
                  py_num_workers=max(1, workers), py_start_method=start_method(device))
    def pipeline():
        encoded, labels, skipped, anchor, shape, flip, runs, ops, negated = fn.external_source(
            source=files, num_outputs=OUTPUTS, batch=False, **parallel,
            dtype=[types.UINT8, types.INT64, types.INT64, types.FLOAT, types.FLOAT, types.INT32, types.BOOL,
                   types.INT32, types.INT32])
        # the host path's PIL does not turn images by their EXIF orientation, and its crop window is in file pixels
        images = fn.decoders.image_slice(encoded, anchor, shape, normalized_anchor=False, normalized_shape=False,
                                         device='mixed' if on_gpu else 'cpu', output_type=types.RGB,
                                         adjust_orientation=False)
        images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
        images = fn.flip(images, horizontal=flip)
        if plan is not None:
            signed = auto_aug.signed_bin(plan.magnitude, random_sign=negated)
            for layer in range(plan.layers):
                if runs[layer]:
                    images = auto_aug.select(suite, ops[layer], data=images, magnitude_bin=signed[layer],
                                             num_magnitude_bins=MAGNITUDE_BINS, shape=[size, size], fill_value=FILL)
        images = fn.transpose(images, perm=[2, 0, 1])
        return images, labels.gpu() if on_gpu else labels, skipped

    # auto_aug calls DALI's deprecated fn.experimental names, and DALI shows that warning whatever the filters say
    with warnings.catch_warnings(record=True):
        pipe = pipeline()
        pipe.build()
    return pipe


def to_torch(tensor_list) -> torch.Tensor:
    """A DALI output batch as a torch tensor of its own (DALI reuses its buffers on the next run)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray  # optional like DALI itself, see import_dali
    from nvidia.dali.tensors import TensorListGPU
    from nvidia.dali.types import DALIDataType
    dense = tensor_list.as_tensor()
    if isinstance(tensor_list, TensorListGPU):
        dtype = torch.uint8 if tensor_list.dtype == DALIDataType.UINT8 else torch.int64
        out = torch.empty(dense.shape(), dtype=dtype, device=torch.device('cuda', torch.cuda.current_device()))
        return feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
    return torch.from_numpy(np.array(dense))


class DaliLoader:
    """Batches (uint8 images, labels, unreadable samples skipped) from this rank's sampler through DALI."""

    prefetches = True  # DALI reads ahead on its own stream: data.device_batches must not take a batch early

    def __init__(self, source, sampler: EpochSampler, batch_size: int, cfg: DataConfig, aug: AugConfig,
                 norm: Normalization, device: torch.device):
        if not hasattr(source, 'read_bytes'):
            raise UserError('data.pipeline dali reads image files: set data.dataset folder (or hfds/...), or use '
                            'data.pipeline host')
        check_recipe(cfg, aug)
        self.dataset, self.sampler, self.batch_size = source, sampler, batch_size
        self.cfg, self.aug, self.device = cfg, aug, device
        self.draws = SampleDraws(cfg, aug, norm)
        self.files: Optional[EpochFiles] = None  # this epoch's source, to name a file DALI failed on
        self.probe: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None  # see probe_batch

    def __iter__(self):
        """The rest of the sampler's epoch, on a new pipeline (new workers: EpochFiles holds the epoch's indices)."""
        batches = len(self.sampler) // self.batch_size
        indices, places = (part[:batches * self.batch_size] for part in self.sampler.indices_and_places())
        self.files = EpochFiles(self.dataset, indices, places, self.sampler.seed, self.sampler.epoch, self.batch_size,
                                self.draws)
        pipe = define_pipeline(self.cfg, self.aug, self.files, self.batch_size, self.device)
        for batch in range(batches):
            try:
                images, labels, skipped = (to_torch(out) for out in pipe.run())
            except Exception as e:  # DALI re-raises its workers' errors as Exception
                error = self.data_error(e, batch)
                if error is None:  # anything else (memory, DALI itself) keeps its traceback
                    raise
                raise error from None
            yield images, labels, int(skipped.sum())

    def probe_batch(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The first batch, taken once, for --dry-run's probes and preview: each new pipeline costs a build (seconds
        for a large batch), and the dry run spends the run anyway."""
        if self.probe is None:
            self.probe = next(iter(self))
        return self.probe

    def data_error(self, error: Exception, batch: int) -> Optional[UserError]:
        """The one line for a stop the data caused: a worker's UserError (a run of unreadable files, storage out of
        reach), or a file DALI cannot decode, named; None for any other error."""
        if isinstance(error, UserError):  # raised in this process (no workers)
            return error
        # a worker's error arrives as an Exception holding its traceback, and a RuntimeError of its message as the
        # cause: the class is only named in the traceback's last line
        last = str(error).strip().rsplit('\n', 1)[-1]
        for kind in (UserError, DataUnavailable):
            if last.startswith(f'{kind.__module__}.{kind.__qualname__}: '):
                return UserError(last.split(': ', 1)[1])
        if isinstance(error, RuntimeError) and 'decode' in str(error).lower():  # DALI cannot go on after it
            return UserError(f'DALI cannot decode {self.culprit(str(error), batch)}: check the data with python -m '
                             f'mnv_train.check_data DATA_DIR, or use data.pipeline host')
        return None

    def culprit(self, error: str, batch: int) -> str:
        """The file(s) behind DALI's 'Failed to decode sample #i' among the batches it may hold: those PIL cannot
        decode either, else every candidate."""
        found = re.search(r'sample #(\d+)', error)
        candidates = self.files.in_flight(batch, int(found.group(1)) if found else None)
        culprits = []
        for index in candidates:
            try:  # the host path's decode, which check_data runs too
                open_image(io.BytesIO(self.dataset.read_bytes(index)[0]), self.dataset.describe(index))
            except UserError:
                culprits.append(index)
        return ', '.join(self.dataset.describe(index) for index in culprits or candidates)
