"""What is optimised and how: loss, optimizer, LR schedule, and the batch plan that fits a recipe to a cluster."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2

from .data import mixes_batches
from .errors import UserError
from .recipe import LossConfig, OptimConfig, Recipe, ScheduleConfig

# ---------------------------------------------------------------------------------------------- batch plan

def lr_scale_rule(optim: OptimConfig) -> str:
    """timm's rule: sqrt for adaptive optimizers (adam*, lamb), linear otherwise."""
    if optim.lr_scale_rule != 'auto':
        return optim.lr_scale_rule
    name = optim.name.lower()
    return 'sqrt' if any(key in name for key in ('ada', 'lamb')) else 'linear'


@dataclass
class BatchPlan:
    """The recipe's global batch mapped onto this world size, and the LR / EMA decay that follow from it."""
    world_size: int
    per_device: int
    accum_steps: int
    recipe_global_batch: int
    asked_global_batch: int  # the recipe's, or --global-batch
    lr: float
    lr_rule: str
    ema_decay: float
    ema_start_step: int
    notes: list = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.per_device * self.accum_steps

    @property
    def batch_ratio(self) -> float:
        return self.global_batch / self.recipe_global_batch

    def report(self, recipe: Recipe) -> str:
        ema = (f'{recipe.ema.decay:g} -> {self.ema_decay:.6g} per step (same horizon in samples)'
               if recipe.ema.enabled else 'off')
        lines = [
            'batch plan',
            f'  recipe global batch   {self.recipe_global_batch}',
            f'  this run              {self.world_size} process(es) x {self.per_device} per device '
            f'x {self.accum_steps} accumulation = {self.global_batch}',
            f'  lr                    {recipe.optim.lr:g} -> {self.lr:.6g} ({self.lr_rule} rule, '
            f'ratio {self.batch_ratio:.4g})',
            f'  ema decay             {ema}',
        ]
        return '\n'.join(lines + [f'  note: {n}' for n in self.notes])


def plan_batch(recipe: Recipe, world_size: int, global_batch: Optional[int] = None,
               per_device: Optional[int] = None) -> BatchPlan:
    """Keep the recipe's global batch with gradient accumulation; where that is impossible, rescale LR and EMA."""
    reference = recipe.train.global_batch_size
    target = global_batch or reference
    max_per_device = per_device or recipe.train.batch_size
    accum = max(1, math.ceil(target / (world_size * max_per_device)))
    fitted = max(1, target // (world_size * accum))
    notes = []
    if global_batch and global_batch != reference:
        notes.append(f'global batch overridden: {reference} -> {global_batch}')
    if fitted % 2 and mixes_batches(recipe.aug):
        accum, fitted = even_split(target, world_size, accum, max_per_device)
        notes.append(f'Mixup/CutMix pair images within a device batch, so it must be even: {fitted} per device')
    if world_size * accum * fitted != target:
        notes.append(f'{target} does not split over {world_size} process(es); using the nearest, '
                     f'{world_size * accum * fitted}')
    ratio = world_size * accum * fitted / reference
    rule = lr_scale_rule(recipe.optim)
    power = {'linear': 1.0, 'sqrt': 0.5, 'none': 0.0}[rule]
    return BatchPlan(world_size=world_size, per_device=fitted, accum_steps=accum, recipe_global_batch=reference,
                     asked_global_batch=target, lr=recipe.optim.lr * ratio ** power, lr_rule=rule,
                     ema_decay=recipe.ema.decay ** ratio, ema_start_step=round(recipe.ema.start_step / ratio),
                     notes=notes)


def trajectory_note(recipe: Recipe, plan: BatchPlan) -> Optional[str]:
    """A line for a run whose per-device batch is not the one its global batch gets on one device. The trajectory is
    the same for any world size and accumulation at that per-device batch; another one regroups the images."""
    reference = plan_batch(recipe, 1, plan.asked_global_batch).per_device
    if plan.per_device == reference:
        return None
    return (f'per-device batch {plan.per_device} ({plan.world_size} process(es) x accumulation {plan.accum_steps}), '
            f'not the {reference} that the global batch {plan.asked_global_batch} gets on one device (train.batch_size '
            f'{recipe.train.batch_size}): the trajectory will differ from the recipe\'s reference, since the '
            f'micro-batches change (which images share BatchNorm statistics and Mixup/CutMix pairs, and the random '
            f'draws of each); any world size and accumulation at {reference} per device would keep it')


def even_split(target: int, world_size: int, min_accum: int, max_per_device: int) -> tuple[int, int]:
    """(accumulation, even per-device batch) whose global batch is nearest `target`; a step or two more
    accumulation than the fewest that fit is allowed when it lands closer (ties go to less accumulation)."""
    if max_per_device < 2:
        raise UserError('Mixup/CutMix needs at least 2 images per device: raise train.batch_size')
    candidates = []
    for accum in range(min_accum, min_accum + 3):
        below = max(2, 2 * math.floor(target / (world_size * accum) / 2))
        for per_device in (below, below + 2):
            if per_device <= max_per_device:
                candidates.append((abs(world_size * accum * per_device - target), accum, per_device))
    _, accum, per_device = min(candidates)
    return accum, per_device


# ---------------------------------------------------------------------------------------------- optimizer

def create_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, fused: bool = False):
    if cfg.name.lower() not in list_optimizers():
        raise UserError(f'optim.name {cfg.name!r} is not a timm optimizer (e.g. adamw, lamb, sgd, rmsproptf)')
    kwargs = {}
    if cfg.betas is not None:
        kwargs['betas'] = tuple(cfg.betas)
    if cfg.eps is not None:
        kwargs['eps'] = cfg.eps
    if fused and cfg.name.lower() in ('adam', 'adamw', 'sgd', 'momentum'):
        kwargs['fused'] = True
    if cfg.weight_decay_exclude == 'bn':
        kwargs['param_group_fn'] = batchnorm_only_exclusion(cfg)
    try:
        return create_optimizer_v2(model, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, layer_decay=cfg.layer_decay, **kwargs)
    except TypeError as e:
        raise UserError(f'optim settings do not fit {cfg.name}: {e}') from None


def batchnorm_only_exclusion(cfg: OptimConfig):
    """timm's parameter grouping with Google's decay rule: every tensor decays but BatchNorm weights and biases
    (timm's default also spares biases and layer-scale gammas, e.g. 35 of them in MNV4-Hybrid-L)."""
    def groups(model: torch.nn.Module):
        spared = [f'{layer_name}.{name}' if layer_name else name
                  for layer_name, layer in model.named_modules()
                  if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
                  for name, _ in layer.named_parameters(recurse=False)]
        if cfg.layer_decay is not None:
            return param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
                                            weight_decay_exclude_1d=False, no_weight_decay_list=spared)
        return param_groups_weight_decay(model, weight_decay=cfg.weight_decay, weight_decay_exclude_1d=False,
                                         no_weight_decay_list=spared)
    return groups


def create_scheduler(optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
    """Stepped once per optimizer step (step_update), warmup included; epochs may be fractional."""
    try:
        scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                           warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                           min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
                                           step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    except (ValueError, AssertionError) as e:
        raise UserError(f'schedule.sched {cfg.sched!r}: {e}') from None
    if scheduler is None and cfg.sched != 'none':
        raise UserError(f'schedule.sched {cfg.sched!r} is not a timm scheduler (e.g. cosine, step, constant)')
    return scheduler


def total_epochs(cfg: ScheduleConfig) -> int:
    return cfg.epochs + cfg.cooldown_epochs


# ---------------------------------------------------------------------------------------------- loss

class TrainLoss(torch.nn.Module):
    """Hard labels get label smoothing here; Mixup/CutMix targets arrive already smoothed and mixed."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.smoothing = cfg.smoothing
        self.bce = BinaryCrossEntropy(smoothing=cfg.smoothing) if cfg.bce else None
        self.soft = SoftTargetCrossEntropy()

    def forward(self, logits, target):
        if self.bce is not None:
            return self.bce(logits, target)
        if target.is_floating_point():
            return self.soft(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)
