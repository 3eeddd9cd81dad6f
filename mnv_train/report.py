"""The run report: report.md and PNG plots, from nothing but a run folder's metrics.csv and recipe.yaml.

Written at the end of training, and on demand with python -m mnv_train.report RUN_DIR (also while the run is
still going), so a run can be judged from its folder alone.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Optional

from . import checkpoint, logs
from . import recipe as recipes
from .diagnostics import WILD_LOGIT, ema_warm_step, top1_columns
from .entry import Parser, guarded
from .errors import UserError
from .optim import plan_batch, total_epochs
from .plots import pyplot, save_figure

OVERFIT_GAP = 5.0  # top-1 points training images lead validation ones by: overfitting (when growing or stuck)
UNDERFIT_GAP = 1.0  # at most this lead: the model does not even fit its training images better
GAP_TREND = 1.0  # points the gap must have grown since the first evaluation to count as growing
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


def read_steps(run_dir: Path) -> list[dict]:
    """steps.csv (a row per log point) as numbers; empty for runs that wrote none."""
    path = run_dir / 'steps.csv'
    if not path.is_file():
        return []
    with open(path, newline='') as f:  # epoch is fractional here: the log point's position in the run
        try:
            return [{key: None if value in ('', None) else float(value) for key, value in row.items()}
                    for row in csv.DictReader(f)]
        except ValueError as e:
            raise UserError(f'{path}: not all numbers ({e})') from None


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
    """Overfitting, underfitting or a good fit, from training-subset top-1 against validation top-1.

    Both are measured the same way (the eval transform, raw weights; train_top1 comes from train.fit_check_images),
    so their gap compares like with like, unlike the training loss, which carries augmentation, mixup and label
    smoothing. The actions are the usual ones (e.g. PaddleClas's tuning guide): an overfitting model wants more
    weight decay, augmentation or label smoothing; an underfitting one less of them, more epochs, or, for a small
    model, a larger crop scale.
    """
    evaluated = [row for row in rows if row.get('top1') is not None and row.get('train_top1') is not None]
    if len(evaluated) < 2:
        return 'too few evaluations with a training-subset top-1 (train.fit_check_images) to judge the fit'
    first, last = evaluated[0], evaluated[-1]
    gap, gap_before = last['train_top1'] - last['top1'], first['train_top1'] - first['top1']
    growing = gap - gap_before >= GAP_TREND
    still_improving = last['top1'] > max(row['top1'] for row in evaluated[:-1])
    numbers = (f'training-subset top-1 {last["train_top1"]:.2f} against validation {last["top1"]:.2f} at epoch '
               f'{last["epoch"] + 1}: a gap of {gap:+.2f} points, {gap_before:+.2f} at epoch {first["epoch"] + 1}')
    if gap >= OVERFIT_GAP and (growing or not still_improving):
        return (f'overfitting: {numbers}; regularise more (weight decay, augmentation, label smoothing, drop-path) '
                f'or keep checkpoints/best.pt')
    if gap <= UNDERFIT_GAP:
        return (f'underfitting: {numbers}; the model fits its training images no better than new ones: train longer '
                f'{"(validation top-1 still rises)" if still_improving else ""}, or regularise less (weight decay, '
                f'augmentation, dropout), or for a small model use a larger crop scale (aug.scale)').replace('  ', ' ')
    return f'a good fit: {numbers}; neither clearly overfitting nor underfitting'


# ---------------------------------------------------------------------------------------------- output

def write_report(run_dir: Path) -> Path:
    """run_dir/report.md and run_dir/plots/*.png from the run folder's metrics; returns the report's path."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    steps = read_steps(run_dir)
    recipe = read_recipe(run_dir)
    batch = global_batch(run_dir, recipe)
    flags = ema_flags(rows, recipe, batch)
    plots = draw_plots(run_dir / 'plots', rows, steps, flags)
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
    header = ['epoch', 'step', 'lr', 'train loss', 'eval loss', 'train top1', 'gap'] + tops
    header += ['EMA'] if recipe.ema.enabled else []
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row, flag in zip(rows, flags):
        gap = accuracy_gap(row)
        cells = [str(row['epoch'] + 1), str(row['step']), cell(row['lr'], '.3g'), cell(row['train_loss'], '.4f'),
                 eval_loss_cell(row), cell(row.get('train_top1'), '.2f'), cell(gap, '+.2f')]
        cells += [cell(row.get(key), '.2f') for key in tops]
        lines.append('| ' + ' | '.join(cells + ([WARMING if flag else ''] if recipe.ema.enabled else [])) + ' |')
    wild_note = (f' eval loss "(N wild: X)": N images had a logit beyond {WILD_LOGIT:g} and X is the mean loss '
                 f'without their share (see the run\'s warning about BatchNorm channels).')
    lines += ['', 'train top1: top-1 on a fixed subset of training images, prepared like the validation images; '
              'gap: train top1 minus top1, in points (growing: overfitting).'
              + (wild_note if any(map(wild_count, rows)) else ''), '']
    lines += [f'![{plot.stem}]({plot.relative_to(run_dir).as_posix()})' for plot in plots]
    lines += suite_sections(run_dir)
    return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------- evaluation suite

SUITE_PATTERN = '*.suite-*.json'  # beside the checkpoint: see suite_json_name


def suite_json_name(checkpoint_stem: str, kind: str, img_size: int, crop_pct: float, recalibrated: int) -> str:
    """Where validate.py --suite (and train.eval_suite) keep a checkpoint's results, one file per setting."""
    return f'{checkpoint_stem}.suite-{kind}-{img_size}-{crop_pct:g}{f"-pbn{recalibrated}" if recalibrated else ""}.json'


def suite_table(rows: list[dict]) -> list[str]:
    """The suite's results as a Markdown table, the same on the console and in report.md."""
    lines = ['| set | images | top-1 | top-5 | gap to ImageNet val |', '|---|---|---|---|---|']
    for row in rows:
        if row.get('missing'):
            lines.append(f'| {row["set"]} | missing ({row["path"]}) | | | |')
        else:
            lines.append(f'| {row["set"]} | {row["images"]} | {row["top1"]:.2f} | {row["top5"]:.2f} | '
                         f'{cell(row.get("gap_top1"), "+.2f")} |')
    return lines


def suite_sections(run_dir: Path) -> list[str]:
    """A section per suite result kept beside the run's checkpoints. One that cannot be read is named and left out:
    the report is written at the end of a finished run, which must not end in an error for it."""
    lines = []
    for path in sorted((run_dir / 'checkpoints').glob(SUITE_PATTERN)):
        try:
            result = json.loads(path.read_text())
            heading = (f'## Evaluation suite: {Path(result["checkpoint"]).name}, {result["weights"]} weights, '
                       f'{result["img_size"]} px, crop {result["crop_pct"]:g}')
            lines += ['', heading, '', *suite_table(result['sets'])]
        except (OSError, ValueError, KeyError, TypeError) as e:
            logs.warn(f'{path}: not a readable evaluation suite result ({e}), left out of report.md')
    return lines


def accuracy_gap(row: dict) -> Optional[float]:
    if row.get('train_top1') is None or row.get('top1') is None:
        return None
    return row['train_top1'] - row['top1']


def cell(value: Optional[float], spec: str) -> str:
    return '' if value is None else format(value, spec)


def wild_count(row: dict, prefix: str = '') -> int:
    """Images of the evaluation with a logit beyond WILD_LOGIT (evaluate's wild_logits), 0 when not recorded."""
    return int(row.get(f'{prefix}wild_logits') or 0)


def tame_loss(row: dict, prefix: str = '') -> float:
    """The mean eval loss without the share of the images with wild logits."""
    return row[f'{prefix}loss'] - (row[f'{prefix}wild_loss'] if wild_count(row, prefix) else 0.0)


def eval_loss_cell(row: dict) -> str:
    loss = cell(row.get('loss'), '.4f')
    return f'{loss} ({wild_count(row)} wild: {tame_loss(row):.4f})' if wild_count(row) else loss


def draw_plots(folder: Path, rows: list[dict], steps: list[dict], flags: list[bool]) -> list[Path]:
    """Loss, LR and throughput against epochs, per log point where steps.csv has them (so the warmup shows);
    top-1 (every weight and eval size, and the training subset) and the accuracy gap, per evaluated epoch."""
    plt = pyplot()
    if plt is None:
        return []
    epochs = [row['epoch'] + 1 for row in rows]

    def series(ax, key, **style):
        points = [(e, row[key]) for e, row in zip(epochs, rows) if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker='.', label=key, **style)

    def per_step(ax, key, **style):
        points = [(row['epoch'], row[key]) for row in steps if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), **style)
        return bool(points)

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if not per_step(ax, 'train_loss', lw=1, color='0.6', label='train_loss per log point'):
        series(ax, 'train_loss')
    for prefix in ('', 'ema_'):
        series(ax, f'{prefix}loss')
        if any(wild_count(row, prefix) for row in rows):  # a few images carry the mean: show the rest's loss too
            tame = [(e, tame_loss(row, prefix)) for e, row in zip(epochs, rows) if row.get(f'{prefix}loss') is not None]
            ax.plot(*zip(*tame), marker='x', ls='--', label=f'{prefix}loss without the wild-logit images')
    if any(wild_count(row, prefix) for row in rows for prefix in ('', 'ema_')):
        ax.set_yscale('log')
    ax.set(xlabel='epoch', ylabel='loss', title='train loss (augmented, smoothed) and eval loss')
    ax.legend()
    paths.append(save_figure(fig, folder / 'loss.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    if per_step(ax, 'lr', marker='.', ms=3):
        ax.set(xlabel='epoch', ylabel='learning rate', title='LR at every log point (warmup included)')
    else:
        series(ax, 'lr')
        ax.set(xlabel='epoch', ylabel='learning rate', title='LR at the end of each epoch')
    paths.append(save_figure(fig, folder / 'lr.png'))

    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        per_step(ax, 'img_per_s', color='C0', label='img/s')
        ax.set(xlabel='epoch', ylabel='images per second', title='throughput and time waiting for data')
        wait = ax.twinx()
        per_step(wait, 'data_wait', color='C1', ls='--', label='data wait (share)')
        wait.set(ylabel='share of time waiting for data', ylim=(0, 1))
        fig.legend(loc='lower right')
        paths.append(save_figure(fig, folder / 'throughput.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = top1_columns(rows[0])
    sizes = sorted({key.split('top1', 1)[1] for key in keys})  # raw and EMA at one eval size share a colour
    for key in keys:
        series(ax, key, color=f'C{sizes.index(key.split("top1", 1)[1])}', ls='--' if key.startswith('ema_') else '-')
    series(ax, 'train_top1', color='0.4', ls=':')
    warming = [e for e, flag in zip(epochs, flags) if flag]
    if warming:
        ax.axvspan(0.5, max(warming) + 0.5, color='0.85', label=f'EMA {WARMING}')
    ax.set(xlabel='epoch', ylabel='top-1 (%)', title='eval top-1 (and on training images, dotted)')
    ax.legend()
    paths.append(save_figure(fig, folder / 'top1.png'))

    fig, ax = plt.subplots(figsize=(7, 4))
    gaps = [(e, accuracy_gap(row)) for e, row in zip(epochs, rows) if accuracy_gap(row) is not None]
    if gaps:
        ax.plot(*zip(*gaps), marker='.')
    ax.axhline(0, color='0.5', lw=0.8)
    ax.set(xlabel='epoch', ylabel='train top-1 - top-1 (points)', title='train-vs-validation gap (growing: '
           'overfitting)')
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
