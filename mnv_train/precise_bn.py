"""BatchNorm recalibration ("precise BN"): running statistics recomputed for the weights as they are now.

Running averages blend the statistics of many past weights. With a low BN momentum, after fast changes, or
for averaged weights (EMA, checkpoint averages) they no longer describe what the current weights compute, and
evaluation suffers. Averaging the batch statistics of a few training batches through the current weights
repairs that.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Sequence, Union

import torch
from torch import nn

from . import data, finetune, logs, pipeline
from .model import autocast


def recalibrate(model: Union[nn.Module, Sequence[nn.Module]], batches: Iterable[torch.Tensor],
                num_batches: int) -> int:
    """Set the running mean/var of model's BatchNorm layers to their average over num_batches input batches.

    Several models (raw and EMA weights) can share one pass over the data. Only BatchNorm runs in training
    mode, so dropout and stochastic depth stay off as at evaluation; frozen layers (model.freeze) keep their
    statistics. Returns the number of batches used; with none, nothing changes.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    layers = [layer for m in models for layer in m.modules()
              if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
              and not finetune.has_frozen_statistics(layer)]
    modes = {module: module.training for m in models for module in m.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    used = 0
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            for images in itertools.islice(batches, num_batches):
                if used == 0:
                    for layer in layers:
                        layer.reset_running_stats()
                        layer.momentum = None  # cumulative average: every batch weighs the same
                        layer.train()
                for m in models:
                    m(images)
                used += 1
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return used


def loader_batches(loader, sampler: data.EpochSampler, device_input, epoch: int) -> Iterator[torch.Tensor]:
    """Device images from the start of `epoch`: the same samples and per-sample augmentation seeds every time,
    so recalibration is deterministic. Batch-level mixing and erasing are left out: evaluation never sees them.
    The training loop sets the sampler's position itself, so borrowing it does not disturb resume."""
    sampler.set_position(epoch, 0)
    return (images for images, *_ in data.device_batches(loader, device_input))


def recipe_batches(recipe, norm: data.Normalization, world, batch_size: int) -> Iterator[torch.Tensor]:
    """loader_batches for tools that have a recipe but no run (validate.py, average)."""
    source = data.open_source(recipe.data, recipe.data.train_split, recipe.train.seed)
    sampler = data.EpochSampler(len(source), world.rank, world.size, recipe.train.seed,
                                epoch_order=data.own_order(source))
    loader, device_input = pipeline.training_input(recipe, source, sampler, norm, world, batch_size)
    return loader_batches(loader, sampler, device_input, epoch=0)


def recalibrate_over_ranks(models: list[nn.Module], batches: Iterable[torch.Tensor], wanted: int, world, amp: str,
                           what: str) -> int:
    """recalibrate under the run's autocast, then the same statistics on every rank; warns when the split had
    fewer than `wanted` batches for this process (`what` names the setting that asked for them)."""
    with autocast(amp, world.device):
        used = recalibrate(models, batches, wanted)
    if used < wanted:
        logs.warn(f'{what}: the training split has only {used} batches for this process')
    for model in models:
        world.average_batchnorm(model)
    return used


def recalibrate_run(run):
    """Recompute BN running statistics of the raw and EMA weights over run.recipe.train.precise_bn_batches."""
    wanted = run.recipe.train.precise_bn_batches
    models = [run.module] + ([run.ema.module] if run.ema is not None else [])
    batches = loader_batches(run.train_loader, run.train_sampler, run.train_input, run.state.epoch)
    recalibrate_over_ranks(models, batches, wanted, run.world, run.recipe.train.amp,
                           f'precise BN (train.precise_bn_batches={wanted})')
