"""The training input on NVIDIA DALI (data.pipeline: dali), for small models that host cores cannot feed.

DALI decodes the JPEGs (the GPU's hardware decoder when training on CUDA, its CPU backend otherwise, which is what
the tests run), then crops (RandomResizedCrop), flips and runs RandAugment (nvidia.dali.auto_aug) on its own
stream; the batch arrives as uint8 CHW and is normalised like the host path's (data.DeviceNormalize).

Sample order is ours: EpochSampler's indices reach DALI through a per-sample external source (EpochFiles), so
epochs, evaluation and checkpoints mean what they mean on the host path. The files are read, header-checked and
replaced when unreadable in DALI's Python workers (data.num_workers processes, its parallel external source),
PREFETCH batches ahead, not in the training process's main thread inside pipe.run(): there they ran serially with
the training step. Each sample's place comes from DALI's SampleInfo, not from a shared iterator, so the read-ahead
takes no sample twice and skips none.

Augmentation randomness is DALI's: its generators are seeded from (seed, rank, samples taken) when a run starts
and then run on from batch to batch, rather than being derived from (seed, epoch, position) for every sample as on
the host path. Exact resume therefore keeps DALI's pipeline checkpoint (its RNG states) in ours, and the pipeline
is rebuilt from the state after the last batch taken at every epoch start, because DALI reads ahead and an epoch's
read-ahead must not advance the generators. The cost is a new set of workers per epoch (forked on CPU, spawned on
CUDA, where the dataset is pickled into each).

DALI's checkpoint is taken only when it is asked for (a checkpoint being saved, which only a single process does,
and each epoch's new pipeline), not after every batch. That is exact at any moment despite DALI's read-ahead
(prefetch_queue_depth): with checkpointing enabled DALI snapshots every iteration it computes, and
Pipeline.checkpoint() returns the snapshot of the last batch it handed out, not of the ones it has prefetched.
What must not read ahead is our side: DaliLoader.prefetches tells data.device_batches not to take the next batch
before the current step is done, so the last batch handed out is the last one trained on.
"""
from __future__ import annotations

import io
import re
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from .data import UNREADABLE, DataUnavailable, EpochSampler, derive_seed, open_image, replacing_unreadable
from .errors import UserError
from .recipe import AugConfig, DataConfig

MAGNITUDE_BINS = 11  # DALI's magnitude bin m of 0..10 then scales each op's range as timm's level m / 10 does
FILL = 128  # rotations, shears, translations: one grey for all channels (timm fills with the mean colour)
PREFETCH = 2  # batches DALI computes ahead of the one handed out; its Python workers read as far ahead


def import_dali():
    """nvidia.dali's fn, types and rand_augment: an optional dependency (pip install -e '.[dali]'), imported on use."""
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.auto_aug import rand_augment
    except ImportError:
        raise UserError('data.pipeline dali needs NVIDIA DALI: pip install -e \'.[dali]\' (or nvidia-dali-cuda130), '
                        'or set data.pipeline host') from None
    return fn, pipeline_def, types, rand_augment


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


class EpochFiles:
    """DALI's per-sample source for one epoch: (file bytes, label, unreadable samples skipped) for each place of
    the epoch's sample indices, called in DALI's Python workers (in the training process without workers). It is
    pickled into each spawned worker, so it holds the dataset and the indices and nothing else.

    A pipeline restored from a checkpoint numbers its iterations on from the checkpoint's (DALI resumes a
    SampleInfo source there), so the place in the epoch is counted from `first_iteration`, where this epoch's
    pipeline starts."""

    def __init__(self, dataset, indices: np.ndarray, first_iteration: int, batch_size: int):
        self.dataset, self.indices = dataset, indices
        self.first_iteration, self.batch_size = first_iteration, batch_size

    def __call__(self, sample_info) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        place = (sample_info.iteration - self.first_iteration) * self.batch_size + sample_info.idx_in_batch
        if place >= len(self.indices):
            raise StopIteration  # the epoch's last batch is out: DALI's read-ahead ends here
        (data, label), skipped = replacing_unreadable(self.dataset, int(self.indices[place]), self.checked_bytes)
        return np.frombuffer(data, dtype=np.uint8), np.array(label, dtype=np.int64), np.array(skipped, dtype=np.int64)

    def checked_bytes(self, index: int) -> tuple[bytes, int]:
        """A file's bytes and label; one whose header PIL cannot read is a UserError naming it, which
        replacing_unreadable turns into a warning and the next sample, as on the host path."""
        data, label = self.dataset.read_bytes(index)
        try:
            Image.open(io.BytesIO(data))
        except UNREADABLE as e:
            raise UserError(f'cannot read image {self.dataset.describe(index)}: {e}') from None
        return data, label

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


def define_pipeline(cfg: DataConfig, aug: AugConfig, files: EpochFiles, batch_size: int, seed: int,
                    device: torch.device, checkpoint: Optional[bytes]):
    """DALI's pipeline: file bytes, labels and skip counts from `files` -> (uint8 CHW image, label, skipped)."""
    fn, pipeline_def, types, rand_augment = import_dali()
    plan = RandAugmentPlan(aug.auto_augment) if aug.auto_augment else None
    suite = timm_op_list(plan.increasing) if plan else []
    size = cfg.img_size
    interp = types.INTERP_CUBIC if aug.train_interpolation == 'bicubic' else types.INTERP_LINEAR
    on_gpu = device.type == 'cuda'
    workers = cfg.num_workers
    parallel = {'parallel': True, 'prefetch_queue_depth': PREFETCH} if workers else {}  # without workers: in-process

    @pipeline_def(batch_size=batch_size, num_threads=max(1, workers),
                  device_id=(device.index or 0) if on_gpu else None, seed=seed, enable_checkpointing=True,
                  enable_conditionals=plan is not None, prefetch_queue_depth=PREFETCH, py_num_workers=max(1, workers),
                  py_start_method=start_method(device))
    def pipeline():
        encoded, labels, skipped = fn.external_source(source=files, num_outputs=3, batch=False, **parallel,
                                                      dtype=[types.UINT8, types.INT64, types.INT64])
        images = fn.decoders.image_random_crop(encoded, device='mixed' if on_gpu else 'cpu', output_type=types.RGB,
                                               random_area=list(aug.scale), random_aspect_ratio=list(aug.ratio))
        images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=aug.hflip))
        for _ in range(plan.layers if plan else 0):  # timm applies each of its layers with probability p
            if fn.random.coin_flip(probability=plan.prob):
                images = rand_augment.apply_rand_augment(suite, images, n=1, m=plan.magnitude,
                                                         num_magnitude_bins=MAGNITUDE_BINS, shape=[size, size],
                                                         fill_value=FILL)
        images = fn.transpose(images, perm=[2, 0, 1])
        return images, labels.gpu() if on_gpu else labels, skipped

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # auto_aug calls DALI's deprecated fn.experimental names
        pipe = pipeline(checkpoint=checkpoint)
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
                 seed: int, device: torch.device):
        if not hasattr(source, 'read_bytes'):
            raise UserError('data.pipeline dali reads image files: set data.dataset folder (or hfds/...), or use '
                            'data.pipeline host')
        check_recipe(cfg, aug)
        self.dataset, self.sampler, self.batch_size = source, sampler, batch_size
        self.cfg, self.aug, self.device = cfg, aug, device
        self.seed, self.rank = seed, sampler.rank
        self.taken = 0  # samples this rank has taken over the whole run
        self.iterations = 0  # batches DALI handed out since its generators were seeded: its checkpoint's iteration
        self.pipe = None  # the pipeline that handed out the last batch taken
        self.restored: Optional[bytes] = None  # the checkpoint to start from when there is no pipeline yet
        self.files: Optional[EpochFiles] = None  # this epoch's source, to name a file DALI failed on
        self.probe: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None  # see probe_batch

    def __iter__(self):
        state = self.current_state()
        if state is None:  # a fresh pipeline, seeded from this rank's position, counts its iterations from 0
            self.iterations = 0
        seed = derive_seed(self.seed, self.rank, self.taken) % 2**31  # used only without a state: a fresh start
        batches = len(self.sampler) // self.batch_size
        indices = self.sampler.indices()[:batches * self.batch_size]
        self.files = EpochFiles(self.dataset, indices, self.iterations, self.batch_size)
        self.pipe, self.restored = None, state  # the last epoch's pipeline, and its workers, go before this one starts
        pipe = self.pipe = define_pipeline(self.cfg, self.aug, self.files, self.batch_size, seed, self.device, state)
        for batch in range(batches):
            try:
                images, labels, skipped = (to_torch(out) for out in pipe.run())
            except Exception as e:  # DALI re-raises its workers' errors as Exception
                error = self.data_error(e, batch)
                if error is None:  # anything else (memory, DALI itself) keeps its traceback
                    raise
                raise error from None
            self.iterations += 1
            self.taken += len(labels)
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

    def current_state(self) -> Optional[bytes]:
        """DALI's checkpoint after the last batch taken (serialising it costs time: asked for only when needed);
        None where a fresh pipeline would start here from its seed."""
        return self.pipe.checkpoint() if self.pipe is not None else self.restored

    def state_dict(self, taken: int) -> dict:
        """DALI's checkpoint after `taken` samples of this rank, as a tensor for our checkpoint file, and its
        iteration, where the next pipeline's EpochFiles counts from."""
        if taken != self.taken:
            raise RuntimeError(f'DALI\'s state is asked for after {taken} samples, but {self.taken} were taken')
        state = self.current_state()
        return {'taken': taken, 'iterations': self.iterations,
                'dali': None if state is None else torch.frombuffer(bytearray(state), dtype=torch.uint8)}

    def load_state_dict(self, state: dict):
        if 'iterations' not in state:  # saved before DALI's workers read the files: its generators start from the seed
            state = {'taken': state['taken'], 'dali': None}
        self.taken, self.pipe = state['taken'], None
        self.restored = None if state['dali'] is None else state['dali'].numpy().tobytes()
        self.iterations = 0 if state['dali'] is None else state['iterations']
