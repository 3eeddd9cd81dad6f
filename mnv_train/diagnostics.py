"""Making silent training failures visible: the epoch line, stagnation warnings, and the EMA's arithmetic.

Accuracy stuck flat in the first epochs has a few usual causes: an EMA that still holds mostly the weights it
started from, an LR far from what the global batch needs, inputs so small that the last feature map is a few
pixels wide, heavy dropout. The messages here name them with the run's own numbers.
"""
from __future__ import annotations

import math

import torch

STALL_EVALS = 3  # evaluations in a row without progress before warning
STALL_SPREAD = 0.05  # top-1 points: values this close count as unchanged
CHANCE_MARGIN = 0.02  # share of the distance from chance to 100 % that still counts as chance level
FLAT_LOSS = 0.02  # a train loss that fell by less than this fraction counts as flat
SMALL_FEATURE_MAP = 4  # a final feature map narrower than this keeps little spatial detail
HEAVY_DROP_RATE, HEAVY_DROP_PATH = 0.3, 0.2
DEFAULT_STRIDE = 32  # output stride of MNV4 and most ImageNet backbones
WILD_LOGIT = 1e3  # no healthy classifier's logit comes near it; one BatchNorm dividing by sqrt(eps) gets there


# ---------------------------------------------------------------------------------------------- EMA

def ema_half_life(decay: float) -> float:
    """Steps after which a constant-decay EMA gives its starting point half its weight: ln 0.5 / ln decay."""
    return math.log(0.5) / math.log(decay)


def ema_decay_at(step: int, decay: float, start_step: int, warmup: bool) -> float:
    """ModelEmaV3.get_decay(step) with its default warmup (gamma 1, power 2/3), as plain arithmetic: the
    report has no EMA object to ask (tests/test_diagnostics.py holds the two equal)."""
    averaged = max(0, step - start_step - 1)
    if averaged <= 0:
        return 0.0  # ModelEmaV3 copies the model up to step start_step + 1
    return max(min(1 - (1 + averaged) ** (-2 / 3), decay), 0.0) if warmup else decay


def ema_warm_step(decay: float, start_step: int, warmup: bool) -> int:
    """The first optimizer step after which less than half of the EMA's weight sits on where it started.

    Before it, EMA accuracy mostly shows the weights the EMA started from (ModelEmaV3 copies the model up to
    step start_step + 1) and lags the raw weights. With ModelEmaV3's warmup that is one update later.
    """
    step = start_step + 1
    if not warmup:
        return step + math.floor(ema_half_life(decay)) + 1
    weight = 1.0
    while weight >= 0.5:
        step += 1
        weight *= ema_decay_at(step, decay, start_step, warmup)
    return step


def ema_full_decay_step(decay: float, start_step: int) -> int:
    """The first step at which ModelEmaV3's warmup has brought the decay up to the configured value."""
    low, high = start_step + 1, start_step + 2  # the decay is 0 at low

    def below(step):
        return ema_decay_at(step, decay, start_step, True) < decay
    while below(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if below(middle) else (low, middle)
    return high


def run_ema_warm_step(run) -> int:
    return ema_warm_step(run.plan.ema_decay, run.plan.ema_start_step, run.recipe.ema.warmup)


# ---------------------------------------------------------------------------------------------- after each epoch

def top1_columns(keys) -> list[str]:
    """The top-1 metrics, raw before EMA, each at the recipe's eval size first, then the extra sizes."""
    return sorted((k for k in keys if k.startswith(('top1', 'ema_top1'))), key=lambda k: (k.startswith('ema_'), k))


def epoch_summary(run, row: dict) -> str:
    """The one-line summary printed after each epoch; EMA numbers are flagged while the EMA is warming up."""
    parts = [f'epoch {row["epoch"] + 1}/{run.epochs}', f'step {row["step"]}', f'loss {row["train_loss"]:.4f}',
             f'lr {row["lr"]:.3g}']
    parts += [f'{key} {row[key]:.2f}' for key in top1_columns(row)]
    if run.ema is not None and 'ema_top1' in row:
        warm = run_ema_warm_step(run)
        if row['step'] < warm:
            parts.append(f'(EMA warming up until step {warm})')
    return '  '.join(parts)


def epoch_warnings(run) -> list[str]:
    """What the last evaluation shows to be wrong: a stalled top-1 (stall_warnings), images with wild logits."""
    return stall_warnings(run) + wild_logit_warnings(run)


def stall_warnings(run) -> list[str]:
    """A warning when eval top-1 has not moved, or stayed at chance, for STALL_EVALS evaluations in a row.

    Checked when an epoch was evaluated; raw top-1 first (then the cause is in the training itself), EMA top-1
    alone otherwise (then the EMA lags the raw weights).
    """
    history = run.state.history
    if not history or 'top1' not in history[-1]:
        return []
    evaluated = [row for row in history if 'top1' in row][-STALL_EVALS:]
    if len(evaluated) < STALL_EVALS:
        return []

    def window(values):
        return (f'over the last {STALL_EVALS} evaluations (epochs {evaluated[0]["epoch"] + 1}-'
                f'{evaluated[-1]["epoch"] + 1}: {", ".join(f"{v:.2f}" for v in values)})')

    raw = [row['top1'] for row in evaluated]
    stalled = stall(run, raw)
    if stalled:
        return [f'top-1 {stalled} {window(raw)}; likely causes: '
                + '; '.join(likely_causes(run, evaluated[0]['epoch']))]
    if all('ema_top1' in row for row in evaluated):
        ema = [row['ema_top1'] for row in evaluated]
        stalled = stall(run, ema)
        if stalled:
            return [f'EMA top-1 {stalled} {window(ema)} while raw top-1 moved ({raw[0]:.2f} -> {raw[-1]:.2f}): '
                    f'{ema_numbers(run)}']
    return []


def wild_logit_warnings(run) -> list[str]:
    """A warning, for the raw and the EMA weights, when the last evaluation first had images with a logit beyond
    WILD_LOGIT, naming the BatchNorm channels that can produce them: a channel that was constant on
    every training batch has a running variance of ~0, so at evaluation an image that moves it is multiplied by
    1/sqrt(eps) (316 at timm's 1e-5), and a few such layers in a row reach logits of 1e6. A handful of images then
    carry most of the mean eval loss, while top-1 hardly changes. Said once, when it starts, not every epoch."""
    evaluated = [row for row in run.state.history if 'top1' in row][-2:]
    warnings = []
    for prefix, module in [('', run.module)] + ([('ema_', run.ema.module)] if run.ema is not None else []):
        count = evaluated[-1].get(f'{prefix}wild_logits', 0) if evaluated else 0
        before = evaluated[0].get(f'{prefix}wild_logits', 0) if len(evaluated) == 2 else 0
        if count and not before:
            row = evaluated[-1]
            weights = 'EMA' if prefix else 'raw'
            warnings.append(f'{weights} weights, epoch {row["epoch"] + 1}: '
                            + wild_logit_text(count, row[f'{prefix}wild_loss'], row[f'{prefix}loss'])
                            + '; ' + flat_channels_text(module))
    return warnings


def wild_logit_text(count: int, wild_loss: float, loss: float) -> str:
    return (f'{count} evaluation image(s) gave a logit beyond {WILD_LOGIT:g} and carry {wild_loss:.4g} of the mean '
            f'eval loss {loss:.4g} (the other images: {loss - wild_loss:.4g}); top-1 hardly depends on them, the '
            f'loss curves do')


FLAT_SHARE = 1e-3  # a running variance below this share of BatchNorm's eps: the channel was constant in training


def flat_batchnorm_channels(module: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(layer name, channels with a running variance below FLAT_SHARE * eps, channels) of each BatchNorm layer that
    has any."""
    found = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.running_var is not None:
            flat = int((layer.running_var < FLAT_SHARE * layer.eps).sum())
            if flat:
                found.append((name, flat, layer.running_var.numel()))
    return found


def flat_channels_text(module: torch.nn.Module, shown: int = 4) -> str:
    found = flat_batchnorm_channels(module)
    if not found:
        return ('no BatchNorm channel has a running variance of ~0: look for an overflow (train.amp fp16) or inputs '
                'unlike the training ones')
    eps = min(layer.eps for layer in module.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm))
    names = ', '.join(f'{name} ({flat} of {total})' for name, flat, total in found[:shown])
    more = f' and {len(found) - shown} more layers' if len(found) > shown else ''
    return (f'BatchNorm channels with a running variance of ~0 (constant on every training batch, e.g. after a '
            f'ReLU that never fires), which scale an input that moves them by up to 1/sqrt(eps) = '
            f'{1 / math.sqrt(eps):.0f} per layer: {names}{more}')


def stall(run, values: list[float]) -> str:
    """How a top-1 series failed to progress ('' when it did)."""
    classes = getattr(run.module, 'num_classes', 0)
    if classes:
        chance = 100 / classes
        if max(values) <= chance + CHANCE_MARGIN * (100 - chance):
            return f'stayed at chance level ({chance:.3g} % for {classes} classes)'
    if max(values) - min(values) <= STALL_SPREAD:
        return 'did not change'
    return ''


def likely_causes(run, since_epoch: int) -> list[str]:
    recipe = run.recipe
    losses = [row['train_loss'] for row in run.state.history if row['epoch'] >= since_epoch]
    first, last = losses[0], losses[-1]
    if not (math.isfinite(first) and math.isfinite(last)):
        causes = [f'train loss is not finite ({first:.4g} -> {last:.4g}): {lr_numbers(run)} is likely too high']
    elif last > first * (1 + FLAT_LOSS):
        causes = [f'train loss rose ({first:.4f} -> {last:.4f}): {lr_numbers(run)} is likely too high']
    elif last > first * (1 - FLAT_LOSS):
        causes = [f'train loss is flat too ({first:.4f} -> {last:.4f}), so the weights barely learn: '
                  f'{lr_numbers(run)} may be far too low or too high (python -m mnv_train.lr_find finds a range)']
    else:
        causes = [f'train loss falls ({first:.4f} -> {last:.4f}) but eval does not: {lr_numbers(run)}']
    stride = model_stride(run.module)
    side = math.ceil(recipe.data.img_size / stride)
    if side < SMALL_FEATURE_MAP:
        causes.append(f'{recipe.data.img_size} px gives a {side}x{side} final feature map (model stride {stride}); '
                      f'ImageNet recipes train at 224 px or more')
    drop, drop_path = recipe.model.drop_rate, recipe.model.drop_path_rate
    if drop >= HEAVY_DROP_RATE or drop_path >= HEAVY_DROP_PATH:
        causes.append(f'strong regularization slows early learning: dropout {drop:g}, drop-path {drop_path:g}')
    if run.ema is not None and run.state.step < run_ema_warm_step(run):
        causes.append(f'ema_top1 lags too: {ema_numbers(run)}')
    return causes


def lr_numbers(run) -> str:
    plan, recipe = run.plan, run.recipe
    source = (f'the recipe\'s {recipe.optim.lr:g} for global batch {plan.recipe_global_batch}, {plan.lr_rule} rule '
              f'for {plan.global_batch}' if plan.global_batch != plan.recipe_global_batch
              else f'the recipe\'s, at global batch {plan.global_batch}')
    return f'peak lr {plan.lr:.3g} ({source}), {run.lr():.3g} now'


def ema_numbers(run) -> str:
    plan, step = run.plan, run.state.step
    averaged = max(0, step - plan.ema_start_step - 1)
    text = (f'EMA decay {plan.ema_decay:.6g}/step has a half-life of {ema_half_life(plan.ema_decay):.0f} steps and '
            f'has averaged {averaged} of the {step} steps done')
    if step < run_ema_warm_step(run):
        text += (', so it still holds mostly its starting weights: judge by top1 for now, or set ema.warmup true '
                 'or a lower ema.decay')
    return text


def model_stride(module: torch.nn.Module) -> int:
    """The input-to-final-feature-map reduction that timm records; DEFAULT_STRIDE for models that do not."""
    try:
        return int(module.feature_info[-1]['reduction'])
    except (AttributeError, TypeError, KeyError, IndexError):
        return DEFAULT_STRIDE


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f'{seconds / 3600:.1f} h'
    return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'
