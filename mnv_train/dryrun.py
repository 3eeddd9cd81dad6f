"""--dry-run: everything a login node can tell about a run before it starts, without training it.

The resolved recipe and batch plan, the LR at every 10 % of the schedule, the EMA's horizon and effective
decay, a preview of the augmented training images (preview.py), and the time an optimizer step will take, from a
few timed micro-batches: at each train size of a progressive-resolution ramp, and for evaluation's forwards.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from . import evaluation
from .build import Run
from .diagnostics import duration, ema_full_decay_step, ema_half_life, run_ema_warm_step
from .engine import forward_backward, optimizer_step
from .plots import pyplot, save_figure
from .preview import prepared_batch, write_preview

BENCHMARK_TIMED = 3  # micro-batches and optimizer updates timed
PROBE_SECONDS = 2.0  # longest warm micro-batch timed before a smaller probe batch is scaled up instead
PROBE_JUMP = 4  # the probe batch grows at most 4x at a time: past the caches a CPU's time grows faster than linearly
LR_PLOT_POINTS = 2000


def dry_run(run: Run) -> str:
    """The --dry-run report: the resolved recipe, batch plan, LR schedule, EMA horizon and a time estimate.

    Everything but the time estimate is computed without touching the run (the LR from the scheduler's pure
    _get_lr); the estimate then trains a few real steps, which spends the run: the caller exits afterwards.
    """
    sections = [run.recipe.to_yaml().rstrip(), run.plan.report(run.recipe), '\n'.join(schedule_lines(run)),
                '\n'.join(ema_lines(run))]
    plot = plot_lr_schedule(run) if run.world.is_main else None
    preview = write_preview(run) if run.world.is_main else []  # before the benchmark spends the run
    sections.append('\n'.join(benchmark_lines(run)))
    if plot is not None:
        sections.append(f'LR schedule plot: {plot}')
    if preview:
        sections.append('augmentation preview: ' + ', '.join(map(str, preview)))
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
        full = ema_full_decay_step(plan.ema_decay, plan.ema_start_step)
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
    warm = run_ema_warm_step(run)
    lines.append(f'  EMA numbers are marked "warming up" until step {warm} (epoch {warm / per_epoch:.2f})'
                 if warm <= total else '  EMA numbers are marked "warming up" for the whole run')
    return lines


def steps_text(steps: float) -> str:
    return f'{steps:.1f} steps' if steps < 100 else f'{steps:.0f} steps'


def benchmark_lines(run) -> list[str]:
    """The time of one optimizer step, from a few timed micro-batches and optimizer updates.

    The micro-batches run at the per-device batch when one takes under PROBE_SECONDS, and otherwise at a smaller
    probe batch whose time is scaled up linearly: on a login node's CPU one per-device batch of a large model can
    take minutes. Every figure is timed after an untimed call at its shape (warm_mean_seconds). Samples are prepared
    in this process, so no loader workers start; the input pipeline is measured by python -m mnv_train.bench.
    """
    plan = run.plan
    probe, seconds = probe_batch(run)
    micro = seconds * plan.per_device / probe
    update = time_optimizer_updates(run, repeats=BENCHMARK_TIMED)
    step = plan.accum_steps * micro + update
    sizes = run.train_sampler.sizes or [run.recipe.data.img_size] * run.epochs
    step_at = {size: step if size == run.recipe.data.img_size else step_seconds(run, probe, size, update)
               for size in sorted(set(sizes))}
    training = sum(step_at[size] for size in sizes) * run.steps_per_epoch
    how = (f'{BENCHMARK_TIMED} micro-batches of {probe} timed and scaled to the per-device {plan.per_device}'
           if probe < plan.per_device else f'mean of {BENCHMARK_TIMED} micro-batches of {plan.per_device}')
    lines = ['speed',
             f'  forward + backward {micro:.3g} s per micro-batch ({how}); optimizer update {update:.3g} s']
    if run.distillation is not None:
        teacher = time_teacher(run, probe, repeats=BENCHMARK_TIMED) * plan.per_device / probe
        lines.append(f'  of which the teacher\'s forward {teacher:.3g} s, {100 * teacher / micro:.0f} % of the '
                     f'micro-batch')
    lines += [f'  {step:.3g} s per optimizer step ({plan.accum_steps} micro-batches + update), '
              f'{plan.global_batch / step:.0f} img/s over {plan.world_size} process(es), model compute only',
              f'  estimated training time {duration(training)} for {run.total_steps} steps '
              f'(evaluation and input waits not included)']
    if run.train_sampler.sizes is not None:
        lines += ramp_lines(sizes, step_at, run.steps_per_epoch, plan.global_batch, step)
    return lines + evaluation_lines(run, probe, training)


def probe_batch(run) -> tuple[int, float]:
    """(probe batch, mean warm seconds of a micro-batch of it): from 2 samples up, in jumps of at most PROBE_JUMP x,
    to the per-device batch or to the largest batch whose time, scaled linearly from the last batch timed, fits
    PROBE_SECONDS.

    Each batch tried is timed warm: on a GPU the first call at a shape spends seconds on cuDNN autotuning and kernel
    set-up, and timing it stopped the search at 2 samples, latency-bound, at a small share of the per-device batch's
    rate. The timed calls of the last batch tried are the estimate's, so jumps rather than doublings keep the
    search's cost near that of the estimate alone (a CPU dry run must stay within seconds).
    """
    probe = min(2, run.plan.per_device)  # BatchNorm needs two samples in training mode, and Mixup pairs
    while True:
        seconds = time_micro_batches(run, probe, BENCHMARK_TIMED)
        larger = larger_probe(probe, seconds, run.plan.per_device)
        if larger == probe:
            return probe, seconds
        probe = larger


def larger_probe(probe: int, seconds: float, per_device: int) -> int:
    """The next probe batch after `probe` samples took `seconds`: the per-device batch if it is within PROBE_JUMP x and
    its time, scaled linearly, fits PROBE_SECONDS; otherwise the largest power-of-two multiple of `probe` within both
    (`probe` itself when none is)."""
    fits = min(PROBE_SECONDS / seconds * probe if seconds > 0 else math.inf, PROBE_JUMP * probe)
    if fits >= per_device:
        return per_device
    larger = probe
    while larger * 2 <= fits:
        larger *= 2
    return larger


def step_seconds(run, probe: int, img_size: int, update: float) -> float:
    """An optimizer step's seconds at img_size, from warm micro-batches of `probe` samples, plus `update` seconds for
    the optimizer update."""
    micro = time_micro_batches(run, probe, BENCHMARK_TIMED, img_size) * run.plan.per_device / probe
    return run.plan.accum_steps * micro + update


def ramp_lines(sizes: list[int], step_at: dict, steps_per_epoch: int, global_batch: int,
               full_size_step: float) -> list[str]:
    """Each phase of the progressive-resolution ramp: its size, share of the epochs, estimated img/s and time, and
    the time saved against every epoch at the full size (whose step takes full_size_step seconds)."""
    lines = ['  progressive resolution (schedule.train_size_ramp):',
             f'  {"size":>6} {"epochs":>7} {"share":>6} {"img/s":>8} {"time":>10}']
    for size in sorted(step_at):
        epochs = sizes.count(size)
        rate = global_batch / step_at[size]
        digits = '.0f' if rate >= 10 else '.2g'  # a large model on a CPU runs below 1 img/s
        lines.append(f'  {size:>6} {epochs:>7} {100 * epochs / len(sizes):>5.0f}% {rate:>8{digits}} '
                     f'{duration(epochs * steps_per_epoch * step_at[size]):>10}')
    ramped, constant = sum(step_at[size] for size in sizes), full_size_step * len(sizes)
    lines.append(f'  against every epoch at {max(sizes)} px ({duration(constant * steps_per_epoch)}): '
                 f'{duration((constant - ramped) * steps_per_epoch)} saved, {100 * (1 - ramped / constant):.0f} % of '
                 f'the training time')
    return lines


def evaluation_lines(run, probe: int, training: float) -> list[str]:
    """What the run's evaluations cost: forwards of this rank's share of every eval set (raw and EMA weights) and of
    the fit check (raw), at the epochs train.eval_every and evaluation.sets_due choose."""
    epochs, weights = run.epochs, 2 if run.ema is not None else 1
    evaluated = [evaluation.sets_due(run, e) for e in range(epochs)
                 if evaluation.due(e, epochs, run.recipe.train.eval_every)]
    passes = [(eval_set, (1 if eval_set is run.fit_check else weights) *
               sum(any(due is eval_set for due in sets) for sets in evaluated))
              for eval_set in [*run.evals, *([run.fit_check] if run.fit_check is not None else [])]]
    seconds = sum(count * len(eval_set.loader.sampler) * time_forward(run, probe, eval_set.img_size) / probe
                  for eval_set, count in passes)
    return [f'  evaluation: about {duration(seconds)}, {100 * seconds / (seconds + training):.1f} % of the run\'s '
            f'estimated time ({len(evaluated)} evaluations; ' + ', '.join(
                f'{"fit check" if eval_set is run.fit_check else f"{eval_set.img_size} px"} x {count}'
                for eval_set, count in passes) + ' passes)']


def time_teacher(run, size: int, repeats: int) -> float:
    """Mean warm seconds of the teacher's forward (renormalised, resized, under the run's autocast) on `size`
    samples."""
    images, _, _ = prepared_batch(run, size)[0]
    task = run.distillation.task
    with torch.no_grad(), run.autocast():
        return warm_mean_seconds(run.world.device, repeats, lambda: task.teacher(
            task.teacher.normalize_input(images, task.student_mean, task.student_std)))


def probe_images(run, size: int, img_size: Optional[int] = None):
    """(images, targets) of `size` prepared training samples, resized to img_size where given: the model's cost
    depends on the shape alone."""
    images, targets, _ = prepared_batch(run, size)[0]
    if img_size is not None and img_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode='bilinear')
    return images, targets


def time_forward(run, size: int, img_size: int) -> float:
    """Mean warm seconds of an evaluation forward (no gradients, the run's autocast) on `size` samples at img_size."""
    images, _ = probe_images(run, size, img_size)
    run.module.eval()
    with torch.no_grad(), run.autocast():
        return warm_mean_seconds(run.world.device, BENCHMARK_TIMED, lambda: run.module(images))


def time_micro_batches(run, size: int, repeats: int, img_size: Optional[int] = None) -> float:
    """Mean warm seconds of forward + backward (with the recipe's batch augmentation) on `size` samples, at img_size
    (None: as prepared)."""
    images, targets = probe_images(run, size, img_size)
    run.model.train()

    def micro_batch():
        mixed, mixed_targets = run.augment(images, targets, epoch=0)
        forward_backward(run, mixed, mixed_targets, finishing=True)
    return warm_mean_seconds(run.world.device, repeats, micro_batch)


def time_optimizer_updates(run, repeats: int) -> float:
    """Mean warm seconds of an optimizer update (clip, step, schedule, EMA): the first allocates the optimizer state."""
    def update():
        for p in run.module.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer_step(run)
    return warm_mean_seconds(run.world.device, repeats, update)


def warm_mean_seconds(device: torch.device, repeats: int, call) -> float:
    """Mean seconds of `repeats` calls of `call` after an untimed one: the first call at a new shape sets up (cuDNN
    autotuning, kernel and allocator set-up, compiling), which a long run pays once and a few timed calls must not
    carry."""
    call()
    start = synchronized_time(device)
    for _ in range(repeats):
        call()
    return (synchronized_time(device) - start) / repeats


def synchronized_time(device: torch.device) -> float:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter()


def plot_lr_schedule(run) -> Optional[Path]:
    """run_dir/lr_schedule.png: the LR of every step (at most LR_PLOT_POINTS of them) against epochs."""
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
