"""Command lines of train.py and validate.py: parse, assemble, run; user errors become one line on stderr."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import checkpoint, distributed, logs
from . import recipe as recipes
from .errors import UserError, one_line


def guarded(main):
    """Run a CLI entry point: a UserError prints one line and exits 2; Ctrl-C exits 130 without a traceback."""
    def wrapper(argv: Optional[list[str]] = None) -> int:
        try:
            return main(argv) or 0
        except UserError as e:
            print(f'error: {one_line(e)}', file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr)
            return 130
        finally:
            distributed.shutdown()
    return wrapper


# ---------------------------------------------------------------------------------------------- train.py

def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='train.py', description='Train a model from a recipe (torchrun for several '
                                'processes: torchrun --nproc_per_node=8 train.py --recipe mnv4_hybrid_large ...)')
    p.add_argument('--recipe', help='recipe name (recipes/NAME.yaml) or path to a YAML file')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override a recipe value, e.g. --set optim.lr=0.002 (repeatable)')
    p.add_argument('--data-dir', help='dataset location (same as --set data.data_dir=...)')
    p.add_argument('--init-from', metavar='PATH', help='start from these weights (.pt/.pth/.safetensors), for '
                   'fine-tuning (same as --set model.pretrained_path=PATH)')
    p.add_argument('--output', help='run folder (default: runs/RECIPE_NAME)')
    p.add_argument('--resume', metavar='auto|PATH', help='continue a run: auto = newest valid checkpoint in --output')
    p.add_argument('--global-batch', type=int, help='run at this global batch instead of the recipe\'s '
                   '(LR and EMA decay are rescaled)')
    p.add_argument('--batch-size', type=int, help='per-device batch (default: the recipe\'s train.batch_size)')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda')
    p.add_argument('--print-recipe', action='store_true', help='print the resolved recipe and batch plan, then exit')
    p.add_argument('--dry-run', action='store_true', help='build everything, report the schedule, LR, EMA and '
                   'estimated time, then exit without training')
    p.add_argument('--list-recipes', action='store_true', help='list the shipped recipes, then exit')
    p.add_argument('--max-steps', type=int, default=0, help='checkpoint and stop after this many optimizer '
                   'steps (a slice of a long run, e.g. under a job time limit); --resume auto continues it')
    p.add_argument('--quiet', action='store_true', help='only epoch summaries and warnings')
    return p


def _load_recipe(args) -> tuple[recipes.Recipe, Optional[dict], Optional[Path]]:
    """The recipe, and for --resume PATH the checkpoint payload and its path."""
    overrides = list(args.overrides) + ([f'data.data_dir={args.data_dir}'] if args.data_dir else [])
    overrides += [f'model.pretrained_path={args.init_from}'] if args.init_from else []
    payload = resume_path = None
    if args.resume and args.resume != 'auto':
        resume_path = Path(args.resume)
        payload = checkpoint.load(resume_path)
    if args.recipe:
        return recipes.load(args.recipe, overrides), payload, resume_path
    if payload is not None:
        return recipes.from_dict(recipes.apply_overrides(payload['recipe'], overrides)), payload, resume_path
    raise UserError('--recipe is required (or --resume PATH to continue from a checkpoint)')


def _run_dir(args, recipe: recipes.Recipe, resume_path: Optional[Path]) -> Path:
    if args.output:
        return Path(args.output)
    if resume_path is not None and resume_path.parent.name == 'checkpoints':
        return resume_path.parent.parent
    return Path('runs') / recipe.name


def _print_recipe_list():
    rows = [('name', 'model', 'epochs', 'global batch', 'expected top-1')]
    for r in recipes.list_recipes():
        expected = '' if r.provenance.expected_top1 is None else f'{r.provenance.expected_top1:g}'
        if r.provenance.expected_top1_eval is not None:
            expected += f' ({r.provenance.expected_top1_eval:g} @{r.provenance.eval_img_size})'
        rows.append((r.name, r.model.name, str(r.schedule.epochs), str(r.train.global_batch_size), expected))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@guarded
def train_main(argv: Optional[list[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    if args.list_recipes:
        _print_recipe_list()
        return 0
    recipe, payload, resume_path = _load_recipe(args)
    if args.print_recipe:
        from .optim import plan_batch
        world_size = int(os.environ.get('WORLD_SIZE', '1'))
        plan = plan_batch(recipe, world_size, args.global_batch, args.batch_size)
        print(recipe.to_yaml(), end='')
        print('\n'.join(f'# {line}' for line in plan.report(recipe).splitlines()))
        return 0

    world = distributed.init(args.device)
    logs.configure(world.is_main, args.quiet)
    run_dir = _run_dir(args, recipe, resume_path)
    from . import diagnostics
    from .build import build_run
    from .engine import Interrupted, fit, StopFlag
    if args.dry_run:
        report = diagnostics.dry_run(build_run(recipe, world, run_dir, args.global_batch, args.batch_size))
        if world.is_main:
            print(report)
        return 0
    existing = sorted((run_dir / 'checkpoints').glob('step-*.pt'))
    if existing and not args.resume:
        raise UserError(f'{run_dir} already holds checkpoints: pass --resume auto to continue that run, '
                        f'or --output for a new one')
    run = build_run(recipe, world, run_dir, args.global_batch, args.batch_size)
    if args.resume == 'auto':
        found = run.checkpointer.latest_valid()
        if found is None:
            logs.info(f'no checkpoint in {run_dir / "checkpoints"} yet: starting from scratch')
        else:
            resume_path, payload = found
    if payload is not None:
        for note in checkpoint.restore(run, payload):
            logs.warn(note)
        logs.info(f'resumed from {resume_path} at epoch {run.state.epoch + 1}, step {run.state.step}')
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / 'recipe.yaml').write_text(recipe.to_yaml())
    logs.info(run.plan.report(recipe))
    logs.info(f'{recipe.name}: {recipe.model.name} on {recipe.data.dataset}, {run.epochs} epochs x '
              f'{run.steps_per_epoch} steps, {world.size} process(es) on {world.device.type}; output {run_dir}')

    stop = StopFlag()
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda n, _frame: stop.request(f'received {signal.Signals(n).name}'))
    try:
        fit(run, stop, args.max_steps)
    except Interrupted as e:
        logs.summary(f'stopped at step {run.state.step} ({e}); checkpoint saved in {run_dir / "checkpoints"}; '
                  f'continue with --resume auto --output {run_dir}')
        return 0
    if world.is_main:
        from .report import write_report
        write_report(run_dir)
    best = run.state.best_top1
    logs.summary(f'done: best top-1 {best:.2f} (epoch {run.state.best_epoch + 1}); checkpoints in '
              f'{run_dir / "checkpoints"}' if best is not None else 'done')
    return 0


# ---------------------------------------------------------------------------------------------- validate.py

def validate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='validate.py', description='Evaluate a checkpoint at any resolution and '
                                'crop (e.g. a 384-trained model at 448 with crop_pct 1.0)')
    p.add_argument('checkpoint', help='mnv-train checkpoint (.pt), timm .pth/.pth.tar or .safetensors file')
    p.add_argument('--weights', choices=['auto', 'ema', 'raw'], default='auto',
                   help='EMA or raw weights (auto: EMA when the checkpoint has them)')
    p.add_argument('--recipe', help='recipe for checkpoints that carry none (timm/safetensors files)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    p.add_argument('--data-dir')
    p.add_argument('--split', help='dataset split (default: the recipe\'s data.val_split)')
    p.add_argument('--img-size', type=int, help='eval resolution (default: the recipe\'s)')
    p.add_argument('--crop-pct', type=float, help='center crop fraction (default: the recipe\'s)')
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--precise-bn', type=int, default=0, metavar='N',
                   help='recompute BatchNorm statistics over N training batches before evaluating')
    p.add_argument('--device', default='auto')
    p.add_argument('--json', help='where to write the result (default: beside the checkpoint)')
    return p


@guarded
def validate_main(argv: Optional[list[str]] = None) -> int:
    from . import data, model as models, precise_bn
    from .build import EvalSet, autocast, eval_sets
    from .engine import evaluate

    args = validate_parser().parse_args(argv)
    path = Path(args.checkpoint)
    overrides = list(args.overrides) + ([f'data.data_dir={args.data_dir}'] if args.data_dir else [])
    if args.split:
        overrides += [f'data.val_split={args.split}']
    overrides += ['data.extra_evals=[]']
    payload = checkpoint.load(path) if checkpoint.manifest_path(path).is_file() else None
    if args.recipe:
        recipe = recipes.load(args.recipe, overrides)
    elif payload is not None:
        recipe = recipes.from_dict(recipes.apply_overrides(payload['recipe'], overrides))
    else:
        raise UserError(f'{path} carries no recipe: pass --recipe (the model and data settings to use)')
    if payload is not None:
        use_ema = args.weights == 'ema' or (args.weights == 'auto' and payload.get('ema') is not None)
        if use_ema and payload.get('ema') is None:
            raise UserError(f'checkpoint {path} has no EMA weights (the run had ema.enabled false); use --weights raw')
        state_dict = payload['ema' if use_ema else 'model']
    else:
        use_ema = args.weights == 'ema'
        state_dict = checkpoint.load_state_dict(path, use_ema)
    setting = eval_setting(recipe, args.img_size, args.crop_pct)
    recipe.data.eval_img_size, recipe.data.crop_pct = setting.img_size, setting.crop_pct

    world = distributed.init(args.device)
    logs.configure(world.is_main, False)
    source = data.open_source(recipe.data, recipe.data.val_split, recipe.train.seed)
    num_classes = recipe.model.num_classes or getattr(source, 'num_classes', None)
    module = models.load_weights(models.create(recipe.model, num_classes), state_dict, str(path))
    norm = data.resolve_normalization(recipe.data, module)
    module = models.prepare(module, world.device, recipe.train.channels_last)
    eval_set: EvalSet = eval_sets(recipe, source, norm, world, args.batch_size)[0]
    normalize = data.DeviceNormalize(norm, world.device, recipe.train.channels_last)
    recalibrated = 0
    if args.precise_bn:
        with autocast(recipe.train.amp, world.device):
            recalibrated = precise_bn.recalibrate(
                module, precise_bn.recipe_batches(recipe, norm, world, args.batch_size), args.precise_bn)
        world.average_batchnorm(module)
        if recalibrated < args.precise_bn:
            logs.warn(f'--precise-bn {args.precise_bn}: the training split has only {recalibrated} batches of '
                      f'{args.batch_size} for this process')
    result = evaluate(module, eval_set.loader, normalize, world, recipe.train.amp)
    result.update({'checkpoint': str(path), 'weights': 'ema' if use_ema else 'raw', 'model': recipe.model.name,
                   'img_size': eval_set.img_size, 'crop_pct': eval_set.crop_pct, 'split': recipe.data.val_split,
                   'dataset': recipe.data.dataset, 'precise_bn_batches': recalibrated})
    result['crop_source'] = setting.crop_source
    if setting.expected_top1 is not None:
        result['expected_top1'] = setting.expected_top1
        result['delta_top1'] = result['top1'] - setting.expected_top1
    if world.is_main:
        print(f'evaluating at {setting.img_size} px, crop {setting.crop_pct:g} ({setting.crop_source})')
        line = (f'{path.name} ({result["weights"]} weights) @{eval_set.img_size} crop {eval_set.crop_pct:g}: '
                f'top-1 {result["top1"]:.3f}  top-5 {result["top5"]:.3f}  loss {result["loss"]:.4f}  '
                f'({result["count"]} images)')
        if setting.expected_top1 is not None:
            line += f'  expected {setting.expected_top1:.3f} ({result["delta_top1"]:+.3f})'
        print(line)
        recalibration = f'-pbn{recalibrated}' if recalibrated else ''
        out = Path(args.json) if args.json else path.with_name(
            f'{path.stem}.eval-{result["weights"]}-{eval_set.img_size}-{eval_set.crop_pct:g}{recalibration}.json')
        out.write_text(json.dumps(result, indent=1))
        print(f'wrote {out}')
    return 0


@dataclass
class EvalSetting:
    img_size: int
    crop_pct: float
    crop_source: str  # why this crop: the user's flag, the published eval setting, or the recipe
    expected_top1: Optional[float]  # the published figure for exactly this size and crop, if there is one


def eval_setting(recipe: recipes.Recipe, img_size: Optional[int], crop_pct: Optional[float]) -> EvalSetting:
    """The size and crop to evaluate at, and the published top-1 to compare with.

    At the provenance's eval size (e.g. 448 for a 384-trained model) the published figure was measured with the
    provenance's crop (1.0), not the recipe's train-time crop, so that crop is the default there. A published
    figure is compared only when both size and crop are the ones it was measured at.
    """
    data, provenance = recipe.data, recipe.provenance
    size = img_size or data.eval_img_size or data.img_size
    published_crop = provenance.eval_crop_pct or data.crop_pct
    at_published_size = provenance.eval_img_size is not None and size == provenance.eval_img_size
    if crop_pct:
        crop, source = crop_pct, '--crop-pct'
    elif at_published_size and provenance.eval_crop_pct is not None:
        crop, source = published_crop, f'provenance.eval_crop_pct, the published setting at {size} px'
    else:
        crop, source = data.crop_pct, 'the recipe\'s data.crop_pct'
    expected = None
    if at_published_size and crop == published_crop:
        expected = provenance.expected_top1_eval
    elif size == (data.eval_img_size or data.img_size) and crop == data.crop_pct:
        expected = provenance.expected_top1
    return EvalSetting(size, crop, source, expected)
