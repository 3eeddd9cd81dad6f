"""Recipes: plain YAML data checked against a typed schema when loaded.

A recipe states the experiment as it was published (global batch, LR at that batch, epochs, augmentation);
how it maps onto the machine at hand (world size, accumulation, LR rescaling) is worked out elsewhere.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

from .errors import UserError

DATASETS = ('synthetic', 'fashion_mnist', 'fmnist', 'folder', 'streaming')  # besides hfds/NAME; see data.open_source
RECIPES_DIR = Path(__file__).resolve().parent / 'recipes'  # package data; the checkout's ./recipes links here


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as a string; recipes are full of such numbers, so read them as floats (YAML 1.2)."""


_Loader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:\d[\d_]*\.[\d_]*(?:[eE][-+]?\d+)?|\d[\d_]*[eE][-+]?\d+|\.\d[\d_]*(?:[eE][-+]?\d+)?'
               r'|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$'),
    list('-+0123456789.'))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _range(ge=None, gt=None, le=None, lt=None):
    return {'ge': ge, 'gt': gt, 'le': le, 'lt': lt}


def _f(default, **bounds):
    """A field with an optional numeric range, checked at load."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=_range(**bounds))
    return field(default=default, metadata=_range(**bounds))


Interpolation = Literal['nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos']  # PIL's, by timm's names


@dataclass
class ModelConfig:
    name: str = 'mobilenetv4_conv_small'
    num_classes: Optional[int] = _f(None, ge=1)  # None: taken from the dataset
    drop_rate: float = _f(0.0, ge=0, lt=1)  # classifier dropout
    drop_path_rate: float = _f(0.0, ge=0, lt=1)  # stochastic depth, linearly scaled over blocks by timm
    bn_momentum: Optional[float] = _f(None, gt=0, lt=1)  # torch convention (TF 0.997 -> 0.003)
    bn_eps: Optional[float] = _f(None, gt=0)
    pretrained_path: Optional[str] = None  # local weights to start from (fine-tuning); nothing is downloaded
    freeze: list = _f([])  # parameter name prefixes kept frozen, e.g. ['conv_stem', 'bn1', 'blocks.0']
    kwargs: dict = _f({})  # passed to timm.create_model as is


@dataclass
class DataConfig:
    dataset: str = 'synthetic'  # synthetic | fashion_mnist | folder | a timm dataset name ('hfds/...')
    data_dir: Optional[str] = None
    remote: Optional[str] = None  # streaming: MDS shards from python -m mnv_train.shard (s3://bucket/path, a folder)
    local: Optional[str] = None  # streaming: cache folder the shards are downloaded to (a local disk)
    # streaming, the training order: shards is StreamingDataset's own (num_canonical_nodes streams, each through its
    # share of the shards in turn); samples a uniform permutation, whose first batch needs nearly every shard
    stream_order: Literal['shards', 'samples'] = 'shards'
    # the settings that define the shards order (the shuffle seed is train.seed), pinned: the library's defaults
    # follow the first run's node count. 64: a multiple of the world size keeps each node on its own shards
    num_canonical_nodes: int = _f(64, ge=1)  # Mosaic's default for 1 node with py1s
    shuffle_algo: Literal['py1e', 'py1br', 'py1s', 'py2s', 'naive'] = 'py1e'  # Mosaic's default algorithm
    # samples over which py1e spreads a shard's samples, per canonical node. ImageNet in 64 MB shards, global batch
    # 4096: the first step needs 244 of 2209 shards; 1879 at Mosaic's default 262144 (streaming_order_cost.py)
    shuffle_block_size: int = _f(4096, ge=1)
    train_split: str = 'train'
    val_split: str = 'validation'
    img_size: int = _f(224, ge=8)
    eval_img_size: Optional[int] = _f(None, ge=8)  # None: img_size
    crop_pct: float = _f(0.875, gt=0, le=1)  # eval center crop fraction
    interpolation: Interpolation = 'bicubic'  # eval resize
    extra_evals: list = _f([])  # more [img_size, crop_pct] pairs evaluated each epoch, e.g. [[448, 1.0]]
    mean: Optional[list] = None  # None: the model's pretrained config
    std: Optional[list] = None
    num_workers: int = _f(2, ge=0)
    # evaluation loaders keep their workers alive between evaluations only if true: num_workers idle processes per
    # eval set and rank for the whole run, against a worker start-up per evaluation
    eval_persistent_workers: bool = False
    max_bad_fraction: float = _f(0.001, ge=0, le=1)  # unreadable training images an epoch may skip, as a share
    pipeline: Literal['host', 'dali'] = 'host'  # dali: NVIDIA DALI decodes and augments (pip install -e '.[dali]')
    synthetic_train_size: int = _f(512, ge=1)
    synthetic_val_size: int = _f(128, ge=1)
    synthetic_classes: int = _f(10, ge=2)


@dataclass
class TFRandAugmentConfig:
    """Google's RandAugment (mnv_train/augment.py); defaults are TF Model Garden's RandAugment config."""
    num_layers: int = _f(2, ge=0)
    magnitude: float = _f(10.0, ge=0)  # ops reach their full range at 10; not capped
    magnitude_std: float = _f(0.0, ge=0)
    prob_to_apply: Optional[float] = _f(None, ge=0, le=1)  # None: the chosen op always runs
    translate_const: float = _f(10.0, gt=0)  # pixels at magnitude 10
    cutout_const: float = _f(40.0, ge=0)  # half the cutout side, pixels at magnitude 10
    exclude_ops: list = _f([])  # e.g. [Cutout]


@dataclass
class AugConfig:
    scale: list = _f([0.08, 1.0])  # RandomResizedCrop area range
    ratio: list = _f([0.75, 1.3333333])
    hflip: float = _f(0.5, ge=0, le=1)
    color_jitter: float = _f(0.0, ge=0)
    auto_augment: Optional[str] = None  # timm string, e.g. rand-m9-mstd0.5-inc1
    tf_randaugment: Optional[TFRandAugmentConfig] = None  # Google's RandAugment instead of timm's (the *_tf recipes)
    train_interpolation: Literal[Interpolation, 'random'] = 'random'  # random: bilinear or bicubic per image
    reprob: float = _f(0.0, ge=0, le=1)  # random erasing, applied on the device
    remode: Literal['const', 'rand', 'pixel'] = 'pixel'
    recount: int = _f(1, ge=1)
    mixup: float = _f(0.0, ge=0)  # Beta alpha; 0 disables
    cutmix: float = _f(0.0, ge=0)
    cutmix_minmax: Optional[list] = None
    mixup_prob: float = _f(1.0, ge=0, le=1)
    mixup_switch_prob: float = _f(0.5, ge=0, le=1)
    mixup_mode: Literal['batch', 'pair', 'elem', 'google'] = 'batch'  # google: augment.GoogleMixup
    mixup_off_epoch: int = _f(0, ge=0)  # turn mixup/cutmix off from this epoch; 0 never
    aug_repeats: int = _f(0, ge=0)  # timm RepeatAugSampler repeats; 0 off


@dataclass
class LossConfig:
    smoothing: float = _f(0.1, ge=0, lt=1)
    bce: bool = False


@dataclass
class OptimConfig:
    name: str = 'adamw'  # any timm optimizer name: adamw, lamb, sgd, rmsproptf, ...
    lr: float = _f(1e-3, gt=0)  # at train.global_batch_size
    lr_scale_rule: Literal['auto', 'linear', 'sqrt', 'none'] = 'auto'  # auto: sqrt for adaptive, linear else
    betas: Optional[list] = None
    eps: Optional[float] = _f(None, gt=0)
    momentum: float = _f(0.9, ge=0, lt=1)
    weight_decay: float = _f(0.05, ge=0)
    # which tensors get no decay: '1d' every 1-D tensor (biases, norm weights, layer scales), as timm;
    # 'bn' only BatchNorm weights and biases, as Google's TF configs
    weight_decay_exclude: Literal['1d', 'bn'] = '1d'
    layer_decay: Optional[float] = _f(None, gt=0, le=1)
    clip_grad: Optional[float] = _f(None, gt=0)
    clip_mode: Literal['norm', 'value', 'agc'] = 'norm'


@dataclass
class TrainSizeRampConfig:
    """Progressive resolution, as FFCV trains ResNet-50: start_size up to start_epoch, then a linear ramp to
    data.img_size at end_epoch, each size rounded to `step`. The size is a function of the epoch alone (see
    data.epoch_train_size), so exact resume and the world-size invariance hold; evaluation keeps its sizes."""
    start_size: int = _f(160, ge=8)  # px, the train size up to start_epoch
    start_epoch: int = _f(0, ge=0)  # epochs (0-based) at start_size before the ramp begins
    end_epoch: int = _f(1, ge=1)  # the first epoch (0-based) at data.img_size
    step: Optional[int] = _f(None, ge=1)  # px the ramp's sizes are rounded to; None: 32, or 8 below 64 px (FFCV: 32)


@dataclass
class ScheduleConfig:
    epochs: int = _f(10, ge=1)
    sched: str = 'cosine'
    warmup_epochs: float = _f(0.0, ge=0)
    warmup_lr: float = _f(0.0, ge=0)
    min_lr: float = _f(0.0, ge=0)
    cooldown_epochs: int = _f(0, ge=0)
    train_size_ramp: Optional[TrainSizeRampConfig] = None  # progressive resolution; None: every epoch at img_size


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = _f(0.9998, gt=0, lt=1)  # per optimizer step at train.global_batch_size
    warmup: bool = False  # ModelEmaV3's decay warmup; off as in timm's train.py (0.9998 is reached only at ~354k steps)
    start_step: int = _f(0, ge=0)  # EMA starts after this many steps at the recipe's global batch


@dataclass
class DistillConfig:
    """Knowledge distillation from a local teacher (mnv_train/distill.py); off while `teacher` is empty."""
    teacher: str = ''  # timm model name of the teacher
    teacher_path: Optional[str] = None  # its weights: an mnv-train checkpoint, timm .pth or .safetensors; no download
    img_size: Optional[int] = _f(None, ge=8)  # the teacher's input size; None: its recipe's, else the student's
    mean: Optional[list] = None  # the teacher's normalisation; None: its recipe's, else timm's pretrained cfg
    std: Optional[list] = None
    type: Literal['logit', 'feature'] = 'logit'  # softened logits, or pooled pre-logit features
    loss: Literal['kl', 'mse'] = 'kl'  # what timm offers: kl for logits, mse for features
    temperature: float = _f(1.0, gt=0)  # logit distillation's softmax temperature
    task_loss_weight: float = _f(1.0, ge=0)  # loss = task weight x task loss + distill weight x distillation loss
    distill_loss_weight: float = _f(1.0, ge=0)
    projection: bool = True  # feature distillation: a learned linear map when the feature sizes differ


@dataclass
class WandbConfig:
    """Weights & Biases (pip install -e '.[wandb]'); WANDB_MODE=offline is honoured."""
    project: str = ''  # empty: off
    entity: Optional[str] = None
    tags: list = _f([])


@dataclass
class MlflowConfig:
    """MLflow (pip install -e '.[mlflow]')."""
    experiment: str = ''  # empty: off
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else a SQLite store in the run folder


@dataclass
class TrainConfig:
    global_batch_size: int = _f(256, ge=1)  # the batch the LR and EMA decay are stated for
    batch_size: int = _f(128, ge=1)  # per device, the most that fits in memory
    amp: Literal['none', 'bf16', 'fp16'] = 'none'
    channels_last: bool = True
    compile: bool = False
    # torch.compile's mode when train.compile; python -m mnv_train.bench --compile-modes measures each
    compile_mode: Literal['default', 'max-autotune-no-cudagraphs', 'reduce-overhead'] = 'default'
    sync_bn: bool = False
    # BatchNorm running statistics under DDP: 'reduce' averages them over ranks after every optimizer step, so
    # evaluation and checkpoints see every rank's batches; 'broadcast' keeps DDP's default (rank 0's)
    dist_bn: Literal['reduce', 'broadcast'] = 'reduce'
    seed: int = 42
    # CUDA only (CPU runs are bit-reproducible either way): true = deterministic kernels everywhere, cuDNN and
    # cuBLAS included, so a GPU run resumes bit-identically, at a cost in speed; false = cuDNN autotuning (fast)
    deterministic: bool = False
    eval_every: int = _f(1, ge=1)  # epochs
    # Epochs between evaluations of data.extra_evals and between fit checks (train.fit_check_images); the last epoch
    # always. Both run only after epochs that train.eval_every evaluates: choose multiples of it.
    extra_eval_every: int = _f(1, ge=1)
    fit_check_every: int = _f(1, ge=1)
    log_every: int = _f(50, ge=1)  # optimizer steps
    keep_checkpoints: int = _f(2, ge=1)  # step checkpoints kept besides last and best
    keep_best_checkpoints: int = _f(0, ge=0)  # also keep the k best-evaluated ones (python -m mnv_train.average)
    checkpoint_every_steps: int = _f(0, ge=0)  # 0: only at epoch ends
    checkpoint_every_minutes: float = _f(0.0, ge=0)
    max_bad_steps: int = _f(20, ge=1)  # consecutive non-finite losses before rolling back
    lock_stale_minutes: float = _f(10.0, ge=10)  # a lock whose heartbeat is older is taken over; below 10
    # minutes an evaluation, a compile or another host's clock could make a live job's lock look stale
    precise_bn_batches: int = _f(0, ge=0)  # recompute BN statistics over this many train batches before eval
    fit_check_images: int = _f(10000, ge=0)  # training images evaluated like validation ones, for the fit hint
    eval_suite: Literal['none', 'imagenet'] = 'none'  # last weights on train.py --data-root's sets (validate --suite)
    wandb: Optional[WandbConfig] = None  # experiment trackers, besides TensorBoard and the CSV files
    mlflow: Optional[MlflowConfig] = None


@dataclass
class Provenance:
    source: str = ''
    notes: str = ''
    expected_top1: Optional[float] = _f(None, ge=0, le=100)  # at the train resolution
    expected_top1_eval: Optional[float] = _f(None, ge=0, le=100)  # at eval_img_size / eval_crop_pct
    eval_img_size: Optional[int] = _f(None, ge=8)
    eval_crop_pct: Optional[float] = _f(None, gt=0, le=1)


@dataclass
class Recipe:
    name: str = 'unnamed'
    description: str = ''
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    provenance: Provenance = field(default_factory=Provenance)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- validation

def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return 'one of ' + ', '.join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, '__name__', str(tp))


def _check_value(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(value, options[0], path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f'{path}: {value!r} is not {_type_name(tp)}')
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f'{path}: expected true/false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f'{path}: expected an integer, got {value!r}')
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f'{path}: expected a number, got {value!r}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f'{path}: expected a string, got {value!r}')
        return value
    if tp is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f'{path}: expected a list, got {value!r}')
        return list(value)
    if tp is dict:
        if not isinstance(value, dict):
            raise UserError(f'{path}: expected a mapping, got {value!r}')
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    raise TypeError(f'unsupported schema type {tp} at {path}')


def _check_range(value, bounds: dict, path: str):
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    checks = {'ge': (lambda a, b: a >= b, '>='), 'gt': (lambda a, b: a > b, '>'),
              'le': (lambda a, b: a <= b, '<='), 'lt': (lambda a, b: a < b, '<')}
    for key, (ok, symbol) in checks.items():
        bound = bounds.get(key)
        if bound is not None and not ok(value, bound):
            raise UserError(f'{path}: {value!r} must be {symbol} {bound}')


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f'{path or "recipe"}: expected a mapping, got {data!r}')
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f'{path}.{key}' if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f'; did you mean {close[0]!r}?' if close else f'; valid keys: {", ".join(fields)}'
            raise UserError(f'unknown recipe key {where!r}{hint}')
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        where = f'{path}.{name}' if path else name
        values[name] = _check_value(data[name], hints[name], where)
        _check_range(data[name], f.metadata, where)
    return cls(**values)


def _check_consistency(recipe: Recipe):
    for key in ('scale', 'ratio', 'cutmix_minmax'):
        pair = getattr(recipe.aug, key)
        if pair is not None and (len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair)
                                 or not 0 < pair[0] <= pair[1]):
            raise UserError(f'aug.{key}: expected [low, high] numbers with 0 < low <= high, got {pair!r}')
    if recipe.aug.auto_augment:
        _check_auto_augment(recipe.aug.auto_augment)
    for key in ('mean', 'std'):
        values = getattr(recipe.data, key)
        if values is not None and (len(values) != 3 or not all(isinstance(v, (int, float)) for v in values)):
            raise UserError(f'data.{key}: expected 3 numbers, got {values!r}')
    if recipe.optim.betas is not None and (len(recipe.optim.betas) != 2 or not all(
            isinstance(b, (int, float)) and 0 <= b < 1 for b in recipe.optim.betas)):
        raise UserError(f'optim.betas: expected two numbers in [0, 1), got {recipe.optim.betas!r}')
    for pair in recipe.data.extra_evals:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], int)
                or not isinstance(pair[1], (int, float)) or not 0 < pair[1] <= 1 or pair[0] < 8):
            raise UserError(f'data.extra_evals: expected [img_size, crop_pct] pairs, got {pair!r}')
    dataset = recipe.data.dataset
    if dataset.split('/')[0] in ('tfds', 'wds', 'hfids'):
        raise UserError(f'data.dataset {dataset!r}: iterable datasets cannot be resumed exactly; '
                        f'use an image folder or hfds/')
    if dataset == 'streaming' and not (recipe.data.remote and recipe.data.local):
        raise UserError('data.dataset streaming needs data.remote (where the shards are: s3://bucket/path or a '
                        'folder) and data.local (a cache folder on a local disk)')
    if dataset == 'streaming' and recipe.data.stream_order == 'shards' and recipe.aug.aug_repeats:
        raise UserError('aug.aug_repeats needs data.stream_order samples: StreamingDataset\'s shard order has each '
                        'sample once an epoch')
    if dataset not in DATASETS and not dataset.startswith('hfds/'):
        close = difflib.get_close_matches(dataset, DATASETS, n=1, cutoff=0.5)
        hint = f'did you mean {close[0]!r}? ' if close else ''
        raise UserError(f'data.dataset {dataset!r} is not a dataset here ({hint}one of {", ".join(DATASETS)}, or '
                        f'hfds/NAME for a Hugging Face dataset)')
    distill = recipe.distill
    if distill.teacher and not distill.teacher_path:
        raise UserError(f'distill.teacher {distill.teacher!r} needs distill.teacher_path: nothing is downloaded')
    if (distill.type, distill.loss) not in (('logit', 'kl'), ('feature', 'mse')):
        raise UserError(f'distill.loss {distill.loss!r} does not go with distill.type {distill.type!r}: timm '
                        f'distils logits with kl and features with mse')
    for key in ('mean', 'std'):
        values = getattr(distill, key)
        if values is not None and (len(values) != 3 or not all(isinstance(v, (int, float)) for v in values)):
            raise UserError(f'distill.{key}: expected 3 numbers, got {values!r}')
    if recipe.aug.auto_augment and recipe.aug.tf_randaugment is not None:
        raise UserError('aug.auto_augment and aug.tf_randaugment both set: choose timm\'s or Google\'s RandAugment '
                        '(set the other to null)')
    _check_train_size_ramp(recipe)
    if recipe.schedule.warmup_epochs >= recipe.schedule.epochs:
        raise UserError(f'schedule.warmup_epochs ({recipe.schedule.warmup_epochs}) must be below '
                        f'schedule.epochs ({recipe.schedule.epochs})')


def _check_train_size_ramp(recipe: Recipe):
    ramp, img_size = recipe.schedule.train_size_ramp, recipe.data.img_size
    if ramp is None:
        return
    epochs = recipe.schedule.epochs + recipe.schedule.cooldown_epochs
    if ramp.start_size >= img_size:
        raise UserError(f'schedule.train_size_ramp.start_size ({ramp.start_size}) must be below data.img_size '
                        f'({img_size}): the ramp ends at data.img_size')
    if not ramp.start_epoch < ramp.end_epoch < epochs:
        raise UserError(f'schedule.train_size_ramp: expected start_epoch ({ramp.start_epoch}) < end_epoch '
                        f'({ramp.end_epoch}) < the run\'s {epochs} epochs (end_epoch is the first at data.img_size)')
    if recipe.data.pipeline == 'dali':
        raise UserError('schedule.train_size_ramp runs with data.pipeline host only: set train_size_ramp null or use '
                        'the host pipeline')


# keys taken out of the schema -> (the value every recipe saved before held, which is dropped, so old checkpoints and
# run folders still load; what to use instead of any other value)
RETIRED = {('data', 'decode'): ('host', 'decoding on the device did not beat the host pipeline end to end; '
                                        'data.pipeline dali decodes on the GPU and runs RandAugment there: set it, '
                                        'or drop data.decode')}


def _without_retired(data: dict) -> dict:
    for (section, key), (saved, instead) in RETIRED.items():
        part = data.get(section)
        if isinstance(part, dict) and key in part:
            if part[key] != saved:
                raise UserError(f'{section}.{key} {part[key]!r} was retired: {instead}')
            data = {**data, section: {name: value for name, value in part.items() if name != key}}
    return data


def as_saved(data: dict) -> dict:
    """A checkpoint's recipe with the values it ran with, where it predates a key whose default is not what it did:
    streamed runs read the shards in a uniform permutation before data.stream_order (and its default, shards)."""
    part = data.get('data') if isinstance(data, dict) else None
    if isinstance(part, dict) and part.get('dataset') == 'streaming' and 'stream_order' not in part:
        data = {**data, 'data': {**part, 'stream_order': 'samples'}}
    return data


def from_dict(data: dict) -> Recipe:
    recipe = _build(Recipe, _without_retired(data) if isinstance(data, dict) else data, '')
    _check_consistency(recipe)
    return recipe


def _check_auto_augment(policy: str):
    """aug.auto_augment read by timm's own parser now, not when the first worker builds its transform."""
    build = (rand_augment_transform if policy.startswith('rand') else augment_and_mix_transform
             if policy.startswith('augmix') else auto_augment_transform)
    try:
        build(policy, {})
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(f'aug.auto_augment {policy!r} is not a policy timm reads ({e or type(e).__name__}); e.g. '
                        f'rand-m9-mstd0.5-inc1, augmix-m5-w4-d2 or original') from None


# ---------------------------------------------------------------------------------------------- loading

def resolve_path(name_or_path: str, relative_to: Optional[Path] = None) -> Path:
    """`mnv4_hybrid_large` -> recipes/mnv4_hybrid_large.yaml; a path is taken as it is. A base is looked for
    beside the recipe naming it first, so that an edited copy of a shipped recipe there is the one inherited."""
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.append(relative_to / name_or_path)
    if not name_or_path.endswith(('.yaml', '.yml')):
        if relative_to is not None:
            candidates.append(relative_to / f'{name_or_path}.yaml')
        candidates += [RECIPES_DIR / f'{name_or_path}.yaml']
    for path in candidates:
        if path.is_file():
            return path
    known = sorted(p.stem for p in RECIPES_DIR.glob('*.yaml'))
    close = difflib.get_close_matches(Path(name_or_path).stem, known, n=1, cutoff=0.5)
    hint = f'; did you mean {close[0]!r}?' if close else ' (train.py --list-recipes shows them)'
    raise UserError(f'recipe {name_or_path!r} not found{hint}')


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != 'kwargs':
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_file(path: Path) -> dict:
    """A recipe file's mapping; a file that is not UTF-8 YAML text holding a mapping is a UserError naming it."""
    try:
        data = yaml_load(path.read_text(encoding='utf-8'))  # whatever the locale: recipes are UTF-8
    except UnicodeDecodeError as e:
        raise UserError(f'{path}: not a UTF-8 text file (byte {e.start} is 0x{e.object[e.start]:02x})') from None
    except IsADirectoryError:
        raise UserError(f'{path} is a folder, not a recipe file') from None
    except OSError as e:
        raise UserError(f'cannot read {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark is not None else ''
        raise UserError(f'{path}{where}: not valid YAML ({getattr(e, "problem", e)})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f'{path}: a recipe must be a mapping of sections, got {type(data).__name__}')
    return data


def load_raw(name_or_path: str, _seen: tuple = ()) -> dict:
    """The recipe as a dict with its `base:` chain merged in (base first, this file on top)."""
    path = resolve_path(name_or_path)
    if path.resolve() in _seen:
        raise UserError(f'{path}: recipe base chain loops back on itself')
    data = read_yaml_file(path)
    data.setdefault('name', path.stem)
    base = data.pop('base', None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f'{path}: base must be a recipe name or path, got {base!r}')
    base_data = load_raw(str(resolve_path(base, relative_to=path.parent)), _seen + (path.resolve(),))
    base_data.pop('name', None)
    base_data.pop('provenance', None)  # where a recipe's numbers come from is never inherited
    return _merge(base_data, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if '=' not in text:
        raise UserError(f'--set {text!r}: expected key.path=value')
    key, raw = text.split('=', 1)
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split('.'), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise UserError(f'--set {text!r}: {key!r} is not a section')
            node = child
        node[keys[-1]] = value
    return data


def load(name_or_path: str, overrides: Optional[list[str]] = None) -> Recipe:
    return from_dict(apply_overrides(load_raw(name_or_path), overrides or []))


def list_recipes() -> list[Recipe]:
    return [load(str(path)) for path in sorted(RECIPES_DIR.glob('*.yaml'))]


def flatten(section: dict, prefix: str = '', whole: tuple[str, ...] = ()) -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}; lists, and the sections named in `whole`, stay whole values."""
    flat = {}
    for key, value in section.items():
        path = f'{prefix}{key}'
        if isinstance(value, dict) and path not in whole:
            flat.update(flatten(value, f'{path}.', whole))
        else:
            flat[path] = value
    return flat
