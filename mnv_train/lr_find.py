"""LR range test: a few hundred real training steps with the LR growing exponentially, then a suggested peak LR.

python -m mnv_train.lr_find --recipe NAME [--set key=value ...] [--steps 100] [--min-lr 1e-7] [--max-lr 1]
writes lr_find.png (loss against LR) and lr_find.json into --output (default runs/NAME-lr-find).
The LRs are absolute, for the global batch of the run built here, so they compare with the batch plan's peak LR.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed, logs
from . import recipe as recipes
from .build import Run, build_run
from .engine import BudgetSpent, Pending, train_steps
from .entry import Parser, add_recipe_arguments, guarded, make_folder, recipe_overrides
from .errors import UserError
from .plots import pyplot

DIVERGED = 4.0  # stop once the smoothed loss is this many times its lowest value
MIN_STEPS = 10


class RangeTest:
    """Sets each step's LR on an exponential ramp and records the mean loss of the step's micro-batches."""

    def __init__(self, run: Run, steps: int, min_lr: float, max_lr: float):
        self.run, self.steps = run, steps
        self.ramp = [min_lr * (max_lr / min_lr) ** (i / (steps - 1)) for i in range(steps)]
        self.lrs: list[float] = []
        self.losses_seen: list[float] = []
        self.stop_reason = ''
        self.set_lr(self.ramp[0])

    def set_lr(self, lr: float):
        for group in self.run.optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)

    def after_step(self, pending: Pending):
        """Record the step's loss, averaged over ranks so that every rank takes the same decisions; stops the test
        (BudgetSpent, caught by engine.train_steps) when the loss is no longer finite or has diverged."""
        world = self.run.world
        losses, _, _ = pending.read_back()
        loss = world.sum([torch.tensor(losses).mean().item()])[0] / world.size  # float32 mean, as the losses
        lr = self.ramp[len(self.lrs)]
        if not math.isfinite(loss):
            self.stop_reason = f'loss became non-finite at lr {lr:.3g}'
            raise BudgetSpent()
        self.lrs.append(lr)
        self.losses_seen.append(loss)
        smoothed = smooth(self.losses_seen)
        if len(smoothed) >= MIN_STEPS and smoothed[-1] > DIVERGED * min(smoothed):
            self.stop_reason = f'loss diverged at lr {lr:.3g}'
            raise BudgetSpent()
        if len(self.lrs) < self.steps:
            self.set_lr(self.ramp[len(self.lrs)])


def smooth(losses: list[float]) -> list[float]:
    """Bias-corrected exponential moving average over about a tenth of the steps: single batches are noisy."""
    span = max(2, len(losses) // 10)
    beta = 1 - 2 / (span + 1)
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float]) -> dict:
    """The suggested peak LR and the numbers behind it.

    steepest: where the smoothed loss falls fastest per decade of LR, looking only below the LR of the lowest
    loss. That is the largest LR at which training still clearly gains from a bigger step, before the curve
    turns unstable; it is the suggestion. min_loss / 10: a tenth of the LR at the lowest loss, the cautious
    alternative when the curve is too noisy to have a clear steepest point.
    """
    lowest = int(np.argmin(smoothed))
    min_loss_lr = lrs[lowest]
    if lowest < 2:
        return {'suggested_lr': lrs[0], 'method': 'lowest LR tried: the loss never fell, try a lower --min-lr',
                'min_loss_lr': min_loss_lr, 'min_loss_lr_div10': min_loss_lr / 10}
    slopes = np.gradient(np.asarray(smoothed[:lowest + 1]), np.log10(lrs[:lowest + 1]))
    return {'suggested_lr': lrs[int(np.argmin(slopes))], 'method': 'steepest descent of the smoothed loss',
            'min_loss_lr': min_loss_lr, 'min_loss_lr_div10': min_loss_lr / 10}


def plot(path: Path, lrs: list[float], losses: list[float], smoothed: list[float], suggestion: dict,
         recipe_lr: float) -> bool:
    """loss against LR on a log axis, with the suggestion and the run's scheduled peak LR marked."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color='0.75', lw=1, label='loss per step')
    ax.plot(lrs, smoothed, color='C0', lw=2, label='smoothed')
    ax.axvline(suggestion['suggested_lr'], color='C2', ls='--', label=f'suggested {suggestion["suggested_lr"]:.3g}')
    ax.axvline(recipe_lr, color='C3', ls=':', label=f'recipe peak {recipe_lr:.3g}')
    ax.set(xscale='log', xlabel='learning rate', ylabel='train loss', title='LR range test')
    ax.set_ylim(top=1.05 * min(max(losses), DIVERGED * min(smoothed)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def find_lr(run: Run, steps: int, min_lr: float, max_lr: float) -> dict:
    """Run the range test on a freshly built run (its weights are spent afterwards) and return the result."""
    run.scheduler, run.ema = None, None  # the ramp sets every LR; the EMA is not looked at
    test = RangeTest(run, steps, min_lr, max_lr)
    train_steps(run, steps, test.after_step)
    if len(test.losses_seen) < MIN_STEPS:
        raise UserError(f'the LR range test stopped after {len(test.losses_seen)} step(s) '
                        f'({test.stop_reason or "too few steps"}): lower --min-lr or raise --steps')
    smoothed = smooth(test.losses_seen)
    return {'lrs': test.lrs, 'losses': test.losses_seen, 'smoothed': smoothed, 'steps_done': len(test.lrs),
            'stop_reason': test.stop_reason or f'ran all {steps} steps', **suggest_lr(test.lrs, smoothed)}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.lr_find', description='LR range test: train with an '
                                'exponentially growing LR and suggest a peak LR for the recipe\'s global batch')
    p.add_argument('--recipe', required=True, help='recipe name or path to a YAML file')
    add_recipe_arguments(p)
    p.add_argument('--steps', type=int, default=100, help='optimizer steps (default 100)')
    p.add_argument('--min-lr', type=float, default=1e-7)
    p.add_argument('--max-lr', type=float, default=1.0)
    p.add_argument('--output', help='folder for lr_find.png and lr_find.json (default runs/RECIPE-lr-find)')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda')
    return p


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.steps < MIN_STEPS:
        raise UserError(f'--steps {args.steps}: the range test needs at least {MIN_STEPS}')
    if not 0 < args.min_lr < args.max_lr:
        raise UserError(f'--min-lr {args.min_lr:g} and --max-lr {args.max_lr:g}: need 0 < min-lr < max-lr')
    recipe = recipes.load(args.recipe, recipe_overrides(args))
    world = distributed.init(args.device)
    logs.configure(world.is_main, False)
    output = Path(args.output) if args.output else Path('runs') / f'{recipe.name}-lr-find'
    if world.is_main:
        make_folder(output, 'the output folder')
    run = build_run(recipe, world, output)
    result = find_lr(run, args.steps, args.min_lr, args.max_lr)
    run.metrics.close()
    result = {'recipe': recipe.name, 'global_batch': run.plan.global_batch, 'recipe_peak_lr': run.plan.lr,
              **result}
    if world.is_main:
        (output / 'lr_find.json').write_text(json.dumps(result, indent=1))
        plotted = plot(output / 'lr_find.png', result['lrs'], result['losses'], result['smoothed'], result,
                       run.plan.lr)
        print(f'suggested peak lr {result["suggested_lr"]:.3g} at global batch {run.plan.global_batch} '
              f'({result["method"]}; min-loss/10 {result["min_loss_lr_div10"]:.3g}); the recipe schedules '
              f'{run.plan.lr:.3g}; {result["stop_reason"]}')
        print(f'wrote {output / "lr_find.json"}' + (f' and {output / "lr_find.png"}' if plotted else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
