"""The training loop: epochs of optimizer steps, evaluation, checkpoints.

Nothing in the step waits for the device; losses are read back at log points (every train.log_every steps),
which is also where ranks agree on stopping, checkpointing and non-finite losses.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Optional

import torch
from timm.utils import dispatch_clip_grad

from . import checkpoint, diagnostics, logs, precise_bn
from .build import Run
from .data import derive_seed, device_batches, seed_everything
from .errors import UserError

STEP_STREAM = 0x5EED  # keeps per-step seeds apart from per-sample ones


class StopFlag:
    """Set from a signal handler (SIGTERM/SIGUSR1: preemption); read by the loop at step boundaries."""

    def __init__(self):
        self.requested, self.reason = False, ''

    def request(self, reason: str):
        self.requested, self.reason = True, reason


class Interrupted(Exception):
    """Training stopped early on request, after saving a checkpoint."""


def fit(run: Run, stop: StopFlag, max_steps: int = 0):
    """Train from wherever run.state is to the end of the schedule (or to max_steps, then checkpoint and stop)."""
    monitor = StepMonitor(run, stop, max_steps)
    while run.state.epoch < run.epochs:
        epoch = run.state.epoch
        try:
            monitor.begin_epoch(epoch)
            train_one_epoch(run, epoch, monitor)
            monitor.end_epoch()
            end_epoch(run, epoch, monitor)
        except RolledBack:
            continue
    run.metrics.close()


def train_one_epoch(run: Run, epoch: int, monitor: StepMonitor):
    state, accum = run.state, run.plan.accum_steps
    run.model.train()
    for batch_index, (images, targets, skipped) in epoch_batches(run, epoch):
        monitor.skipped += skipped
        seed_everything(derive_seed(run.recipe.train.seed, STEP_STREAM, state.step, batch_index % accum,
                                    run.world.rank))
        images, targets = run.augment(images, targets, epoch)
        finishing = (batch_index + 1) % accum == 0
        monitor.record(forward_backward(run, images, targets, finishing))
        if finishing:
            monitor.record_update(optimizer_step(run))
            state.samples_in_epoch += run.plan.global_batch
            state.samples_seen += run.plan.global_batch
            monitor.after_step()


def forward_backward(run: Run, images, targets, finishing: bool) -> torch.Tensor:
    """One micro-batch: loss and gradients (all-reduced by DDP only on the step's last micro-batch)."""
    with run.no_sync(finishing), run.autocast():
        loss = run.loss_fn(run.model(images), targets)
    run.scaler.scale(loss / run.plan.accum_steps).backward()
    return loss.detach()


def epoch_batches(run: Run, epoch: int):
    """(batch index within the epoch, device batch) from the run's position, for the epoch's optimizer steps."""
    per_step = run.world.size * run.plan.per_device
    done = run.state.samples_in_epoch // per_step
    run.train_sampler.set_position(epoch, done * run.plan.per_device)
    remaining = max(0, run.steps_per_epoch * run.plan.accum_steps - done)
    batches = device_batches(itertools.islice(run.train_loader, remaining), run.train_input)
    return zip(itertools.count(done), batches)


def optimizer_step(run: Run) -> Optional[torch.Tensor]:
    """Clip, step, schedule, average BatchNorm over ranks, EMA. With fp16, returns a device flag for whether the
    loss scaler skipped the update (inf/NaN gradients). Even then the step counter, the LR schedule and the EMA
    advance, as in timm: the schedule stays a function of samples seen, and the EMA decays towards weights
    that did not change."""
    clip = run.recipe.optim
    if clip.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        dispatch_clip_grad(run.module.parameters(), clip.clip_grad, mode=clip.clip_mode)
    # GradScaler keeps its scale on the device and lowers it exactly when it skips a step; comparing there
    # avoids reading it back (a sync) every step
    scale_before = run.scaler._scale.clone() if run.scaler.is_enabled() else None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.step += 1
    if run.scheduler is not None:
        run.scheduler.step_update(run.state.step)
    if run.recipe.train.dist_bn == 'reduce':
        run.world.average_batchnorm(run.module)  # before the EMA reads them: every replica holds the same statistics
    if run.ema is not None:
        run.ema.update(run.module, step=run.state.step)
    return run.scaler._scale < scale_before if scale_before is not None else None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, normalize, world, amp: str) -> dict:
    """top-1 / top-5 (%) and loss over the whole split, every sample counted once across ranks."""
    from .build import autocast
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    for images, targets, _ in device_batches(loader, normalize):
        with autocast(amp, world.device):
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]
        correct1 += top[:, 0].sum()
        correct5 += top.any(dim=1).sum()
        loss_sum += torch.nn.functional.cross_entropy(logits.float(), targets, reduction='sum')
        count += len(targets)
    correct1, correct5, loss_sum, count = world.sum([float(correct1), float(correct5), float(loss_sum), count])
    if count == 0:
        raise UserError('the validation split is empty')
    return {'top1': 100 * correct1 / count, 'top5': 100 * correct5 / count, 'loss': loss_sum / count,
            'count': int(count)}


def evaluate_all(run: Run) -> dict:
    """Raw and EMA weights on every eval set: {'top1': .., 'ema_top1': .., 'top1@448': ..}."""
    if run.recipe.train.precise_bn_batches:
        precise_bn.recalibrate_run(run)
    metrics = {}
    weights = [('', run.module)] + ([('ema_', run.ema.module)] if run.ema is not None else [])
    for eval_set in run.evals:
        for prefix, model in weights:
            result = evaluate(model, eval_set.loader, run.normalize, run.world, run.recipe.train.amp)
            for key in ('top1', 'top5', 'loss'):
                metrics[f'{prefix}{key}{eval_set.name}'] = result[key]
    return metrics


def end_epoch(run: Run, epoch: int, monitor: StepMonitor):
    state = run.state
    row = {'epoch': epoch, 'step': state.step, 'lr': run.lr(), 'train_loss': monitor.epoch_loss(),
           'skipped_images': state.skipped_in_epoch}
    if run.scaler.is_enabled():
        row['fp16_skipped_steps'] = state.skipped_steps_in_epoch
    if (epoch + 1) % run.recipe.train.eval_every == 0 or epoch + 1 == run.epochs:
        row.update(evaluate_all(run))
    state.epoch, state.samples_in_epoch, state.skipped_in_epoch, state.skipped_steps_in_epoch = epoch + 1, 0, 0, 0
    score = max(row.get('top1', -1), row.get('ema_top1', -1))
    improved = 'top1' in row and (state.best_top1 is None or score > state.best_top1)
    if improved:
        state.best_top1, state.best_epoch = score, epoch
    state.history.append(row)
    logs.summary(diagnostics.epoch_summary(run, row))
    for warning in diagnostics.epoch_warnings(run):
        logs.warn(warning)
    run.metrics.scalars(state.step, {f'eval/{k}': v for k, v in row.items() if k not in ('epoch', 'step')})
    monitor.save(is_best=improved)
    run.metrics.write_history(state.history)


class StepMonitor:
    """Per-step bookkeeping kept off the device's critical path: loss sums, throughput, stop and save points."""

    def __init__(self, run: Run, stop: StopFlag, max_steps: int = 0):
        self.run, self.stop, self.max_steps = run, stop, max_steps
        self.losses: list[torch.Tensor] = []  # on the device until the next flush
        self.window_losses: list[float] = []  # flushed, not yet logged
        self.bad_steps = 0
        self.rollbacks = 0
        self.skipped = 0  # unreadable images this rank replaced since the last sync point
        self.skip_flags: list[torch.Tensor] = []  # fp16 steps the loss scaler skipped, on the device until a flush
        self.window_start = time.perf_counter()
        self.window_samples = 0
        self.last_save = time.monotonic()
        self.bar = None

    def begin_epoch(self, epoch: int):
        run = self.run
        self.bar = logs.progress(run.steps_per_epoch, run.state.samples_in_epoch // run.plan.global_batch,
                                 f'epoch {epoch + 1}/{run.epochs}')

    def end_epoch(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def record(self, loss: torch.Tensor):
        self.losses.append(loss)

    def record_update(self, skipped: Optional[torch.Tensor]):
        """fp16: whether the loss scaler skipped this optimizer step, read back at the next flush."""
        if skipped is not None:
            self.skip_flags.append(skipped)

    def after_step(self):
        run, state = self.run, self.run.state
        self.window_samples += run.plan.global_batch
        if self.bar is not None:
            self.bar.update(1)
        every = run.recipe.train.checkpoint_every_steps
        at_log = state.step % run.recipe.train.log_every == 0
        at_epoch_end = state.samples_in_epoch >= run.samples_per_epoch
        if self.max_steps and state.step >= self.max_steps:  # the same step on every rank: no vote needed
            self.stop.request(f'reached --max-steps {self.max_steps}')
            self.sync_point(at_log, at_epoch_end)
        elif at_log or at_epoch_end or self.stop_agreed():
            self.sync_point(at_log, at_epoch_end)
        elif every and state.step % every == 0:
            self.save(is_best=False)

    def stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (SIGTERM, SIGUSR1): a host-side vote after every optimizer step, so
        a preemption signal to one rank stops them all within a step, inside a scheduler's grace period."""
        requester = self.run.world.first_rank_with(self.stop.requested)
        if requester is not None and not self.stop.requested:
            self.stop.request(f'stop requested on rank {requester}')
        return requester is not None

    def flush(self):
        """Read the pending losses back (one device sync) into the epoch sums and the bad-step count."""
        state = self.run.state
        values = torch.stack(self.losses).float().tolist() if self.losses else []
        self.losses = []
        if self.skip_flags:  # the same on every rank: DDP all-reduces the gradients the scaler checks
            state.skipped_steps_in_epoch += int(torch.stack(self.skip_flags).sum())
            self.skip_flags = []
        finite = [v for v in values if math.isfinite(v)]
        trailing_bad = next((i for i, v in enumerate(reversed(values)) if math.isfinite(v)), len(values))
        self.bad_steps = self.bad_steps + trailing_bad if not finite else trailing_bad
        state.loss_sum += sum(finite)
        state.loss_count += len(finite)
        self.window_losses += finite

    def sync_point(self, log: bool, epoch_end: bool = False):
        """Agree with the other ranks once, then log / roll back / save / stop."""
        run, state, train_cfg = self.run, self.run.state, self.run.recipe.train
        self.flush()
        minutes = train_cfg.checkpoint_every_minutes
        due = bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes and run.world.is_main
        bad, stop, due, skipped = run.world.sum([float(self.bad_steps), float(self.stop.requested), float(due),
                                                 float(self.skipped)])
        self.count_skipped(int(skipped))
        if log and self.window_losses:
            self.log(sum(self.window_losses) / len(self.window_losses))
        if bad:
            self.handle_non_finite(int(bad))
        every = train_cfg.checkpoint_every_steps
        if stop:
            self.save(is_best=False)
            raise Interrupted(self.stop.reason or 'stop requested on another rank')
        if (due or (every and state.step % every == 0)) and not epoch_end:  # end_epoch saves anyway
            self.save(is_best=False)

    def count_skipped(self, skipped_on_all_ranks: int):
        """Adds the ranks' replaced images to the epoch's count; too many stop the run (the data is broken)."""
        state, cfg = self.run.state, self.run.recipe.data
        state.skipped_in_epoch += skipped_on_all_ranks
        self.skipped = 0
        allowed = cfg.max_bad_fraction * len(self.run.train_loader.dataset)
        if state.skipped_in_epoch > allowed:
            raise UserError(f'{state.skipped_in_epoch} unreadable training images in epoch {state.epoch + 1}, more '
                            f'than data.max_bad_fraction {cfg.max_bad_fraction:g} of the split allows '
                            f'({allowed:.0f}): check them with python -m mnv_train.check_data DATA_DIR')

    def log(self, loss: float):
        run = self.run
        self.window_losses = []
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{loss:.4f}', lr=f'{run.lr():.3g}')
        elapsed = time.perf_counter() - self.window_start
        rate = self.window_samples / elapsed if elapsed > 0 else 0.0
        self.window_start, self.window_samples = time.perf_counter(), 0
        fp16 = ''
        if run.scaler.is_enabled():
            fp16 = (f'  loss scale {run.scaler.get_scale():.0f}, {run.state.skipped_steps_in_epoch} step(s) skipped '
                    f'this epoch')
        if self.bar is None:
            logs.info(f'step {run.state.step}/{run.total_steps}  loss {loss:.4f}  lr {run.lr():.3g}  '
                      f'{rate:.0f} img/s{fp16}')
        run.metrics.scalars(run.state.step, {'train/loss': loss, 'train/lr': run.lr(), 'train/img_per_s': rate})

    def epoch_loss(self) -> float:
        self.sync_point(log=False, epoch_end=True)
        state = self.run.state
        mean = state.loss_sum / state.loss_count if state.loss_count else float('nan')
        state.loss_sum, state.loss_count = 0.0, 0
        return mean

    def weights_finite(self) -> bool:
        flags = [torch.isfinite(p).all() for p in self.run.module.parameters()]
        return self.run.world.sum([float(not torch.stack(flags).all())])[0] == 0

    def handle_non_finite(self, bad_steps: int):
        run = self.run
        limit = run.recipe.train.max_bad_steps
        if self.weights_finite() and bad_steps < limit:
            logs.warn(f'non-finite loss in the last {bad_steps} step(s) up to step {run.state.step}; the steps were '
                      f'skipped (fp16 loss scale {run.scaler.get_scale() if run.scaler.is_enabled() else "off"})')
            return
        self.roll_back(f'loss was non-finite for {bad_steps} step(s) up to step {run.state.step} '
                       f'(lr {run.lr():.3g})')

    def roll_back(self, why: str):
        run = self.run
        found = run.checkpointer.latest_valid()
        self.rollbacks += 1
        if found is None or self.rollbacks > 2:
            raise UserError(f'{why}; {"no checkpoint to roll back to" if found is None else "it happened again after rolling back twice"}: '
                            f'lower optim.lr or set optim.clip_grad')
        path, payload = found
        logs.warn(f'{why}; rolling back to {path}')
        checkpoint.restore(run, payload)
        run.optimizer.zero_grad(set_to_none=True)
        self.bad_steps, self.losses, self.window_losses = 0, [], []
        self.end_epoch()
        raise RolledBack()

    def save(self, is_best: bool):
        """Checkpoint the run; weights that are not finite are never written over good ones."""
        self.flush()
        self.count_skipped(int(self.run.world.sum([float(self.skipped)])[0]))
        if not self.weights_finite():
            self.roll_back(f'weights became non-finite by step {self.run.state.step}')
        if self.run.world.is_main:
            payload, manifest = checkpoint.capture(self.run)
            self.run.checkpointer.save(payload, manifest, is_best)
        self.last_save = time.monotonic()


class RolledBack(Exception):
    """The run went back to an earlier checkpoint; the epoch loop restarts from the restored state."""


class BudgetSpent(Exception):
    """The monitor has seen all the optimizer steps it was given (or chose to stop early)."""


class StepBudget(StepMonitor):
    """The real training step for a fixed number of optimizer steps, without logging, checkpoints or stop votes.

    Shared by the LR range test and the --dry-run benchmark, so that both measure exactly what training runs.
    step_ends holds time.perf_counter() after each step, with the device drained first.
    """

    def __init__(self, run: Run, steps: int):
        super().__init__(run, StopFlag())
        self.steps = steps
        self.step_ends: list[float] = []

    def after_step(self):
        if self.run.world.device.type == 'cuda':
            torch.cuda.synchronize(self.run.world.device)
        self.step_ends.append(time.perf_counter())
        if len(self.step_ends) >= self.steps:
            raise BudgetSpent()


def train_steps(run: Run, monitor: StepBudget):
    """engine.train_one_epoch over as many epochs as the monitor's budget needs."""
    epoch = run.state.epoch
    try:
        while True:
            train_one_epoch(run, epoch, monitor)
            epoch, run.state.samples_in_epoch = epoch + 1, 0
    except BudgetSpent:
        pass
