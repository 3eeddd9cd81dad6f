"""Assembles a run from a recipe, for this process: data, model, EMA, optimizer, schedule, loaders."""
from __future__ import annotations

import contextlib
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from . import dali_pipeline, data, finetune, logs, pipeline
from . import model as models
from .checkpoint import Checkpointer
from .distill import Distillation, build_distillation
from .distributed import World
from .errors import UserError
from .logs import MetricsLog
from .optim import BatchPlan, TrainLoss, create_optimizer, create_scheduler, plan_batch, total_epochs
from .recipe import Recipe
from .resume import TrainState


@dataclass
class Run:
    recipe: Recipe
    world: World
    plan: BatchPlan
    run_dir: Path
    module: torch.nn.Module  # the plain model: state_dict, EMA, evaluation
    model: torch.nn.Module  # what trains: maybe compiled, maybe DDP-wrapped
    ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    distillation: Optional[Distillation]  # a teacher and timm's distillation task, when the recipe has one
    train_sampler: data.EpochSampler
    train_loader: torch.utils.data.DataLoader | dali_pipeline.DaliLoader
    steps_per_epoch: int
    evals: list
    fit_check: Optional[pipeline.EvalSet]  # training images evaluated like validation ones (train.fit_check_images)
    train_input: data.DeviceNormalize  # collated train batch -> normalised device batch
    normalize: data.DeviceNormalize  # the same for evaluation batches
    augment: data.BatchAugment
    checkpointer: Checkpointer
    metrics: MetricsLog
    state: TrainState = field(default_factory=TrainState)

    @property
    def epochs(self) -> int:
        return total_epochs(self.recipe.schedule)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.plan.global_batch

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer updates, for gradient clipping: the model's, then feature distillation's
        projection."""
        projection = self.distillation.projection if self.distillation is not None else None
        return [*self.module.parameters(), *(projection.parameters() if projection is not None else [])]

    def autocast(self):
        return models.autocast(self.recipe.train.amp, self.world.device)

    def no_sync(self, finishing: bool):
        """Skip DDP's gradient all-reduce on accumulation micro-steps."""
        wrapped = getattr(self.model, '_orig_mod', self.model)  # under torch.compile's wrapper, when compiled
        if finishing or not isinstance(wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a micro-batch: the task's, plus the teacher's term when distilling."""
        if self.distillation is not None:
            return self.distillation.task(images, targets)['loss']
        return self.loss_fn(self.model(images), targets)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]['lr']


# DDP keyword that stops it from copying rank 0's buffers (BatchNorm statistics) to every rank at each forward:
# torch 2.14 renamed it and deprecates the old name, which older torch still needs
BUFFERS_PER_RANK = ({'forward_sync_buffers': False}
                    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters
                    else {'broadcast_buffers': False})


def check_amp(amp: str, device: torch.device):
    if amp == 'fp16' and device.type != 'cuda':
        raise UserError('train.amp fp16 needs a CUDA device; use bf16 or none on CPU (--set train.amp=none)')


def set_determinism(deterministic: bool):
    """Deterministic kernels on every device, or cuDNN's autotuned (fastest, not reproducible) ones.

    cuBLAS needs its workspace configured before its first use for deterministic matmuls. An op with no
    deterministic kernel warns (warn_only) rather than stopping a run.
    """
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def create_ema(module: torch.nn.Module, plan: BatchPlan, recipe: Recipe) -> ModelEmaV3:
    """timm's ModelEmaV3 with the decay and start step rescaled to this run's global batch."""
    return ModelEmaV3(module, decay=plan.ema_decay, use_warmup=recipe.ema.warmup,
                      update_after_step=plan.ema_start_step)


def use_sync_bn(wanted: bool, world: World) -> bool:
    """SyncBatchNorm only means something across processes, and torch runs it on CUDA devices only."""
    if wanted and world.distributed and world.device.type != 'cuda':
        logs.warn('train.sync_bn: SyncBatchNorm needs CUDA devices; this run keeps per-process BatchNorm')
    return wanted and world.distributed and world.device.type == 'cuda'


def compile_telling_time(model: torch.nn.Module, mode: str, input_sizes: int = 1) -> torch.nn.Module:
    """torch.compile(model, mode). Compiling happens in the first forward and can take minutes on a large model:
    that forward's time is printed once, so start-up is not held up silently.

    With several input sizes (progressive resolution) each size gets its own graph compiled for its static shapes
    (dynamic=False): by default the second size would be recompiled with dynamic shapes, slower kernels for every
    size after it. Dynamo's recompile limit (8 graphs a frame) is raised to fit them all."""
    if input_sizes > 1:
        limit = 'recompile_limit' if hasattr(torch._dynamo.config, 'recompile_limit') else 'cache_size_limit'
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), input_sizes))
    compiled = torch.compile(model, mode=mode, dynamic=False if input_sizes > 1 else None)
    started = []

    def before(module, args):
        started.append(time.perf_counter())

    def after(module, args, output):
        for handle in handles:
            handle.remove()
        logs.summary(f'train.compile ({mode}): the first forward took {time.perf_counter() - started[0]:.1f} s, '
                     f'compiling included')

    handles = [compiled.register_forward_pre_hook(before), compiled.register_forward_hook(after)]
    return compiled


def build_model(recipe: Recipe, num_classes: int, sync_bn: bool) -> torch.nn.Module:
    """The model as it trains: created, SyncBatchNorm if asked, then initialised and frozen as the recipe says.

    The conversion comes first so that freezing registers its hooks on the layers that will run, and the EMA,
    copied from this module later, holds the same layers.
    """
    module = models.create(recipe.model, num_classes)
    if sync_bn:
        module = models.sync_batchnorm(module)
    for note in finetune.prepare(module, recipe.model, recipe.data.img_size):
        logs.warn(note)
    return module


def build_run(recipe: Recipe, world: World, run_dir: Path, global_batch: Optional[int] = None,
              per_device_batch: Optional[int] = None) -> Run:
    train_cfg = recipe.train
    check_amp(train_cfg.amp, world.device)
    set_determinism(train_cfg.deterministic)
    data.seed_everything(train_cfg.seed)  # same initial weights on every rank

    streaming = recipe.data.dataset == 'streaming'
    if streaming:
        data.make_shard_cache(recipe.data.local, world)
    train_source = data.open_source(recipe.data, recipe.data.train_split, train_cfg.seed)
    val_source = data.open_source(recipe.data, recipe.data.val_split, train_cfg.seed)
    in_data = getattr(train_source, 'num_classes', None)
    num_classes = recipe.model.num_classes or in_data
    if not num_classes:
        raise UserError(f'cannot tell the number of classes of {recipe.data.dataset}; set model.num_classes')
    if in_data and num_classes < in_data:  # its labels would index past the logits at the first step
        raise UserError(f'model.num_classes {num_classes} is below the {in_data} classes of the training data; '
                        f'leave it out to take them from the data')

    module = build_model(recipe, num_classes, sync_bn=use_sync_bn(train_cfg.sync_bn, world))
    norm = data.resolve_normalization(recipe.data, module)
    module = models.prepare(module, world.device, train_cfg.channels_last)
    plan = plan_batch(recipe, world.size, global_batch, per_device_batch)
    ema = create_ema(module, plan, recipe) if recipe.ema.enabled else None

    train_sizes = data.train_sizes(recipe.data.img_size, recipe.schedule.train_size_ramp,
                                   total_epochs(recipe.schedule))
    train_sampler = data.EpochSampler(len(train_source), world.rank, world.size, train_cfg.seed,
                                      recipe.aug.aug_repeats, plan.per_device, plan.accum_steps, train_sizes,
                                      data.own_order(train_source))
    steps_per_epoch = train_sampler.steps
    if steps_per_epoch == 0:
        raise UserError(f'{recipe.data.dataset} has {len(train_source)} training samples, fewer than one global '
                        f'batch of {plan.global_batch}; lower train.global_batch_size')
    train_loader, train_input = pipeline.training_input(recipe, train_source, train_sampler, norm, world,
                                                        plan.per_device)

    loss_fn = TrainLoss(recipe.loss)
    distillation = None
    if recipe.distill.teacher:
        distillation = build_distillation(recipe.distill, module, loss_fn, norm, num_classes, recipe.data.img_size,
                                          world.device, train_cfg.channels_last)
    model = distillation.task.trainable_module if distillation else module  # what trains: maybe + a projection
    optimizer = create_optimizer(model, recipe.optim, plan.lr, fused=world.device.type == 'cuda')
    scheduler = create_scheduler(optimizer, recipe.schedule, steps_per_epoch)
    if world.distributed:  # never the teacher, which is not in `model`
        model = DistributedDataParallel(model, device_ids=[world.device] if world.device.type == 'cuda' else None,
                                        **({} if train_cfg.dist_bn == 'broadcast' else BUFFERS_PER_RANK))
    if train_cfg.compile:  # the DDP-wrapped model, as torch documents: the graph breaks at DDP's buckets, so that
        model = compile_telling_time(model, train_cfg.compile_mode,  # each bucket's all-reduce overlaps the backward
                                     len(set(train_sizes or [recipe.data.img_size])))
    if distillation:
        distillation.task.trainable_module = model

    return Run(
        recipe=recipe, world=world, plan=plan, run_dir=Path(run_dir), module=module, model=model, ema=ema,
        optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(world.device.type, enabled=train_cfg.amp == 'fp16'),
        loss_fn=loss_fn, distillation=distillation, train_sampler=train_sampler, train_loader=train_loader,
        steps_per_epoch=steps_per_epoch, evals=pipeline.eval_sets(recipe, val_source, norm, world, plan.per_device),
        fit_check=(pipeline.fit_check_set(recipe, train_source, norm, world, plan.per_device)
                   if train_cfg.fit_check_images else None),
        train_input=train_input, normalize=data.DeviceNormalize(norm, world.device, train_cfg.channels_last),
        augment=data.BatchAugment(recipe.aug, num_classes, recipe.loss.smoothing, world.device),
        checkpointer=Checkpointer(Path(run_dir) / 'checkpoints', train_cfg.keep_checkpoints, world.is_main,
                                  train_cfg.keep_best_checkpoints, train_cfg.checkpoint_every_steps,
                                  train_cfg.checkpoint_every_minutes),
        metrics=MetricsLog(Path(run_dir), world.is_main))
