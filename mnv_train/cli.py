"""Command lines of train.py and validate.py (mnv-train, mnv-validate): parse, build, run, report."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import time
from pathlib import Path
from typing import Optional

from . import checkpoint, diagnostics, distributed, logs, resume
from . import recipe as recipes
from .build import Run, build_run
from .dryrun import dry_run
from .engine import Interrupted, StopFlag, fit
from .entry import (
    Parser,
    add_recipe_arguments,
    at_least,
    check_creatable,
    fraction,
    guarded,
    make_folder,
    recipe_overrides,
)
from .errors import UserError
from .eval_suite import BY_NAME, evaluate_suite, merged, set_paths
from .evaluation import EvalSetting, Weights, chosen_weights, eval_setting, evaluate_weights, load_weights
from .optim import plan_batch, trajectory_note
from .report import suite_json_name, suite_table, write_report
from .runlock import RunLock
from .tracking import open_trackers

# ---------------------------------------------------------------------------------------------- train.py

def train_parser() -> argparse.ArgumentParser:
    p = Parser(prog='train.py', description='Train a model from a recipe (torchrun for several '
                                'processes: torchrun --nproc_per_node=8 train.py --recipe mnv4_hybrid_large ...)')
    p.add_argument('--recipe', help='recipe name (recipes/NAME.yaml) or path to a YAML file')
    add_recipe_arguments(p)
    p.add_argument('--init-from', metavar='PATH', help='start from these weights (.pt/.pth/.safetensors), for '
                   'fine-tuning (same as --set model.pretrained_path=PATH)')
    p.add_argument('--output', help='run folder (default: runs/RECIPE_NAME)')
    p.add_argument('--resume', metavar='auto|PATH', help='continue a run: auto = newest valid checkpoint in --output')
    p.add_argument('--force-unlock', action='store_true', help='take over the run folder\'s lock even if its '
                   'holder looks alive (it is not: e.g. its node was lost without a trace)')
    p.add_argument('--allow-recipe-change', action='store_true', help='resume although the recipe changes more '
                   'than what only extends or observes the run (epochs, logging, checkpoints, workers, eval sizes)')
    p.add_argument('--global-batch', type=at_least(1), help='run at this global batch instead of the recipe\'s '
                   '(LR and EMA decay are rescaled)')
    p.add_argument('--batch-size', type=at_least(1), help='per-device batch (default: the recipe\'s train.batch_size)')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N')
    p.add_argument('--print-recipe', action='store_true', help='print the resolved recipe and batch plan, then exit')
    p.add_argument('--dry-run', action='store_true', help='build everything, report the schedule, LR, EMA and '
                   'estimated time, then exit without training')
    p.add_argument('--list-recipes', action='store_true', help='list the shipped recipes, then exit')
    p.add_argument('--max-steps', type=at_least(0), default=0, help='checkpoint and stop after this many optimizer '
                   'steps (a slice of a long run, e.g. under a job time limit); --resume auto continues it')
    p.add_argument('--quiet', action='store_true', help='only epoch summaries and warnings')
    p.add_argument('--data-root', help='folder holding the evaluation suite\'s sets (val/, '
                   'imagenetv2-matched-frequency/, sketch/, imagenet-r/, imagenet-a/, real.json), scored after the '
                   'last epoch when train.eval_suite is imagenet')
    return p


@guarded
def train_main(argv: Optional[list[str]] = None) -> int:
    """Train a model from a recipe."""
    args = train_parser().parse_args(argv)
    if args.list_recipes:
        return print_recipe_list()
    recipe, payload, resume_path = load_recipe(args)
    suite = training_suite(recipe.train.eval_suite, args.data_root)
    if args.print_recipe:
        return print_recipe(recipe, args.global_batch, args.batch_size)
    world = distributed.init(args.device)
    logs.configure(world.is_main, args.quiet)
    run_dir = run_folder(args.output, recipe, resume_path)
    if args.dry_run:
        report = dry_run(build_run(recipe, world, run_dir, args.global_batch, args.batch_size))
        logs.summary(report)
        return 0
    mode = args.resume or restart_mode(world)
    with holding_lock(run_dir, world, recipe.train.lock_stale_minutes, args.force_unlock) as lock:
        check_shared_folder(run_dir, world)
        refuse_to_overwrite(run_dir, mode)
        run = build_run(recipe, world, run_dir, args.global_batch, args.batch_size)
        payload = resume_run(run, mode, payload, resume_path, args.allow_recipe_change)
        if args.max_steps and run.state.step >= args.max_steps:  # the same command line again: not one more step
            run.metrics.close()
            logs.summary(f'the run is at step {run.state.step}, already at --max-steps {args.max_steps}: nothing to '
                         f'train; raise --max-steps, or leave it out, to go on')
            return 0
        announce(run, fresh=payload is None)
        start_trackers(run, payload)
        try:
            fit(run, stop_on_signals(), args.max_steps, lock)
        except Interrupted as e:  # a signal or --max-steps: a checkpoint was saved
            run.metrics.finish_trackers([])
            logs.summary(f'stopped at step {run.state.step} ({e}); checkpoint saved in {run_dir / "checkpoints"}; '
                         f'continue with --resume auto --output {run_dir}')
            return 0
        if suite is not None:
            suite_after_training(run, suite)
        if world.is_main:
            report = write_report(run_dir)
            run.metrics.finish_trackers([report, *sorted((run_dir / 'plots').glob('*.png'))])
    best = run.state.best_top1
    logs.summary(f'done: best top-1 {best:.2f} (epoch {run.state.best_epoch + 1}); checkpoints in '
                 f'{run_dir / "checkpoints"}' if best is not None else 'done')
    return 0


def load_recipe(args: argparse.Namespace) -> tuple[recipes.Recipe, Optional[dict], Optional[Path]]:
    """The recipe, and for --resume PATH the checkpoint payload and its path."""
    overrides = recipe_overrides(args) + ([f'model.pretrained_path={args.init_from}'] if args.init_from else [])
    payload = resume_path = None
    if args.resume and args.resume != 'auto':
        resume_path = Path(args.resume)
        payload = checkpoint.load(resume_path, needs=checkpoint.RUN_PARTS)
    if args.recipe:
        return recipes.load(args.recipe, overrides), payload, resume_path
    if payload is not None:
        return recipes.from_dict(recipes.apply_overrides(payload['recipe'], overrides)), payload, resume_path
    raise UserError('--recipe is required (or --resume PATH to continue from a checkpoint)')


def training_suite(eval_suite: str, data_root: Optional[str]) -> Optional[dict[str, Path]]:
    """The sets train.eval_suite scores after the last epoch, found under --data-root; checked before training."""
    if eval_suite == 'none':
        if data_root:
            raise UserError('--data-root is for the evaluation suite after training: add '
                            '--set train.eval_suite=imagenet')
        return None
    if not data_root:
        raise UserError(f'train.eval_suite is {eval_suite}: pass --data-root, the folder holding its sets')
    return set_paths(Path(data_root), [])


def suite_after_training(run: Run, paths: dict[str, Path]):
    """The suite on the final weights (EMA if any) as validate.py --suite scores last.pt, its results beside it."""
    weights = chosen_weights(copy.deepcopy(run.recipe), run.module.state_dict(),
                             run.ema.module.state_dict() if run.ema is not None else None,
                             run.checkpointer.directory / 'last.pt', None)
    run_suite(weights, apply_setting(weights, None, None), paths, run.world, run.plan.per_device, 0, None,
              refresh_report=False)  # train_main writes report.md next


def run_folder(output: Optional[str], recipe: recipes.Recipe, resume_path: Optional[Path]) -> Path:
    if output:
        return Path(output)
    if resume_path is not None and resume_path.parent.name == 'checkpoints':
        return resume_path.parent.parent
    return Path('runs') / recipe.name


@contextlib.contextmanager
def holding_lock(run_dir: Path, world: distributed.World, stale_minutes: float, force: bool):
    """Rank 0 holds the run folder's lock while the run writes into it; every rank stops if it cannot."""
    def take() -> RunLock:
        lock = RunLock(make_folder(run_dir, 'the run folder'), stale_minutes)
        warning = lock.acquire(force)
        if warning:
            logs.warn(warning)
        return lock
    lock = world.run_on_main(take, f'lock {run_dir}')
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def check_shared_folder(run_dir: Path, world: distributed.World):
    """Every rank must see the run folder rank 0 writes in: resume reads rank 0's checkpoints everywhere. On
    node-local disks each node would see a folder of its own; rank 0 writes a probe file and every rank looks."""
    if not world.distributed:
        return

    def write_probe() -> Path:
        probe = run_dir / f'.probe-{os.getpid()}-{time.time_ns()}'
        try:
            probe.write_text('every rank of the run looks for this file at start\n')
        except OSError as e:
            raise UserError(f'cannot write into the run folder {run_dir}: {e.strerror or e}') from None
        return probe
    probe = world.run_on_main(write_probe, 'check that every rank sees the run folder')
    name = world.broadcast_from_main(probe.name if probe is not None else None)
    blind = [rank for rank, seen in enumerate(world.gather((run_dir / name).is_file())) if not seen]
    if probe is not None:
        probe.unlink()
    if blind:
        raise UserError(f'rank(s) {", ".join(map(str, blind))} cannot see {run_dir}, where rank 0 writes (a disk '
                        f'local to each node?): pass --output a folder on a filesystem every node mounts')


def start_trackers(run: Run, payload: Optional[dict]):
    """The recipe's W&B / MLflow runs, on rank 0: new ones, or the checkpoint's continued. One that cannot start
    stops the run here, before it trains."""
    cfg, ids = run.recipe.train, (payload or {}).get('trackers') or {}
    run.metrics.trackers = run.world.run_on_main(lambda: open_trackers(cfg.wandb, cfg.mlflow, run.run_dir,
                                                                        run.recipe.to_dict(), ids), 'start trackers')


def refuse_to_overwrite(run_dir: Path, resume: Optional[str]):
    if not resume and any((run_dir / 'checkpoints').glob('step-*.pt')):
        raise UserError(f'{run_dir} already holds checkpoints: pass --resume auto to continue that run, '
                        f'or --output for a new one')


def restart_mode(world: distributed.World) -> Optional[str]:
    """'auto' when torchrun restarted the workers (--max-restarts): carry on from the newest valid checkpoint.

    Every rank resumes when any was restarted: with several agents (nodes), an agent whose own workers were healthy
    restarts them for its peer's rejoin without counting a restart (TORCHELASTIC_RESTART_COUNT stays 0 there)."""
    restarts = max(world.gather(int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))))
    if restarts:
        logs.info(f'torchrun restarted the workers (restart {restarts}): resuming from the newest valid checkpoint')
    if distributed.restarts_share_a_store(os.environ):
        logs.warn('torchrun may restart these workers on several nodes, and its agents share one store across '
                  'restarts: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every agent, or a restarted node can '
                  'read its peers\' addresses of an earlier attempt and fail to connect')
    return 'auto' if restarts else None


def resume_run(run: Run, mode: Optional[str], payload: Optional[dict], resume_path: Optional[Path],
               allow_recipe_change: bool) -> Optional[dict]:
    """Put the checkpoint of --resume PATH, or for --resume auto the newest valid one, back into the run; returns
    its payload (None for a new run)."""
    if mode == 'auto':
        found = resume.agreed_checkpoint(run.checkpointer, run.world)  # rank 0 chooses, every rank checks
        if found is None:
            logs.info(f'no checkpoint in {run.checkpointer.directory} yet: starting from scratch')
        else:
            resume_path, payload = found
    if payload is not None:
        check_recipe_changes(payload['recipe'], run.recipe, resume_path, allow_recipe_change)
        for note in resume.restore(run, payload, str(resume_path)):
            logs.warn(note)
        run.metrics.restart_at(run.state.step)  # TensorBoard drops what the earlier run logged after this step
        logs.info(f'resumed from {resume_path} at epoch {run.state.epoch + 1}, step {run.state.step}')
    return payload


def check_recipe_changes(saved: dict, recipe: recipes.Recipe, source: Path, allowed: bool):
    """Every key that differs from the checkpoint's recipe is reported; keys that change what the run computes
    (not only how long it runs or what it logs) need --allow-recipe-change."""
    changes = resume.recipe_changes(recipes.from_dict(recipes.as_saved(saved)).to_dict(),  # defaults filled
                                     recipe.to_dict())
    refused = [f'{key} {old!r} -> {new!r}' for key, old, new, observing in changes if not observing]
    if refused and not allowed:
        raise UserError(f'resuming from {source} with a changed recipe ({"; ".join(refused)}): pass '
                        f'--allow-recipe-change to continue with the new values')
    for key, old, new, _ in changes:
        logs.warn(f'the recipe changed since the checkpoint: {key} {old!r} -> {new!r}')


def announce(run: Run, fresh: bool):
    """recipe.yaml in the run folder, and the batch plan and the run's shape on the console; for a fresh run, a
    warning when its per-device batch leaves the recipe's trajectory (a resume says so against the saved run)."""
    if run.world.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / 'recipe.yaml').write_text(run.recipe.to_yaml(), encoding='utf-8')
    logs.info(run.plan.report(run.recipe))
    departure = trajectory_note(run.recipe, run.plan) if fresh else None
    if departure:
        logs.warn(departure)
    logs.info(f'{run.recipe.name}: {run.recipe.model.name} on {run.recipe.data.dataset}, {run.epochs} epochs x '
              f'{run.steps_per_epoch} steps, {run.world.size} process(es) on {run.world.device.type}; '
              f'output {run.run_dir}')


def stop_on_signals() -> StopFlag:
    """SIGTERM and SIGUSR1 (preemption) ask the loop to checkpoint and stop at the next step."""
    stop = StopFlag()
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda n, _frame: stop.request(f'received {signal.Signals(n).name}'))
    return stop


def print_recipe_list() -> int:
    rows = [('name', 'model', 'epochs', 'global batch', 'expected top-1')]
    for r in recipes.list_recipes():
        expected = '' if r.provenance.expected_top1 is None else f'{r.provenance.expected_top1:g}'
        if r.provenance.expected_top1_eval is not None:
            expected += f' ({r.provenance.expected_top1_eval:g} @{r.provenance.eval_img_size})'
        rows.append((r.name, r.model.name, str(r.schedule.epochs), str(r.train.global_batch_size), expected))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def print_recipe(recipe: recipes.Recipe, global_batch: Optional[int], batch_size: Optional[int]) -> int:
    """The resolved recipe and the batch plan for $WORLD_SIZE processes."""
    plan = plan_batch(recipe, int(os.environ.get('WORLD_SIZE', '1')), global_batch, batch_size)
    print(recipe.to_yaml(), end='')
    print('\n'.join(f'# {line}' for line in plan.report(recipe).splitlines()))
    return 0


# ---------------------------------------------------------------------------------------------- validate.py

def validate_parser() -> argparse.ArgumentParser:
    p = Parser(prog='validate.py', description='Evaluate a checkpoint at any resolution and '
                                'crop (e.g. a 384-trained model at 448 with crop_pct 1.0)')
    p.add_argument('checkpoint', help='mnv-train checkpoint (.pt), timm .pth/.pth.tar or .safetensors file')
    p.add_argument('--weights', choices=['auto', 'ema', 'raw'], default='auto',
                   help='EMA or raw weights (auto: EMA when the checkpoint has them)')
    p.add_argument('--recipe', help='recipe for checkpoints that carry none (timm/safetensors files)')
    add_recipe_arguments(p)
    p.add_argument('--split', help='dataset split (default: the recipe\'s data.val_split)')
    p.add_argument('--img-size', type=at_least(1), help='eval resolution (default: the recipe\'s, or the published '
                   'eval setting)')
    p.add_argument('--crop-pct', type=fraction, help='center crop fraction (default: the recipe\'s, or the published '
                   'one at the published eval size)')
    p.add_argument('--batch-size', type=at_least(1), default=128)
    p.add_argument('--precise-bn', type=at_least(0), default=0, metavar='N',
                   help='recompute BatchNorm statistics over N training batches before evaluating')
    p.add_argument('--device', default='auto')
    p.add_argument('--json', help='where to write the result (default: beside the checkpoint)')
    p.add_argument('--suite', choices=['imagenet'], help='imagenet: ImageNet val, -V2, Sketch, -R, -A and ReaL, '
                   'each found under --data-root in its public layout, in one table')
    p.add_argument('--data-root', help='with --suite: the folder holding val/, imagenetv2-matched-frequency/, '
                   'sketch/, imagenet-r/, imagenet-a/, real.json (a missing one is listed as missing)')
    p.add_argument('--sets', nargs='+', metavar='NAME[=PATH]', help='with --suite: only these sets (imagenet, '
                   'imagenet-v2, sketch, imagenet-r, imagenet-a, real), each optionally from its own folder')
    return p


@guarded
def validate_main(argv: Optional[list[str]] = None) -> int:
    """Evaluate a checkpoint."""
    args = validate_parser().parse_args(argv)
    if args.json:  # before the evaluation, which may take long, rather than after it
        if Path(args.json).is_dir():
            raise UserError(f'--json {args.json} is a folder: give the path of the file to write')
        check_creatable(Path(args.json).parent, 'the folder of --json')
    suite = validation_suite(args.suite, args.data_root, args.sets)
    weights = load_weights(Path(args.checkpoint), args.weights, args.recipe,
                           recipe_overrides(args) + ['data.extra_evals=[]'])
    setting = apply_setting(weights, args.img_size, args.crop_pct)
    if args.split is not None and args.split != weights.recipe.data.val_split:
        if suite is not None:
            raise UserError('--split does not apply to --suite, whose sets each have their own')
        weights.recipe.data.val_split = args.split
        setting.expected_top1, setting.split = None, args.split  # the published figure is of the recipe's split
    world = distributed.init(args.device)
    logs.configure(world.is_main, False)
    if suite is not None:
        if not any(path.exists() for path in suite.values()):
            raise UserError(f'--suite: none of its sets is there ({", ".join(str(path) for path in suite.values())})')
        run_suite(weights, setting, suite, world, args.batch_size, args.precise_bn, args.json)
        return 0
    [(_, result)], _, recalibrated = evaluate_weights(weights.recipe, weights.state_dict, str(weights.path), world,
                                                      args.batch_size, args.precise_bn)
    if world.is_main:
        report_validation(weights, setting, result, recalibrated, args.json)
    return 0


def validation_suite(suite: Optional[str], data_root: Optional[str], sets: Optional[list[str]]
                     ) -> Optional[dict[str, Path]]:
    """--suite's sets and where they are; None without --suite, which --data-root and --sets need."""
    if suite is None:
        if data_root or sets:
            raise UserError(f'{"--data-root" if data_root else "--sets"} needs --suite imagenet')
        return None
    return set_paths(Path(data_root) if data_root else None, sets or [])


def apply_setting(weights: Weights, img_size: Optional[int], crop_pct: Optional[float]) -> EvalSetting:
    """The size and crop to evaluate at (eval_setting), set into the weights' recipe."""
    setting = eval_setting(weights.recipe, img_size, crop_pct)
    weights.recipe.data.eval_img_size, weights.recipe.data.crop_pct = setting.img_size, setting.crop_pct
    return setting


def run_suite(weights: Weights, setting: EvalSetting, paths: dict[str, Path], world: distributed.World,
              batch_size: int, precise_bn_batches: int, json_path: Optional[str], refresh_report: bool = True):
    """validate.py --suite and train.eval_suite: the table, its JSON beside the checkpoint, and (refresh_report)
    the run's report.md rewritten to include it when the checkpoint is a run's."""
    rows, recalibrated = evaluate_suite(weights.recipe, weights.state_dict, str(weights.path), world, batch_size,
                                        paths, precise_bn_batches)
    if world.is_main and report_suite(weights, setting, rows, recalibrated, json_path) and refresh_report:
        run_dir = weights.path.parent.parent
        if weights.path.parent.name == 'checkpoints' and (run_dir / 'metrics.csv').is_file():
            write_report(run_dir)


def report_validation(weights, setting: EvalSetting, result: dict, recalibrated: int, json_path: Optional[str]):
    """The result line on the console, compared with the published figure where there is one, and the JSON."""
    recipe, path = weights.recipe, weights.path
    result.update({'checkpoint': str(path), 'weights': weights.kind, 'model': recipe.model.name,
                   'img_size': setting.img_size, 'crop_pct': setting.crop_pct, 'split': recipe.data.val_split,
                   'dataset': recipe.data.dataset, 'precise_bn_batches': recalibrated,
                   'crop_source': setting.crop_source})
    if setting.expected_top1 is not None:
        result['expected_top1'] = setting.expected_top1
        result['delta_top1'] = result['top1'] - setting.expected_top1
    print(f'evaluating at {setting.img_size} px, crop {setting.crop_pct:g} ({setting.crop_source})')
    line = (f'{path.name} ({weights.kind} weights) @{setting.img_size} crop {setting.crop_pct:g}: '
            f'top-1 {result["top1"]:.3f}  top-5 {result["top5"]:.3f}  loss {result["loss"]:.4f}  '
            f'({result["count"]} images)')
    if setting.expected_top1 is not None:
        line += f'  expected {setting.expected_top1:.3f} ({result["delta_top1"]:+.3f})'
    print(line)
    if result['wild_logits']:
        logs.warn(diagnostics.wild_logit_text(result['wild_logits'], result['wild_loss'], result['loss']))
    recalibration = f'-pbn{recalibrated}' if recalibrated else ''
    split = f'-{setting.split}' if setting.split else ''
    write_result(Path(json_path) if json_path else path.with_name(
        f'{path.stem}.eval-{weights.kind}-{setting.img_size}-{setting.crop_pct:g}{recalibration}{split}.json'), result)


def report_suite(weights: Weights, setting: EvalSetting, rows: list[dict], recalibrated: int,
                 json_path: Optional[str]) -> bool:
    """The suite's table on the console and its JSON; True when that went beside the checkpoint."""
    path = weights.path
    out = Path(json_path) if json_path else path.with_name(
        suite_json_name(path.stem, weights.kind, setting.img_size, setting.crop_pct, recalibrated))
    sha256 = weights.manifest['sha256'] if weights.manifest else checkpoint.file_sha256(path)
    scored = {row['set'] for row in rows if 'top1' in row}
    rows = merged(earlier_suite_rows(out, sha256) if not json_path else [], rows)
    print(f'{path.name} ({weights.kind} weights) at {setting.img_size} px, crop {setting.crop_pct:g} '
          f'({setting.crop_source}):')
    print('\n'.join(suite_table(rows)))
    kept = [row['set'] for row in rows if 'top1' in row and row['set'] not in scored]
    if kept:
        print(f'(kept from an earlier evaluation of the same weights in {out.name}: {", ".join(kept)})')
    result = {'checkpoint': str(path), 'sha256': sha256, 'weights': weights.kind, 'model': weights.recipe.model.name,
              'img_size': setting.img_size, 'crop_pct': setting.crop_pct, 'crop_source': setting.crop_source,
              'precise_bn_batches': recalibrated, 'sets': rows}
    return write_result(out, result) and not json_path


def earlier_suite_rows(path: Path, sha256: str) -> list[dict]:
    """The rows of the suite result at path when it is of the same weights file (last.pt moves on as a run
    trains), else none."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(earlier, dict) or earlier.get('sha256') != sha256 or not isinstance(earlier.get('sets'), list):
        return []
    return [row for row in earlier['sets'] if isinstance(row, dict) and row.get('set') in BY_NAME]


def write_result(out: Path, result: dict) -> bool:
    """The result as JSON at out; False, with a warning, where it cannot be written."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f'wrote {out}')
        return True
    except OSError as e:  # beside a checkpoint in a read-only folder: the result above is all there is
        logs.warn(f'cannot write {out} ({e.strerror}); pass --json PATH to keep the result')
        return False
