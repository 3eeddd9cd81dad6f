"""Where a run stands, and exact resume: capturing it into a checkpoint payload and putting it back.

The position is TrainState; everything else about it (sampler position, LR, per-sample and per-step seeds)
is derived from it. The RNG states are saved too, for whatever a library draws outside those seeds.
"""
from __future__ import annotations

import fnmatch
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint
from . import model as models
from .distributed import World
from .errors import UserError, summary
from .recipe import flatten


@dataclass
class TrainState:
    """Where the run is; everything else about the position is derived from this."""
    epoch: int = 0
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # over all ranks, all epochs
    samples_in_epoch: int = 0  # over all ranks, this epoch
    loss_sum: float = 0.0  # finite train losses of this epoch, summed, and how many
    loss_count: int = 0
    skipped_in_epoch: int = 0  # unreadable training images replaced this epoch, over all ranks
    skipped_steps_in_epoch: int = 0  # fp16: optimizer steps the loss scaler skipped (inf/NaN gradients)
    best_top1: Optional[float] = None
    best_epoch: Optional[int] = None
    history: list = field(default_factory=list)  # one dict of metrics per finished epoch

    def add_samples(self, samples: int):
        """An optimizer step of `samples` samples, over all ranks, is done (optimizer_step counts the step)."""
        self.samples_in_epoch += samples
        self.samples_seen += samples


def rng_state() -> dict:
    # no CUDA generators: the loop reseeds them at every micro-step, and a checkpoint from 8 GPUs must load on 1
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {'python': random.getstate(), 'numpy': [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            'torch': torch.get_rng_state()}


def set_rng_state(state: dict):
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])  # older checkpoints' per-GPU 'cuda' states are ignored on purpose


def capture(run) -> tuple[dict, dict]:
    """(payload, manifest) for the run as it stands after its last optimizer step."""
    payload = {
        'model': run.module.state_dict(),
        'ema': run.ema.module.state_dict() if run.ema is not None else None,
        'optimizer': run.optimizer.state_dict(),
        'scaler': run.scaler.state_dict(),
        'state': asdict(run.state),
        'rng': rng_state(),
        'recipe': run.recipe.to_dict(),
        'plan': {'world_size': run.plan.world_size, 'per_device': run.plan.per_device,
                 'accum_steps': run.plan.accum_steps, 'global_batch': run.plan.global_batch},
        # the teacher's path and sha256, not its weights
        'distill': run.distillation.record() if run.distillation is not None else None,
        'trackers': run.metrics.tracker_ids(),  # W&B / MLflow run ids, continued on resume
    }
    last = run.state.history[-1] if run.state.history else {}
    manifest = {'step': run.state.step, 'epoch': run.state.epoch, 'samples_seen': run.state.samples_seen,
                'metrics': last, 'best_top1': run.state.best_top1}
    return payload, manifest


def agreed_checkpoint(checkpointer: checkpoint.Checkpointer, world: World) -> Optional[tuple[Path, dict]]:
    """The newest valid checkpoint as rank 0 sees it, loaded on every rank (None when there is none).

    On a network filesystem a node can list the folder as it was a while ago: rank 0 alone chooses, every other
    rank loads the path it was sent, and the ranks compare the step and sha256 they loaded. Any disagreement
    stops every rank in one line (ranks that resumed from different states would train on silently).
    """
    found = world.run_on_main(checkpointer.latest_valid, 'choose the checkpoint to resume from')
    chosen = world.broadcast_from_main(str(found[0]) if found is not None else None)
    if chosen is None:
        return None
    path, payload, failure = Path(chosen), found[1] if found is not None else None, None
    try:
        payload = payload or checkpoint.load(path, needs=checkpoint.RUN_PARTS)
        view = (payload['state']['step'], checkpoint.read_manifest(path)['sha256'])
    except Exception as e:  # reported below, on every rank, rather than leaving the others waiting
        failure, view = e, summary(e)
    views = world.gather(view)
    if failure is not None and not isinstance(failure, UserError):
        raise failure  # a bug keeps its traceback on its rank; the others stop in one line below
    for rank, view in enumerate(views):
        if view != views[0] or not isinstance(view, tuple):
            raise UserError(f'rank {rank} did not load the checkpoint rank 0 chose, {path} ({describe(views[0])}), '
                            f'but {describe(view)}: every node must see the run folder alike (one shared, '
                            f'consistent filesystem); pass --resume PATH with a checkpoint every node can read')
    return path, payload


def describe(view) -> str:
    """A rank's view of a checkpoint for agreed_checkpoint's message: (step, sha256), or the error it met."""
    return f'step {view[0]}, sha256 {view[1][:12]}' if isinstance(view, tuple) else view


def match_parameter_layout(optimizer: torch.optim.Optimizer):
    """Optimizer moments in the memory layout of their parameters, which may differ from the saved run's
    (train.channels_last toggled): fused and foreach kernels expect the two to match."""
    for group in optimizer.param_groups:
        for parameter in group['params']:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == parameter.shape \
                        and value.stride() != parameter.stride():
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def restore(run, payload: dict, source: str) -> list[str]:
    """Put a checkpoint (`source` names it in messages) back into a freshly built run; returns notes on what had
    to be adapted."""
    notes = []
    models.load_weights(run.module, payload['model'], source)
    if run.ema is not None:
        if payload.get('ema') is not None:
            models.load_weights(run.ema.module, payload['ema'], f'{source} (EMA weights)')
        else:
            run.ema.module.load_state_dict(payload['model'])
            notes.append('the checkpoint has no EMA weights; EMA restarts from the model weights')
    try:
        run.optimizer.load_state_dict(payload['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f'{source}: its optimizer state does not fit optim.name {run.recipe.optim.name!r} '
                        f'({str(e).splitlines()[0]})') from None
    match_parameter_layout(run.optimizer)
    if run.distillation is not None and payload.get('distill'):
        notes += run.distillation.restore(payload['distill'])
    if payload['scaler'] or not run.scaler.is_enabled():
        run.scaler.load_state_dict(payload['scaler'])
    else:
        notes.append('the checkpoint was trained without fp16 loss scaling: the loss scale starts fresh')
    run.state = TrainState(**payload['state'])
    old_batch = payload['plan']['global_batch']
    if old_batch != run.plan.global_batch:
        run.state.step = run.state.samples_seen // run.plan.global_batch
        notes.append(f'global batch changed {old_batch} -> {run.plan.global_batch}: resuming at step '
                     f'{run.state.step} by samples seen ({run.state.samples_seen})')
    elif payload['plan']['world_size'] != run.plan.world_size:
        notes.append(f'world size changed {payload["plan"]["world_size"]} -> {run.plan.world_size}: same global '
                     f'batch, accumulation {payload["plan"]["accum_steps"]} -> {run.plan.accum_steps}')
    old_per_device = payload['plan']['per_device']
    if old_per_device != run.plan.per_device:
        notes.append(f'per-device batch changed {old_per_device} -> {run.plan.per_device}: the trajectory will differ '
                     f'from the saved run\'s, since its micro-batches change (which images share BatchNorm '
                     f'statistics and Mixup/CutMix pairs, and the random draws of each)')
    if run.state.samples_in_epoch % run.plan.global_batch:
        run.state.samples_in_epoch -= run.state.samples_in_epoch % run.plan.global_batch
        notes.append('mid-epoch position rounded down to a whole step of the new global batch')
    if run.scheduler is not None:
        run.scheduler.step_update(run.state.step)
    set_rng_state(payload['rng'])  # a checkpoint's 'input' (DALI's generators, before it drew nothing) is ignored
    return notes


# Recipe keys that only extend or observe a run: changing them on resume is reported, not refused. Anything else
# (model, optimizer, LR, augmentation, batch, precision) changes what the run computes from here on.
OBSERVING_KEYS = ('name', 'description', 'provenance.*', 'schedule.epochs', 'data.data_dir', 'data.local',
                  'data.num_workers', 'data.val_split', 'data.eval_img_size', 'data.crop_pct', 'data.interpolation',
                  'data.extra_evals', 'data.synthetic_val_size', 'data.max_bad_fraction', 'model.pretrained_path',
                  'train.batch_size', 'train.log_every', 'train.eval_every', 'train.keep_checkpoints',
                  'train.keep_best_checkpoints', 'train.checkpoint_every_steps', 'train.checkpoint_every_minutes',
                  'train.max_bad_steps', 'train.lock_stale_minutes', 'train.wandb', 'train.wandb.*', 'train.mlflow',
                  'train.mlflow.*', 'train.fit_check_images', 'train.eval_suite', 'train.extra_eval_every',
                  'train.fit_check_every', 'data.eval_persistent_workers')


def recipe_changes(saved: dict, current: dict) -> list[tuple[str, Any, Any, bool]]:
    """(key, saved value, current value, only observes the run?) for every key that differs."""
    before, after = flatten(saved, whole=('model.kwargs',)), flatten(current, whole=('model.kwargs',))
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old != new:
            changes.append((key, old, new, any(fnmatch.fnmatchcase(key, p) for p in OBSERVING_KEYS)))
    return changes
