"""Making silent training failures visible: the epoch line, stagnation warnings and the --dry-run report.

Accuracy stuck flat in the first epochs has a few usual causes: an EMA that still holds mostly the weights it
started from, an LR far from what the global batch needs, inputs so small that the last feature map is a few
pixels wide, heavy dropout. The messages here name them with the run's own numbers.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from . import data

STALL_EVALS = 3  # evaluations in a row without progress before warning
STALL_SPREAD = 0.05  # top-1 points: values this close count as unchanged
CHANCE_MARGIN = 0.02  # share of the distance from chance to 100 % that still counts as chance level
FLAT_LOSS = 0.02  # a train loss that fell by less than this fraction counts as flat
SMALL_FEATURE_MAP = 4  # a final feature map narrower than this keeps little spatial detail
HEAVY_DROP_RATE, HEAVY_DROP_PATH = 0.3, 0.2
DEFAULT_STRIDE = 32  # output stride of MNV4 and most ImageNet backbones
BENCHMARK_TIMED = 3  # micro-batches and optimizer updates timed by --dry-run
PROBE_SECONDS = 4.0  # longest micro-batch --dry-run times before it scales a smaller probe batch up instead
LR_PLOT_POINTS = 2000


# ---------------------------------------------------------------------------------------------- EMA

def ema_half_life(decay: float) -> float:
    """Steps after which a constant-decay EMA gives its starting point half its weight: ln 0.5 / ln decay."""
    return math.log(0.5) / math.log(decay)


def ema_stand_in(plan, recipe):
    """A ModelEmaV3 over a one-weight model with the run's decay schedule, for when the run itself is not at hand."""
    from .build import create_ema
    return create_ema(torch.nn.Linear(1, 1), plan, recipe)


def ema_warm_step(ema) -> int:
    """The first optimizer step after which less than half of the EMA's weight sits on where it started.

    Before it, EMA accuracy mostly shows the weights the EMA started from (ModelEmaV3 copies the model up to
    step update_after_step + 1) and lags the raw weights. With ModelEmaV3's warmup that is one update later.
    """
    step = ema.update_after_step + 1
    if not ema.use_warmup:
        return step + math.floor(ema_half_life(ema.decay)) + 1
    weight = 1.0
    while weight >= 0.5:
        step += 1
        weight *= ema.get_decay(step)
    return step


def ema_full_decay_step(ema) -> int:
    """The first step at which ModelEmaV3's warmup has brought the decay up to the configured value."""
    low, high = ema.update_after_step + 1, ema.update_after_step + 2  # get_decay(low) is 0
    while ema.get_decay(high) < ema.decay:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ema.get_decay(middle) < ema.decay else (low, middle)
    return high


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
        warm = ema_warm_step(run.ema)
        if row['step'] < warm:
            parts.append(f'(EMA warming up until step {warm})')
    return '  '.join(parts)


def epoch_warnings(run) -> list[str]:
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
    if run.ema is not None and run.state.step < ema_warm_step(run.ema):
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
    if step < ema_warm_step(run.ema):
        text += (', so it still holds mostly its starting weights: judge by top1 for now, or set ema.warmup true '
                 'or a lower ema.decay')
    return text


def model_stride(module: torch.nn.Module) -> int:
    """The input-to-final-feature-map reduction that timm records; DEFAULT_STRIDE for models that do not."""
    try:
        return int(module.feature_info[-1]['reduction'])
    except (AttributeError, TypeError, KeyError, IndexError):
        return DEFAULT_STRIDE


# ---------------------------------------------------------------------------------------------- --dry-run

def dry_run(run) -> str:
    """The --dry-run report: the resolved recipe, batch plan, LR schedule, EMA horizon and a time estimate.

    Everything but the time estimate is computed without touching the run (the LR from the scheduler's pure
    _get_lr); the estimate then trains a few real steps, which spends the run: the caller exits afterwards.
    """
    sections = [run.recipe.to_yaml().rstrip(), run.plan.report(run.recipe), '\n'.join(schedule_lines(run)),
                '\n'.join(ema_lines(run))]
    plot = plot_lr_schedule(run) if run.world.is_main else None
    sections.append('\n'.join(benchmark_lines(run)))
    if plot is not None:
        sections.append(f'LR schedule plot: {plot}')
    return '\n\n'.join(sections)


def scheduled_lr(run, step: int) -> float:
    """The LR of optimizer step `step` (0-based), from the scheduler's formula: nothing in the run changes."""
    if run.scheduler is None:
        return run.plan.lr
    return run.scheduler._get_lr(step)[0]


def schedule_lines(run) -> list[str]:
    plan, cfg, total, per_epoch = run.plan, run.recipe.schedule, run.total_steps, run.steps_per_epoch
    warmup_end = math.ceil(cfg.warmup_epochs * per_epoch)
    points = [('first step', 0)] + ([('warmup end', warmup_end)] if warmup_end else [])
    points += [(f'{percent}%', round(total * percent / 100)) for percent in range(10, 100, 10)]
    points = sorted(points + [('final step', total - 1)], key=lambda point: point[1])
    lines = ['schedule',
             f'  {run.epochs} epochs x {per_epoch} steps = {total} optimizer steps of {plan.global_batch} samples '
             f'({plan.world_size} process(es) x {plan.per_device} per device x {plan.accum_steps} accumulation)',
             f'  {cfg.sched}: warmup {cfg.warmup_epochs:g} epochs ({warmup_end} steps) from {cfg.warmup_lr:g}, '
             f'peak {plan.lr:.4g}, min {cfg.min_lr:g}',
             f'  {"":12} {"step":>9} {"epoch":>8}  lr']
    lines += [f'  {label:12} {step:>9} {step / per_epoch:>8.2f}  {scheduled_lr(run, step):.4g}'
              for label, step in points]
    return lines


def ema_lines(run) -> list[str]:
    if run.ema is None:
        return ['EMA  off']
    plan, ema, total, per_epoch = run.plan, run.ema, run.total_steps, run.steps_per_epoch
    half = ema_half_life(plan.ema_decay)
    lines = ['EMA',
             f'  decay {plan.ema_decay:.6g} per step: half-life {steps_text(half)} ({half / per_epoch:.3g} epochs); '
             f'averaging starts after step {plan.ema_start_step + 1}']
    if run.recipe.ema.warmup:
        full = ema_full_decay_step(ema)
        if full <= total:
            lines.append(f'  ModelEmaV3 warmup: the decay reaches {plan.ema_decay:.6g} at step {full} '
                         f'(epoch {full / per_epoch:.2f})')
        else:
            last = ema.get_decay(total)
            lines.append(f'  ModelEmaV3 warmup: the decay would reach {plan.ema_decay:.6g} only at step {full}, '
                         f'after this run\'s {total} steps; at the last step it is {last:.6g} '
                         f'(half-life {steps_text(ema_half_life(last))})')
    elif half > total:
        lines.append(f'  the half-life is longer than the whole run ({total} steps): the final EMA weights will '
                     f'still be mostly the ones it started from; set ema.warmup true or a lower ema.decay')
    points = [(percent, max(1, round(total * percent / 100))) for percent in (1, 10, 100)]
    lines.append('  effective decay: ' + ', '.join(f'{ema.get_decay(step):.6g} at {percent} % (step {step})'
                                                   for percent, step in points))
    warm = ema_warm_step(ema)
    lines.append(f'  EMA numbers are marked "warming up" until step {warm} (epoch {warm / per_epoch:.2f})'
                 if warm <= total else '  EMA numbers are marked "warming up" for the whole run')
    return lines


def steps_text(steps: float) -> str:
    return f'{steps:.1f} steps' if steps < 100 else f'{steps:.0f} steps'


def benchmark_lines(run) -> list[str]:
    """The time of one optimizer step, from a few timed micro-batches and optimizer updates.

    The micro-batches run at the per-device batch when one takes under PROBE_SECONDS, and otherwise at a smaller
    probe batch whose time is scaled up linearly: on a login node's CPU one per-device batch of a large model can
    take minutes. Samples are prepared in this process, so no loader workers start; the input pipeline is
    measured by python -m mnv_train.bench.
    """
    plan = run.plan
    probe = min(2, plan.per_device)  # BatchNorm needs two samples in training mode, and Mixup pairs
    seconds = time_micro_batches(run, probe, repeats=1)  # also pays for first-call set-up
    while probe * 2 <= plan.per_device and seconds * 2 <= PROBE_SECONDS:
        probe *= 2
        seconds = time_micro_batches(run, probe, repeats=1)
    micro = time_micro_batches(run, probe, repeats=BENCHMARK_TIMED) * plan.per_device / probe
    update = time_optimizer_updates(run, repeats=BENCHMARK_TIMED)
    step = plan.accum_steps * micro + update
    how = (f'{BENCHMARK_TIMED} micro-batches of {probe} timed and scaled to the per-device {plan.per_device}'
           if probe < plan.per_device else f'mean of {BENCHMARK_TIMED} micro-batches of {plan.per_device}')
    return ['speed',
            f'  forward + backward {micro:.3g} s per micro-batch ({how}); optimizer update {update:.3g} s',
            f'  {step:.3g} s per optimizer step ({plan.accum_steps} micro-batches + update), '
            f'{plan.global_batch / step:.0f} img/s over {plan.world_size} process(es), model compute only',
            f'  estimated training time {duration(step * run.total_steps)} for {run.total_steps} steps '
            f'(evaluation and input waits not included)']


def probe_batch(run, size: int):
    """`size` training samples prepared as the loader would, in this process, on the device."""
    dataset, seed = run.train_loader.dataset, run.recipe.train.seed
    samples = [dataset[(index % len(dataset), data.derive_seed(seed, index))] for index in range(size)]
    return run.train_input(run.train_loader.collate_fn(samples))


def time_micro_batches(run, size: int, repeats: int) -> float:
    """Mean seconds of forward + backward (with the recipe's batch augmentation) on `size` samples."""
    from .engine import forward_backward
    images, targets, _ = probe_batch(run, size)
    run.model.train()
    start = synchronized_time(run.world.device)
    for _ in range(repeats):
        mixed, mixed_targets = run.augment(images, targets, epoch=0)
        forward_backward(run, mixed, mixed_targets, finishing=True)
    return (synchronized_time(run.world.device) - start) / repeats


def time_optimizer_updates(run, repeats: int) -> float:
    """Mean seconds of an optimizer update (clip, step, schedule, EMA), after one untimed first update."""
    from .engine import optimizer_step
    optimizer_step(run)  # allocates the optimizer state
    start = synchronized_time(run.world.device)
    for _ in range(repeats):
        for p in run.module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer_step(run)
    return (synchronized_time(run.world.device) - start) / repeats


def synchronized_time(device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f'{seconds / 3600:.1f} h'
    return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'


def plot_lr_schedule(run) -> Optional[Path]:
    """run_dir/lr_schedule.png: the LR of every step (at most LR_PLOT_POINTS of them) against epochs."""
    from .report import pyplot, save_figure
    plt = pyplot()
    if plt is None:
        return None
    total, per_epoch = run.total_steps, run.steps_per_epoch
    points = min(total, LR_PLOT_POINTS)
    steps = sorted({round(i * (total - 1) / max(1, points - 1)) for i in range(points)})
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([step / per_epoch for step in steps], [scheduled_lr(run, step) for step in steps])
    ax.set(xlabel='epoch', ylabel='learning rate',
           title=f'{run.recipe.name}: LR per step ({total} steps, global batch {run.plan.global_batch})')
    return save_figure(fig, run.run_dir / 'lr_schedule.png')
