"""Evaluation, one path for training, validate.py, checkpoint averaging, export and the evaluation suite.

A tool starts from a checkpoint: its recipe (or --recipe for plain weight files), the EMA or raw weights,
the overrides of the command line; then the model is built, optionally recalibrated (precise BN) and
evaluated on every eval set of the recipe (eval_suite.py: on ImageNet-V2, Sketch, -R, -A and ReaL). Training
evaluates its raw and EMA weights the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint, data, precise_bn
from . import model as models
from . import recipe as recipes
from .diagnostics import WILD_LOGIT
from .distributed import World
from .errors import UserError
from .pipeline import EvalSet, eval_sets, eval_size


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, world: World, amp: str,
             real_labels: Optional[torch.Tensor] = None) -> dict:
    """top-1 / top-5 (%) and loss over the whole split, every sample counted once across ranks. With real_labels
    (multi-hot, one row per sample in this rank's loader order) also ReaL's real_top1 / real_top5 / real_count.

    wild_logits counts the images with a logit beyond WILD_LOGIT and wild_loss is their share of `loss` (the mean):
    a handful of them can carry most of the mean loss while top-1 hardly changes (diagnostics.wild_logit_warnings)."""
    model.eval()
    correct1 = correct5 = loss_sum = count = real1 = real5 = real_count = wild = wild_loss = 0.0
    for images, targets, _ in data.device_batches(loader, normalize):
        with models.autocast(amp, world.device):
            logits = model(images)
        predicted = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top = predicted == targets[:, None]
        correct1 += top[:, 0].sum()
        correct5 += top.any(dim=1).sum()
        scores = logits.float()
        losses = torch.nn.functional.cross_entropy(scores, targets, reduction='none')
        loss_sum += losses.sum()
        wild_images = scores.abs().amax(dim=1) > WILD_LOGIT
        wild, wild_loss = wild + wild_images.sum(), wild_loss + torch.where(wild_images, losses, 0).sum()  # no sync
        if real_labels is not None:  # ReaL: a hit is any of an image's labels in the top k; unlabelled ones skip
            labels = real_labels[int(count):int(count) + len(targets)].to(predicted.device)
            hits = labels.gather(1, predicted)[labels.any(dim=1)]
            real1, real5, real_count = real1 + hits[:, 0].sum(), real5 + hits.any(dim=1).sum(), real_count + len(hits)
        count += len(targets)
    sums = world.sum([float(correct1), float(correct5), float(loss_sum), count, float(real1), float(real5),
                      float(real_count), float(wild), float(wild_loss)])
    correct1, correct5, loss_sum, count, real1, real5, real_count, wild, wild_loss = sums
    if count == 0:
        raise UserError('the validation split is empty')
    result = {'top1': 100 * correct1 / count, 'top5': 100 * correct5 / count, 'loss': loss_sum / count,
              'count': int(count), 'wild_logits': int(wild), 'wild_loss': wild_loss / count}
    if real_labels is not None:
        if real_count == 0:
            raise UserError('ReaL: no image of the validation split has a label in real.json')
        result.update(real_top1=100 * real1 / real_count, real_top5=100 * real5 / real_count,
                      real_count=int(real_count))
    return result


def due(epoch: int, epochs: int, every: int) -> bool:
    """train.eval_every: evaluate after every `every`-th epoch, and always after the last one."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def sets_due(run, epoch: int) -> list[EvalSet]:
    """The sets evaluated after `epoch`: the recipe's eval size every time; data.extra_evals every
    train.extra_eval_every epochs and the fit check (run.fit_check) every train.fit_check_every epochs, both always
    after the last (called only after epochs train.eval_every evaluates). A 448 px pass costs more than the 384 px
    one, and its curve is not needed every epoch."""
    train = run.recipe.train
    sets = [s for s in run.evals if not s.name or due(epoch, run.epochs, train.extra_eval_every)]
    if run.fit_check is not None and due(epoch, run.epochs, train.fit_check_every):
        sets.append(run.fit_check)
    return sets


def evaluate_run(run, epoch: int) -> dict:
    """Raw and EMA weights on the sets due after `epoch`: {'top1': .., 'ema_top1': .., 'top1@448': ..}."""
    if run.recipe.train.precise_bn_batches:
        precise_bn.recalibrate_run(run)
    metrics = {}
    weights = [('', run.module)] + ([('ema_', run.ema.module)] if run.ema is not None else [])
    for eval_set in sets_due(run, epoch):
        if eval_set is run.fit_check:  # the raw weights on training images, prepared as the validation ones
            metrics['train_top1'] = evaluate(run.module, eval_set.loader, run.normalize, run.world,
                                             run.recipe.train.amp)['top1']
            continue
        for prefix, model in weights:
            result = evaluate(model, eval_set.loader, run.normalize, run.world, run.recipe.train.amp)
            for key in ('top1', 'top5', 'loss', 'wild_logits', 'wild_loss'):
                metrics[f'{prefix}{key}{eval_set.name}'] = result[key]
    return metrics


# ---------------------------------------------------------------------------------------------- checkpoints

@dataclass
class Weights:
    """What a tool evaluates or exports: a recipe and one set of weights, and where they came from."""
    recipe: recipes.Recipe
    kind: str  # 'ema' or 'raw'
    state_dict: dict
    path: Path
    manifest: Optional[dict]  # None when no manifest checked the file (timm .pth, safetensors, a copy without it)


def load_weights(path: Path, choice: str = 'auto', recipe_name: Optional[str] = None,
                 overrides: Optional[list[str]] = None) -> Weights:
    """The weights of a checkpoint (EMA or raw: `choice` auto takes EMA when there is some) and their recipe:
    the checkpoint's own, or `recipe_name` for files that carry none; `overrides` apply on top."""
    path, overrides = Path(path), overrides or []
    stored = checkpoint.read_weights(path, ('model',) if recipe_name else ('model', 'recipe'))
    if recipe_name:
        recipe = recipes.load(recipe_name, overrides)
    elif stored.recipe is not None:
        recipe = recipes.from_dict(recipes.apply_overrides(stored.recipe, overrides))
    else:
        raise UserError(f'{path} carries no recipe: pass --recipe (the model and data settings to use)')
    return chosen_weights(recipe, stored.raw, stored.ema, path, stored.manifest, choice)


def chosen_weights(recipe: recipes.Recipe, raw: Optional[dict], ema: Optional[dict], path: Path,
                   manifest: Optional[dict], choice: str = 'auto') -> Weights:
    """The EMA or the raw weights of a run (`choice` auto takes EMA when there is some), for a checkpoint read back
    and for the weights a run ends with alike."""
    use_ema = choice == 'ema' or (choice == 'auto' and ema is not None)
    if not use_ema and raw is None:
        raise UserError(f'checkpoint {path} holds no raw weights (an average of EMA weights); use --weights ema')
    if use_ema and ema is None:
        raise UserError(f'checkpoint {path} holds no EMA weights (a run with ema.enabled false, or a file of raw '
                        f'weights only); use --weights raw')
    return Weights(recipe, 'ema' if use_ema else 'raw', ema if use_ema else raw, path, manifest)


def evaluate_weights(recipe: recipes.Recipe, state_dict: dict, source_name: str, world: World, batch_size: int,
                     precise_bn_batches: int = 0) -> tuple[list[tuple[EvalSet, dict]], dict, int]:
    """([(eval set, metrics)] on every eval set of the recipe, the weights as evaluated (BatchNorm recalibrated
    over precise_bn_batches training batches if asked), how many batches recalibrated them)."""
    source = data.open_source(recipe.data, recipe.data.val_split, recipe.train.seed)
    model = evaluated_model(recipe, state_dict, source_name, world, batch_size, precise_bn_batches,
                            recipe.model.num_classes or getattr(source, 'num_classes', None))
    results = [(eval_set, evaluate(model.module, eval_set.loader, model.normalize, world, recipe.train.amp))
               for eval_set in eval_sets(recipe, source, model.norm, world, batch_size)]
    return results, {k: v.cpu() for k, v in model.module.state_dict().items()}, model.recalibrated


@dataclass
class EvaluatedModel:
    module: torch.nn.Module  # on the device, weights loaded (and BatchNorm recalibrated if asked)
    norm: data.Normalization
    normalize: data.DeviceNormalize
    recalibrated: int  # training batches that recalibrated BatchNorm


def evaluated_model(recipe: recipes.Recipe, state_dict: dict, source_name: str, world: World, batch_size: int,
                    precise_bn_batches: int, num_classes: Optional[int]) -> EvaluatedModel:
    """The recipe's model with these weights, ready to evaluate: every evaluation of a state dict starts here."""
    module = models.create(recipe.model, num_classes)
    models.load_weights(module, state_dict, source_name)
    norm = data.resolve_normalization(recipe.data, module)
    module = models.prepare(module, world.device, recipe.train.channels_last)
    recalibrated = 0
    if precise_bn_batches:
        batches = precise_bn.recipe_batches(recipe, norm, world, batch_size)
        recalibrated = precise_bn.recalibrate_over_ranks([module], batches, precise_bn_batches, world,
                                                         recipe.train.amp, f'--precise-bn {precise_bn_batches}')
    return EvaluatedModel(module, norm, data.DeviceNormalize(norm, world.device, recipe.train.channels_last),
                          recalibrated)


# ---------------------------------------------------------------------------------------------- validate.py

@dataclass
class EvalSetting:
    img_size: int
    crop_pct: float
    crop_source: str  # why this crop: the user's flag, the published eval setting, or the recipe
    expected_top1: Optional[float]  # the published figure for exactly this size and crop, if there is one
    split: Optional[str] = None  # a split other than the recipe's data.val_split, which no published figure is of


def eval_setting(recipe: recipes.Recipe, img_size: Optional[int], crop_pct: Optional[float]) -> EvalSetting:
    """The size and crop to evaluate at, and the published top-1 to compare with.

    At the provenance's eval size (e.g. 448 for a 384-trained model) the published figure was measured with the
    provenance's crop (1.0), not the recipe's train-time crop, so that crop is the default there. A published
    figure is compared only when both size and crop are the ones it was measured at.
    """
    data_cfg, provenance = recipe.data, recipe.provenance
    size = img_size or eval_size(data_cfg)
    published_crop = provenance.eval_crop_pct or data_cfg.crop_pct
    at_published_size = provenance.eval_img_size is not None and size == provenance.eval_img_size
    if crop_pct:
        crop, source = crop_pct, '--crop-pct'
    elif at_published_size and provenance.eval_crop_pct is not None:
        crop, source = published_crop, f'provenance.eval_crop_pct, the published setting at {size} px'
    else:
        crop, source = data_cfg.crop_pct, 'the recipe\'s data.crop_pct'
    expected = None
    if at_published_size and crop == published_crop:
        expected = provenance.expected_top1_eval
    elif size == eval_size(data_cfg) and crop == data_cfg.crop_pct:
        expected = provenance.expected_top1
    return EvalSetting(size, crop, source, expected)
