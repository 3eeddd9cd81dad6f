"""The input pipelines a run or a tool builds from a recipe: training (on the host, or on NVIDIA DALI) and the
evaluation loaders at every eval size."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import augment, dali_pipeline, data
from .distributed import World
from .recipe import DataConfig, Recipe


@dataclass
class EvalSet:
    name: str  # '' for the recipe's eval size, '@448' for the extra ones
    img_size: int
    crop_pct: float
    loader: torch.utils.data.DataLoader


def eval_size(cfg: DataConfig) -> int:
    """The size every main evaluation runs at: data.eval_img_size, or the training size when it is not set."""
    return cfg.eval_img_size or cfg.img_size


def eval_sets(recipe: Recipe, source, norm: data.Normalization, world: World, batch_size: int) -> list[EvalSet]:
    """Loaders of this rank's share of the validation split at the eval size, then at each of data.extra_evals."""
    cfg = recipe.data
    sizes = [('', eval_size(cfg), cfg.crop_pct)]
    sizes += [(f'@{int(size)}', int(size), float(crop)) for size, crop in cfg.extra_evals]
    return [EvalSet(name, size, crop, eval_loader(cfg, source, size, crop, norm, world, batch_size))
            for name, size, crop in sizes]


def eval_loader(cfg: DataConfig, source, img_size: int, crop_pct: float, norm: data.Normalization, world: World,
                batch_size: int) -> torch.utils.data.DataLoader:
    """This rank's share of every sample of `source`, resized and center-cropped as the recipe evaluates."""
    dataset = data.TransformedDataset(source, data.eval_transform(img_size, crop_pct, cfg.interpolation, norm))
    sampler = data.ShardSampler(len(source), world.rank, world.size)
    return data.make_loader(dataset, sampler, batch_size, cfg.num_workers, drop_last=False,
                            pin_memory=world.device.type == 'cuda', persistent_workers=cfg.eval_persistent_workers)


def fit_check_set(recipe: Recipe, train_source, norm: data.Normalization, world: World,
                  batch_size: int) -> EvalSet:
    """A fixed, seeded subset of train.fit_check_images training images (all of them if fewer), prepared like
    the validation images: their top-1 against validation top-1 compares like with like (the training loss
    carries augmentation, mixup and label smoothing)."""
    cfg, count = recipe.data, min(recipe.train.fit_check_images, len(train_source))
    indices = sorted(np.random.default_rng(recipe.train.seed).choice(len(train_source), count, replace=False).tolist())
    size = eval_size(cfg)
    dataset = data.TransformedDataset(train_source, data.eval_transform(size, cfg.crop_pct, cfg.interpolation, norm))
    loader = data.make_loader(dataset, data.ShardSampler(count, world.rank, world.size, indices), batch_size,
                              cfg.num_workers, drop_last=False, pin_memory=world.device.type == 'cuda',
                              persistent_workers=cfg.eval_persistent_workers)
    return EvalSet('train', size, cfg.crop_pct, loader)


def training_input(recipe: Recipe, source, sampler: data.EpochSampler, norm: data.Normalization, world: World,
                   batch_size: int):
    """(loader, device input) for training: PIL and timm's transforms in loader workers, or DALI (data.pipeline)."""
    device_input = data.DeviceNormalize(norm, world.device, recipe.train.channels_last)
    if recipe.data.pipeline == 'dali':  # it refuses magnitudes past its range itself (dali_pipeline.check_recipe)
        loader = dali_pipeline.DaliLoader(source, sampler, batch_size, recipe.data, recipe.aug, norm, world.device)
        return loader, device_input
    transform = data.train_transform(recipe.data, recipe.aug, norm)
    # once a run, at data.img_size: a ramp's smaller sizes translate by the same share of the image
    augment.warn_beyond_timm_range(transform.transforms, recipe.data.img_size)
    sized = {size: data.train_transform(recipe.data, recipe.aug, norm, size) for size in set(sampler.sizes or ())}
    dataset = data.TransformedDataset(source, transform, sized)
    loader = data.make_loader(dataset, sampler, batch_size, recipe.data.num_workers, drop_last=True,
                              pin_memory=world.device.type == 'cuda')
    return loader, device_input
