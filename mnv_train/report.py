"""The run report: report.md and PNG plots, from nothing but a run folder's metrics.csv and recipe.yaml.

Written at the end of training, and on demand with python -m mnv_train.report RUN_DIR (also while the run is
still going), so a run can be judged from its folder alone.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Optional

from . import checkpoint, logs
from . import recipe as recipes
from .diagnostics import ema_warm_step, top1_columns
from .entry import Parser, guarded
from .errors import UserError
from .optim import plan_batch, total_epochs
from .plots import pyplot, save_figure

OVERFIT_RISE = 0.05  # eval loss this far (relative) above its best while train loss still falls: overfitting
WARMING = 'warming up'


# ---------------------------------------------------------------------------------------------- inputs

def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv as one dict per epoch: numbers, None where an epoch was not evaluated."""
    path = run_dir / 'metrics.csv'
    if not path.is_file():
        raise UserError(f'{path} not found: not a run folder, or no epoch has finished yet')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise UserError(f'{path} holds no epochs yet')
    return [{key: number(path, key, value) for key, value in row.items()} for row in rows]


def number(path: Path, key: str, text: Optional[str]) -> Optional[float]:
    if text in ('', None):
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f'{path}: column {key!r} holds {text!r}, not a number') from None
    return int(value) if key in ('epoch', 'step') else value


def read_recipe(run_dir: Path) -> recipes.Recipe:
    path = run_dir / 'recipe.yaml'
    if not path.is_file():
        raise UserError(f'{path} not found: the report needs the run\'s resolved recipe')
    return recipes.from_dict(recipes.read_yaml_file(path))


def global_batch(run_dir: Path, recipe: recipes.Recipe) -> int:
    """The run's global batch, from its newest checkpoint (--global-batch may have changed it); else the recipe's."""
    try:
        manifest = checkpoint.read_manifest(run_dir / 'checkpoints' / 'last.pt')
        return manifest['samples_seen'] // manifest['step']
    except (UserError, KeyError, TypeError, ZeroDivisionError):
        return recipe.train.global_batch_size


def ema_flags(rows: list[dict], recipe: recipes.Recipe, batch: int) -> list[bool]:
    """Per epoch: were the EMA numbers taken while the EMA still held mostly its starting weights?"""
    if not recipe.ema.enabled:
        return [False] * len(rows)
    plan = plan_batch(recipe, 1, batch, batch)  # the decay and start step at the run's global batch
    warm = ema_warm_step(plan.ema_decay, plan.ema_start_step, recipe.ema.warmup)
    return [row.get('ema_top1') is not None and row['step'] < warm for row in rows]


# ---------------------------------------------------------------------------------------------- judgement

def fit_hint(rows: list[dict]) -> str:
    """Overfitting, still learning, or levelled off, from the eval loss (raw weights) against the train loss.

    The train loss carries augmentation, mixup and label smoothing, so it is compared by its trend, not its level.
    """
    evaluated = [row for row in rows if row.get('loss') is not None and math.isfinite(row['train_loss'])]
    if len(evaluated) < 2:
        return 'too few evaluated epochs to judge the fit'
    best = min(evaluated, key=lambda row: row['loss'])
    last = evaluated[-1]
    if (best is not last and last['loss'] > best['loss'] * (1 + OVERFIT_RISE)
            and last['train_loss'] < best['train_loss']):
        return (f'overfitting: eval loss rose from {best["loss"]:.4f} (epoch {best["epoch"] + 1}) to '
                f'{last["loss"]:.4f} while train loss fell from {best["train_loss"]:.4f} to '
                f'{last["train_loss"]:.4f}; use more augmentation or regularization, or checkpoints/best.pt')
    if best is last:
        hint = (f'underfitting: eval loss was still falling at the last epoch '
                f'({evaluated[-2]["loss"]:.4f} -> {last["loss"]:.4f}); more epochs would likely help')
        if last['train_loss'] > last['loss']:
            hint += (f', and with the train loss ({last["train_loss"]:.4f}) above the eval loss, the run may be '
                     f'more regularized than it needs')
        return hint
    return (f'levelled off: eval loss {last["loss"]:.4f} at the end, best {best["loss"]:.4f} '
            f'(epoch {best["epoch"] + 1}); neither clearly overfitting nor still improving')


# ---------------------------------------------------------------------------------------------- output

def write_report(run_dir: Path) -> Path:
    """run_dir/report.md and run_dir/plots/*.png from the run folder's metrics; returns the report's path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    recipe = read_recipe(run_dir)
    batch = global_batch(run_dir, recipe)
    flags = ema_flags(rows, recipe, batch)
    plots = draw_plots(run_dir / 'plots', rows, flags)
    path = run_dir / 'report.md'
    path.write_text(markdown(recipe, batch, rows, flags, plots, run_dir), encoding='utf-8')
    logs.info(f'report: {path}')
    return path


def markdown(recipe: recipes.Recipe, batch: int, rows: list[dict], flags: list[bool], plots: list[Path],
             run_dir: Path) -> str:
    columns = list(rows[0])
    tops = top1_columns(columns)
    last = rows[-1]
    lines = [f'# {recipe.name}', '',
             f'{recipe.model.name} on {recipe.data.dataset} at {recipe.data.img_size} px: {len(rows)} of '
             f'{total_epochs(recipe.schedule)} epochs, {last["step"]} optimizer steps '
             f'at global batch {batch}.', '']
    for key in tops:
        scored = [row for row in rows if row.get(key) is not None]
        if scored:
            best = max(scored, key=lambda row: row[key])
            lines.append(f'- best {key}: {best[key]:.2f} (epoch {best["epoch"] + 1}); last {scored[-1][key]:.2f}')
    lines += [f'- fit: {fit_hint(rows)}', '']
    if any(flags):
        lines += [f'EMA numbers marked "{WARMING}" were taken while the EMA still held mostly its starting '
                  f'weights (fewer steps than its half-life): compare with the raw top-1 instead.', '']
    header = ['epoch', 'step', 'lr', 'train loss', 'eval loss', 'gap'] + tops + (['EMA'] if recipe.ema.enabled else [])
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row, flag in zip(rows, flags):
        gap = row['loss'] - row['train_loss'] if row.get('loss') is not None else None
        cells = [str(row['epoch'] + 1), str(row['step']), cell(row['lr'], '.3g'), cell(row['train_loss'], '.4f'),
                 cell(row.get('loss'), '.4f'), cell(gap, '+.4f')] + [cell(row.get(key), '.2f') for key in tops]
        lines.append('| ' + ' | '.join(cells + ([WARMING if flag else ''] if recipe.ema.enabled else [])) + ' |')
    lines += ['', 'gap: eval loss minus train loss (the train loss includes augmentation and label smoothing).', '']
    lines += [f'![{plot.stem}]({plot.relative_to(run_dir).as_posix()})' for plot in plots]
    return '\n'.join(lines) + '\n'


def cell(value: Optional[float], spec: str) -> str:
    return '' if value is None else format(value, spec)


def draw_plots(folder: Path, rows: list[dict], flags: list[bool]) -> list[Path]:
    """train/eval loss, LR, top-1 (every weight and eval size) and the train-vs-eval gap, per epoch."""
    plt = pyplot()
    if plt is None:
        return []
    epochs = [row['epoch'] + 1 for row in rows]

    def series(ax, key, **style):
        points = [(e, row[key]) for e, row in zip(epochs, rows) if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker='.', label=key, **style)

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ('train_loss', 'loss', 'ema_loss'):
        series(ax, key)
    ax.set(xlabel='epoch', ylabel='loss', title='train and eval loss')
    ax.legend()
    paths.append(save_figure(fig, folder / 'loss.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    series(ax, 'lr')
    ax.set(xlabel='epoch', ylabel='learning rate', title='LR at the end of each epoch')
    paths.append(save_figure(fig, folder / 'lr.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = top1_columns(rows[0])
    sizes = sorted({key.split('top1', 1)[1] for key in keys})  # raw and EMA at one eval size share a colour
    for key in keys:
        series(ax, key, color=f'C{sizes.index(key.split("top1", 1)[1])}', ls='--' if key.startswith('ema_') else '-')
    warming = [e for e, flag in zip(epochs, flags) if flag]
    if warming:
        ax.axvspan(0.5, max(warming) + 0.5, color='0.85', label=f'EMA {WARMING}')
    ax.set(xlabel='epoch', ylabel='top-1 (%)', title='eval top-1')
    ax.legend()
    paths.append(save_figure(fig, folder / 'top1.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    gaps = [(e, row['loss'] - row['train_loss']) for e, row in zip(epochs, rows) if row.get('loss') is not None]
    if gaps:
        ax.plot(*zip(*gaps), marker='.')
    ax.axhline(0, color='0.5', lw=0.8)
    ax.set(xlabel='epoch', ylabel='eval loss - train loss', title='train-vs-eval gap (rising: overfitting)')
    paths.append(save_figure(fig, folder / 'gap.png'))
    return paths


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    parser = Parser(prog='python -m mnv_train.report',
                                     description='Write report.md and PNG plots for a run folder')
    parser.add_argument('run_dir', help='the run folder (holds metrics.csv and recipe.yaml)')
    logs.configure(is_main=True, quiet=False)
    write_report(Path(parser.parse_args(argv).run_dir))
    return 0


if __name__ == '__main__':
    sys.exit(main())
