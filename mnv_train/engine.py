"""The training loop: epochs of optimizer steps, and the points where a run logs, evaluates, saves, rolls back
or stops.

Nothing in a step waits for the device. What the steps leave there (losses, fp16 skip flags) is read back at
sync points, the log points, the periodic checkpoints and the epoch ends, which is also where the ranks agree
on non-finite losses, unreadable images and the checkpoint clock. A stop request (SIGTERM, SIGUSR1) is voted on
the host after every optimizer step, so it reaches every rank within one step.
"""
from __future__ import annotations

import itertools
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from timm.utils import dispatch_clip_grad

from . import diagnostics, evaluation, logs, resume
from .build import Run
from .data import derive_seed, device_batches, seed_everything
from .diagnostics import duration
from .errors import UserError
from .runlock import RunLock

STEP_STREAM = 0x5EED  # keeps per-step seeds apart from per-sample ones
MAX_ROLLBACKS = 2  # roll-backs for non-finite losses before the run gives up


class StopFlag:
    """Set from a signal handler (SIGTERM/SIGUSR1: preemption); read by the loop at step boundaries."""

    def __init__(self):
        self.requested, self.reason = False, ''

    def request(self, reason: str):
        self.requested, self.reason = True, reason


class Interrupted(Exception):
    """Training stopped early, on a signal or at --max-steps, after saving a checkpoint.

    Raised in train_one_epoch; train.py catches it and exits 0, printing the command that resumes the run.
    """


class RolledBack(Exception):
    """The run went back to its last good checkpoint after non-finite losses or weights.

    Raised by roll_back (from sync or save_checkpoint); fit catches it and carries on from the restored state.
    """


class BudgetSpent(Exception):
    """train_steps has run the steps it was given, or its caller's after_step chose to stop; train_steps catches
    it."""


# ---------------------------------------------------------------------------------------------- the loop

def fit(run: Run, stop: StopFlag, max_steps: int = 0, lock: Optional[RunLock] = None):
    """Train from wherever run.state is to the end of the schedule (or to max_steps, then checkpoint and stop),
    keeping the run folder's lock alive."""
    watch = Watch(run, stop, max_steps, lock)
    while run.state.epoch < run.epochs:
        try:
            train_one_epoch(run, run.state.epoch, watch)
            finish_epoch(run, watch)
        except RolledBack:  # run.state is an earlier checkpoint's: carry on from there
            continue
        except RuntimeError as e:  # DataLoader's report of a worker killed by a signal (OOM killer, kill -9)
            if 'DataLoader worker (pid' not in str(e):
                raise
            stop_after_dead_worker(run, watch, e)  # raises UserError
    run.metrics.close()


def train_one_epoch(run: Run, epoch: int, watch: Watch):
    """The epoch's remaining optimizer steps; after each, the points where the run may stop, log, roll back or
    save, each rule asked of the part that owns it."""
    watch.progress.begin_epoch(run, epoch)
    for step in optimizer_steps(run, epoch, watch.pending):
        epoch_end = run.state.samples_in_epoch >= run.samples_per_epoch
        watch.progress.count_step(run.plan.global_batch)
        watch.keep_alive()  # the lock's heartbeat; a dead torchrun agent becomes a stop request
        save_due = run.checkpointer.due_by_steps(step) and not epoch_end  # finish_epoch saves the epoch end
        if watch.progress.due(step):
            window_loss, clock_due = sync(run, watch, at_log_point=True)  # may roll back: raises RolledBack
            watch.progress.log(run, window_loss, watch.pending)
            save_due = save_due or (clock_due and not epoch_end)
        if watch.stop_agreed(step):  # --max-steps, or a signal on any rank (a host-side vote every step)
            save_checkpoint(run, watch)
            raise Interrupted(watch.stop.reason)  # train.py exits 0 and says how to resume
        if save_due:
            save_checkpoint(run, watch)
    watch.progress.end_epoch()


def finish_epoch(run: Run, watch: Watch):
    """The epoch's row of metrics (evaluated when train.eval_every says so), its report and its checkpoint."""
    sync(run, watch)  # may roll back: raises RolledBack
    state, epoch = run.state, run.state.epoch
    row = epoch_row(run)
    if evaluation.due(epoch, run.epochs, run.recipe.train.eval_every):
        row.update(evaluation.evaluate_run(run, epoch))
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
    save_checkpoint(run, watch, is_best=improved)
    run.metrics.write_history(state.history)


# ---------------------------------------------------------------------------------------------- one step

def optimizer_steps(run: Run, epoch: int, pending: Pending) -> Iterator[int]:
    """The epoch's optimizer steps from run.state's position, yielding the step number after each.

    Training, the LR range test and the benchmarks share it, so that they measure exactly what trains.
    """
    state, accum = run.state, run.plan.accum_steps
    run.model.train()
    for batch_index, (images, targets, skipped) in timed(epoch_batches(run, epoch), pending):
        pending.in_step = True  # the run's state changes from here until the step is counted
        seed_micro_batch(run, state.step, batch_index % accum)
        images, targets = run.augment(images, targets, epoch)
        finishing = (batch_index + 1) % accum == 0
        pending.record_batch(forward_backward(run, images, targets, finishing), skipped)
        if finishing:
            pending.record_update(*optimizer_step(run))
            state.add_samples(run.plan.global_batch)
            pending.in_step = False
            yield state.step


def seed_micro_batch(run: Run, step: int, micro_step: int):
    """Every RNG seeded for this rank's micro-batch `micro_step` of optimizer step `step`. The key is the
    micro-batch's place in the step, not the rank: any world size and accumulation with the same product and
    per-device batch draw the same Mixup/CutMix, erasing, drop-path and dropout."""
    seed_everything(derive_seed(run.recipe.train.seed, STEP_STREAM, step,
                                run.train_sampler.micro_batch_index(micro_step)))


def timed(batches, pending: Pending):
    """The batches, adding the time the loop waited for each to pending.data_wait."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        pending.data_wait += time.perf_counter() - start
        yield batch


def epoch_batches(run: Run, epoch: int):
    """(batch index within the epoch, device batch) from the run's position, for the epoch's optimizer steps."""
    steps_done = run.state.samples_in_epoch // run.plan.global_batch
    run.train_sampler.set_position(epoch, steps_done * run.plan.global_batch)
    done = steps_done * run.plan.accum_steps
    remaining = max(0, run.steps_per_epoch * run.plan.accum_steps - done)
    batches = device_batches(run.train_loader, run.train_input, limit=remaining)
    return zip(itertools.count(done), batches)


def forward_backward(run: Run, images, targets, finishing: bool) -> torch.Tensor:
    """One micro-batch: loss and gradients (all-reduced by DDP only on the step's last micro-batch)."""
    with run.no_sync(finishing), run.autocast():
        loss = run.loss(images, targets)
    run.scaler.scale(loss / run.plan.accum_steps).backward()
    return loss.detach()


def optimizer_step(run: Run) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Clip, step, schedule, average BatchNorm over ranks, EMA. Returns two device values for the log, without
    reading them back: with fp16, whether the loss scaler skipped the update (inf/NaN gradients), and with norm
    clipping, the gradient norm. Even on a skipped step the step counter, the LR schedule and the EMA advance, as
    in timm: the schedule stays a function of samples seen, and the EMA decays towards weights that did not change."""
    clip, grad_norm = run.recipe.optim, None
    if clip.clip_grad is not None:
        run.scaler.unscale_(run.optimizer)
        if clip.clip_mode == 'norm':  # what dispatch_clip_grad does for 'norm', keeping the norm it computes
            grad_norm = torch.nn.utils.clip_grad_norm_(run.trained_parameters(), clip.clip_grad)
        else:
            dispatch_clip_grad(run.trained_parameters(), clip.clip_grad, mode=clip.clip_mode)
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
    return (run.scaler._scale < scale_before if scale_before is not None else None), grad_norm


# ---------------------------------------------------------------------------------------------- between steps

@dataclass
class Pending:
    """What the steps since the last sync point left behind, kept off the device's critical path."""
    losses: list = field(default_factory=list)  # device scalars, one per micro-batch
    fp16_skips: list = field(default_factory=list)  # device flags, one per optimizer step (fp16 only)
    grad_norms: list = field(default_factory=list)  # device scalars, one per optimizer step (norm clipping only)
    images_skipped: int = 0  # unreadable images this rank replaced
    data_wait: float = 0.0  # seconds the loop waited for batches
    in_step: bool = False  # an optimizer step is under way: the model, optimizer and state are not in step

    def record_batch(self, loss: torch.Tensor, images_skipped: int):
        self.losses.append(loss)
        self.images_skipped += images_skipped

    def record_update(self, skipped: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor]):
        if skipped is not None:
            self.fp16_skips.append(skipped)
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def read_back(self) -> tuple[list[float], int, int]:
        """(losses, fp16 steps skipped, images skipped) since the last call: one device sync."""
        losses = torch.stack(self.losses).float().tolist() if self.losses else []
        fp16 = int(torch.stack(self.fp16_skips).sum()) if self.fp16_skips else 0
        images = self.images_skipped
        self.losses, self.fp16_skips, self.images_skipped = [], [], 0
        return losses, fp16, images

    def read_log_values(self) -> tuple[float, Optional[float]]:
        """(seconds waited for data, mean gradient norm) since the last call, for the log."""
        grad_norm = float(torch.stack(self.grad_norms).float().mean()) if self.grad_norms else None
        wait, self.data_wait, self.grad_norms = self.data_wait, 0.0, []
        return wait, grad_norm


class NonFiniteGuard:
    """Non-finite losses in a row, and roll-backs so far. A few bad losses are tolerated (fp16 overflows skip
    their steps by themselves); train.max_bad_steps of them in a row, or weights that stopped being finite,
    send the run back to its last good checkpoint, at most MAX_ROLLBACKS times."""

    def __init__(self, limit: int):
        self.limit, self.bad_in_a_row, self.rollbacks = limit, 0, 0

    def observe(self, losses: list[float]) -> int:
        """Counts the trailing run of non-finite losses, continued from the previous read if none was finite."""
        trailing = next((i for i, v in enumerate(reversed(losses)) if math.isfinite(v)), len(losses))
        self.bad_in_a_row = self.bad_in_a_row + trailing if trailing == len(losses) else trailing
        return self.bad_in_a_row

    def tolerates(self, bad_in_a_row: int, weights_finite: bool) -> bool:
        return weights_finite and bad_in_a_row < self.limit


class Progress:
    """train.log_every: the log line, the TensorBoard scalars and the progress bar, with the throughput since the
    last log point."""

    def __init__(self, every: int):
        self.every, self.bar, self.estimated = every, None, False
        self.window_start, self.window_samples, self.window_losses = time.perf_counter(), 0, []

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def begin_epoch(self, run: Run, epoch: int):
        self.bar = logs.progress(run.steps_per_epoch, run.state.samples_in_epoch // run.plan.global_batch,
                                 f'epoch {epoch + 1}/{run.epochs}')

    def end_epoch(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def count_step(self, samples: int):
        self.window_samples += samples
        if self.bar is not None:
            self.bar.update(1)

    def log(self, run: Run, loss: Optional[float], pending: Pending):
        """The log line, a row of steps.csv and the step scalars (TensorBoard, trackers), with the throughput,
        the share of time spent waiting for data and the mean gradient norm since the previous log point."""
        if loss is None:  # no finite loss since the last log point: the guard has warned about it
            return
        elapsed = time.perf_counter() - self.window_start
        rate = self.window_samples / elapsed if elapsed > 0 else 0.0
        waited, grad_norm = pending.read_log_values()
        self.window_start, self.window_samples = time.perf_counter(), 0
        state, lr = run.state, run.lr()
        scale = run.scaler.get_scale() if run.scaler.is_enabled() else None
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.3g}')
        fp16 = f'  loss scale {scale:.0f}, {state.skipped_steps_in_epoch} step(s) skipped this epoch' if scale else ''
        if self.bar is None:
            logs.info(f'step {state.step}/{run.total_steps}  loss {loss:.4f}  lr {lr:.3g}  {rate:.0f} img/s{fp16}')
        if not self.estimated and rate > 0:  # from the first steps, as --dry-run does before the run
            self.estimated = True
            remaining = run.total_steps - state.step
            logs.info(f'at {rate:.0f} img/s the remaining {remaining} steps take about '
                      f'{duration(remaining * run.plan.global_batch / rate)} (evaluation not included)')
        share = min(1.0, waited / elapsed) if elapsed > 0 else None
        run.metrics.step_row({'step': state.step, 'epoch': state.epoch + state.samples_in_epoch /
                              run.samples_per_epoch, 'lr': lr, 'train_loss': loss, 'img_per_s': rate,
                              'data_wait': share, 'grad_norm': grad_norm, 'loss_scale': scale})
        run.metrics.scalars(state.step, {'train/loss': loss, 'train/lr': lr, 'train/img_per_s': rate,
                                         'train/data_wait': share, 'train/grad_norm': grad_norm,
                                         'train/loss_scale': scale})


class Watch:
    """What the loop keeps between sync points: the stop request, what the steps left on the device, the
    non-finite guard and the progress log."""

    def __init__(self, run: Run, stop: StopFlag, max_steps: int = 0, lock: Optional[RunLock] = None):
        self.run, self.stop, self.max_steps, self.lock = run, stop, max_steps, lock
        self.parent = os.getppid() if 'TORCHELASTIC_RUN_ID' in os.environ else None  # the torchrun agent
        self.pending = Pending()
        self.guard = NonFiniteGuard(run.recipe.train.max_bad_steps)
        self.progress = Progress(run.recipe.train.log_every)

    def keep_alive(self):
        """Refreshes the lock's heartbeat (at most every 30 s), and turns the death of the torchrun agent into a
        stop request: ranks that outlive their launcher would hold the GPUs and write beside a restarted job.
        (distributed.init also asks Linux for a SIGTERM when the agent dies; this catches what that misses.)"""
        if self.lock is not None:
            self.lock.heartbeat()
        if self.parent is not None and os.getppid() != self.parent and not self.stop.requested:
            self.stop.request('the torchrun agent died')

    def stop_agreed(self, step: int) -> bool:
        """--max-steps (the same step on every rank), or a stop requested on any rank: a host-side vote after
        every optimizer step, so a preemption signal to one rank stops them all within one step."""
        if self.max_steps and step >= self.max_steps:
            self.stop.request(f'reached --max-steps {self.max_steps}')
            return True
        try:
            requester = self.run.world.first_rank_with(self.stop.requested)
        except RuntimeError as e:  # a rank died: nothing can be agreed, so nothing is written
            raise UserError(f'the other ranks are unreachable ({str(e).splitlines()[0][:120]}); stopping without a '
                            f'checkpoint: resume from the last one with --resume auto') from None
        if requester is not None and not self.stop.requested:
            self.stop.request(f'stop requested on rank {requester}')
        return requester is not None

    def discard_pending(self):
        self.pending = Pending()
        self.guard.bad_in_a_row = 0
        self.progress.window_losses = []


def sync(run: Run, watch: Watch, at_log_point: bool = False) -> tuple[Optional[float], bool]:
    """Read back what the steps left on the device and agree with the other ranks in one collective.

    Adds the losses and skip counts to the epoch's, stops the run when too many images were unreadable, and
    acts on non-finite losses (may roll back: raises RolledBack). At a log point, returns the mean finite loss
    since the previous one and whether rank 0's clock says a periodic checkpoint is due (train.
    checkpoint_every_minutes is looked at there only, where the ranks meet anyway).
    """
    state = run.state
    losses, fp16_skipped, images_skipped = watch.pending.read_back()
    bad = watch.guard.observe(losses)
    clock = at_log_point and run.world.is_main and run.checkpointer.due_by_clock()
    bad_anywhere, images_skipped, clock = run.world.sum([float(bad), float(images_skipped), float(clock)])
    finite = [v for v in losses if math.isfinite(v)]
    state.loss_sum += sum(finite)
    state.loss_count += len(finite)
    state.skipped_steps_in_epoch += fp16_skipped  # the same on every rank: DDP all-reduces what the scaler checks
    count_unreadable(run, int(images_skipped))
    if bad_anywhere:
        guard_non_finite(run, watch, int(bad_anywhere))
    window = watch.progress.window_losses
    window += finite
    if not at_log_point:
        return None, False
    watch.progress.window_losses = []
    return (sum(window) / len(window) if window else None), clock > 0


def count_unreadable(run: Run, images: int):
    """Adds the ranks' replaced images to the epoch's count; too many stop the run (the data is broken)."""
    state, cfg = run.state, run.recipe.data
    state.skipped_in_epoch += images
    allowed = cfg.max_bad_fraction * len(run.train_loader.dataset)
    if state.skipped_in_epoch > allowed:
        raise UserError(f'{state.skipped_in_epoch} unreadable training images in epoch {state.epoch + 1}, more '
                        f'than data.max_bad_fraction {cfg.max_bad_fraction:g} of the split allows '
                        f'({allowed:.0f}): check them with python -m mnv_train.check_data DATA_DIR')


def guard_non_finite(run: Run, watch: Watch, bad_in_a_row: int):
    """Warns about a few non-finite losses; rolls back (raises RolledBack) after too many or on bad weights."""
    if watch.guard.tolerates(bad_in_a_row, weights_finite(run)):
        logs.warn(f'non-finite loss in the last {bad_in_a_row} step(s) up to step {run.state.step}; the steps were '
                  f'skipped (fp16 loss scale {run.scaler.get_scale() if run.scaler.is_enabled() else "off"})')
        return
    roll_back(run, watch, f'loss was non-finite for {bad_in_a_row} step(s) up to step {run.state.step} '
                          f'(lr {run.lr():.3g})')


def weights_finite(run: Run) -> bool:
    """Whether every rank's weights are finite (one collective)."""
    flags = [torch.isfinite(p).all() for p in run.module.parameters()]
    return run.world.sum([float(not torch.stack(flags).all())])[0] == 0


def roll_back(run: Run, watch: Watch, why: str):
    """Back to the newest checkpoint that loads, then RolledBack (fit carries on from there); after
    MAX_ROLLBACKS, or with no checkpoint, the run stops with a UserError that says what to change."""
    found = resume.agreed_checkpoint(run.checkpointer, run.world)
    watch.guard.rollbacks += 1
    if found is None or watch.guard.rollbacks > MAX_ROLLBACKS:
        again = 'no checkpoint to roll back to' if found is None else 'it happened again after rolling back twice'
        raise UserError(f'{why}; {again}: lower optim.lr or set optim.clip_grad')
    path, payload = found
    logs.warn(f'{why}; rolling back to {path}')
    resume.restore(run, payload, str(path))
    run.metrics.restart_at(run.state.step)
    run.optimizer.zero_grad(set_to_none=True)
    watch.discard_pending()
    watch.progress.end_epoch()
    raise RolledBack()  # caught by fit


def save_checkpoint(run: Run, watch: Watch, is_best: bool = False):
    """Checkpoint the run as it stands; weights that are not finite are never written over good ones."""
    sync(run, watch)  # the epoch's losses and skip counts belong in the saved state
    if not weights_finite(run):
        roll_back(run, watch, f'weights became non-finite by step {run.state.step}')  # raises RolledBack
    payload, manifest = resume.capture(run) if run.world.is_main else (None, None)
    run.checkpointer.save(payload, manifest, is_best)


def stop_after_dead_worker(run: Run, watch: Watch, error: RuntimeError):
    """Saves the last completed step where that is safe, then stops with one line that names the worker and
    says how to resume. Another rank may be waiting in a collective, so only a single process saves."""
    worker = re.search(r'DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (.*)', str(error))
    who = f'pid {worker.group(1).strip()}' if worker else 'a loader worker'
    how = worker.group(2).strip(' .') if worker and worker.group(2) else 'exited unexpectedly'
    saved = 'the newest checkpoint in it is the one to resume from'
    if not run.world.distributed and not watch.pending.in_step:  # between steps: nothing is half done
        save_checkpoint(run, watch)
        saved = f'step {run.state.step} was saved'
    raise UserError(f'data loader worker {who} died ({how}), e.g. out of memory: {saved}; continue with '
                    f'--resume auto --output {run.run_dir}')


def epoch_row(run: Run) -> dict:
    """The epoch's line of metrics.csv before evaluation; starts the next epoch's loss sums."""
    state = run.state
    row = {'epoch': state.epoch, 'step': state.step, 'lr': run.lr(),
           'train_loss': state.loss_sum / state.loss_count if state.loss_count else float('nan'),
           'skipped_images': state.skipped_in_epoch}
    if run.scaler.is_enabled():
        row['fp16_skipped_steps'] = state.skipped_steps_in_epoch
    state.loss_sum, state.loss_count = 0.0, 0
    return row


# ---------------------------------------------------------------------------------------------- for tools

def train_steps(run: Run, steps: int, after_step: Optional[Callable[[Pending], None]] = None) -> list[float]:
    """`steps` optimizer steps of the real training step, across epoch ends, without logging, checkpoints or stop
    votes; returns time.perf_counter() after each, the device drained first. after_step(pending) runs after
    each step and may raise BudgetSpent to stop early. The LR range test and the benchmarks use it."""
    pending, ends, epoch = Pending(), [], run.state.epoch
    try:
        while True:
            for _ in optimizer_steps(run, epoch, pending):
                if run.world.device.type == 'cuda':
                    torch.cuda.synchronize(run.world.device)
                ends.append(time.perf_counter())
                if after_step is not None:
                    after_step(pending)
                if len(ends) >= steps:
                    raise BudgetSpent()
            epoch, run.state.samples_in_epoch = epoch + 1, 0
    except BudgetSpent:  # raised just above, or by after_step
        return ends
