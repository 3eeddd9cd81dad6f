"""Throughput of a recipe three ways, to tell what bounds a run: the model, the input pipeline, or neither.

  python -m mnv_train.bench --recipe mnv4_conv_small --data-dir /data/imagenet --steps 50

(a) model: forward + backward + optimizer step on batches already on the device;
(b) input: decode + the recipe's augmentations + copy/normalise on the device, no model;
(c) train: the real training loop (engine.train_one_epoch), data and model together.
The sampler's order and per-sample seeds and the per-micro-batch seeding run on the host in every step; their
cost is shown beside (c), as a share of a training step.
End to end should come within ~10 % of min(a, b); a bigger gap points at the glue between them. On a CPU the
loader workers and the model share the cores, so there the bound is 1 / (1/a + 1/b), which is printed too.

  python -m mnv_train.bench --recipe mnv4_hybrid_large --data-dir /data/imagenet --compile-modes all

instead measures (a) for each train.compile mode (and eager), with train.channels_last on and off: img/s, the
first step's seconds (compiling included) and its loss on one fixed batch next to eager's, to choose the fastest
mode that is exact enough.

  python -m mnv_train.bench --recipe mnv4_conv_small --data-dir /data/imagenet --compare-shards /data/imagenet-mds

instead measures (b) for the folder and for the same images as MDS shards (`python -m mnv_train.shard`, read by
data.dataset streaming with a fresh cache), alternately for --rounds rounds: a shared machine drifts, so the ratio
is taken round by round. Round 1 of the shards includes copying them into the cache.

  python -m mnv_train.bench --recipe mnv4_hybrid_large_prog --data-dir /data/imagenet --ramp

instead measures (a) at each train size of the recipe's progressive-resolution ramp (schedule.train_size_ramp),
each after its own --warmup steps, and the ramped run's epoch time over that of every epoch at data.img_size.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from . import distributed, logs
from . import recipe as recipes
from .build import Run, build_run
from .engine import epoch_batches, forward_backward, optimizer_step, seed_micro_batch, train_steps
from .entry import Parser, add_recipe_arguments, at_least, guarded, recipe_overrides
from .errors import UserError


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def model_rate(run: Run, steps: int, warmup: int, img_size: Optional[int] = None) -> float:
    """img/s of optimizer steps on one fixed batch that already sits on the device, at img_size (None: data.img_size),
    after `warmup` untimed steps."""
    per_device, size = run.plan.per_device, img_size or run.recipe.data.img_size
    memory_format = torch.channels_last if run.recipe.train.channels_last else torch.contiguous_format
    images = torch.randn(per_device, 3, size, size, device=run.world.device).contiguous(memory_format=memory_format)
    targets = torch.randint(0, run.module.num_classes, (per_device,), device=run.world.device)
    run.model.train()
    for i in range(warmup + steps):
        if i == warmup:
            _sync(run.world.device)
            start = time.perf_counter()
        forward_backward(run, images, targets, finishing=True)
        optimizer_step(run)
    _sync(run.world.device)
    return steps * per_device * run.world.size / (time.perf_counter() - start)


def input_rate(run: Run, steps: int, warmup: int) -> float:
    """img/s of the training input pipeline alone, delivered normalised on the device."""
    count, start = 0, None
    for i, (_, (images, *_)) in enumerate(epoch_batches(run, epoch=0)):
        if i == warmup:
            _sync(run.world.device)
            start = time.perf_counter()
        elif i > warmup:
            count += len(images)
        if i == warmup + steps:
            break
    _sync(run.world.device)
    if start is None or count == 0:
        raise ValueError('too few batches')
    return count * run.world.size / (time.perf_counter() - start)


def train_rate(run: Run, steps: int, warmup: int) -> float:
    """img/s of the real training loop (engine.train_one_epoch), timed after the warm-up steps."""
    ends = train_steps(run, warmup + steps)
    return steps * run.plan.global_batch / (ends[-1] - ends[warmup - 1])


def sampling_time(run: Run, steps: int) -> float:
    """Seconds per optimizer step this rank spends choosing its samples with their augmentation seeds and seeding
    its micro-batches, from an epoch's start (which builds the epoch's order)."""
    sampler, accum = run.train_sampler, run.plan.accum_steps
    sampler.set_position(epoch=0)
    items = iter(sampler)
    start = time.perf_counter()
    for step in range(steps):
        for micro_step in range(accum):
            for _ in range(run.plan.per_device):
                next(items)
            seed_micro_batch(run, step, micro_step)
    return (time.perf_counter() - start) / steps


def bench(run: Run, steps: int, warmup: int) -> dict:
    needed = (steps + warmup) * run.plan.accum_steps + 1
    if run.steps_per_epoch * run.plan.accum_steps < needed:
        raise UserError(f'an epoch has {run.steps_per_epoch * run.plan.accum_steps} batches; the benchmark needs '
                        f'{needed}: lower --steps or use a larger dataset')
    result = {'input': input_rate(run, steps, warmup)}
    result['model'] = model_rate(run, steps, warmup)
    run.state.step = 0
    result['train'] = train_rate(run, steps, warmup)
    result['sampling_s_per_step'] = sampling_time(run, steps)
    result['sampling_share'] = result['sampling_s_per_step'] * result['train'] / run.plan.global_batch
    bound = min(result['input'], result['model'])
    result.update({'bound_by': 'input' if result['input'] < result['model'] else 'model',
                   'train_vs_bound': result['train'] / bound})
    if run.world.device.type == 'cpu':
        # loader workers and the model take turns on the same cores, so their times per image add up
        result['shared_cores_bound'] = 1 / (1 / result['input'] + 1 / result['model'])
        result['train_vs_shared_cores_bound'] = result['train'] / result['shared_cores_bound']
    return result


def ramp_rates(run: Run, steps: int, warmup: int) -> dict:
    """Model-only img/s at each train size of the run's progressive-resolution ramp, each after its own warm-up steps
    (a new shape autotunes and sets up kernels, or compiles its own graph), and the ramped run's epoch time over a
    constant-size run's: the mean over epochs of rate(data.img_size) / rate(the epoch's size). The constant-size
    recipe (mnv4_hybrid_large for mnv4_hybrid_large_prog) differs only in its ramp, so this is their ratio too."""
    sizes = run.train_sampler.sizes
    rates = {size: model_rate(run, steps, warmup, size) for size in sorted(set(sizes))}
    full = rates[run.recipe.data.img_size]
    return {'model': {str(size): rate for size, rate in rates.items()},
            'epochs': {str(size): sizes.count(size) for size in rates},
            'epoch_time_ratio': sum(full / rates[size] for size in sizes) / len(sizes)}


def print_ramp_rates(result: dict, img_size: int):
    print(f'  {"size":>6s} {"epochs":>7s} {"img/s":>10s}')
    for size, rate in result['model'].items():
        print(f'  {size:>6s} {result["epochs"][size]:7d} {rate:10.1f}')
    print(f'  epoch time, ramped / every epoch at {img_size} px: {result["epoch_time_ratio"]:.3f} (model only, '
          f'mean over the run\'s {sum(result["epochs"].values())} epochs)')


def streamed_variant(recipe: recipes.Recipe, shards: str, cache: Path) -> recipes.Recipe:
    """The recipe reading `shards`, checked as a recipe file would be (a setting streaming refuses is one line)."""
    values = recipe.to_dict()
    return recipes.from_dict({**values, 'data': {**values['data'], 'dataset': 'streaming', 'remote': shards,
                                                 'local': str(cache)}})


def shard_comparison(folder: Run, streamed: Run, steps: int, warmup: int, rounds: int) -> dict:
    """Input img/s of the folder and of its shards, measured alternately; the streaming/folder ratio per round."""
    folder_rates, streamed_rates = [], []
    for _ in range(rounds):
        folder_rates.append(input_rate(folder, steps, warmup))
        streamed_rates.append(input_rate(streamed, steps, warmup))
    ratios = [s / f for s, f in zip(streamed_rates, folder_rates)]
    return {'input_folder': folder_rates, 'input_streaming': streamed_rates, 'streaming_vs_folder': ratios,
            'median_ratio': sorted(ratios)[len(ratios) // 2]}


def print_shard_comparison(result: dict):
    print(f'  {"round":>5s} {"folder img/s":>13s} {"shards img/s":>13s} {"ratio":>6s}')
    for i, (f, s, r) in enumerate(zip(result['input_folder'], result['input_streaming'],
                                      result['streaming_vs_folder'])):
        print(f'  {i + 1:5d} {f:13.1f} {s:13.1f} {r:6.2f}')
    print(f'  median ratio, shards / folder: {result["median_ratio"]:.2f}')


COMPILE_MODES = ('eager', 'default', 'max-autotune-no-cudagraphs', 'reduce-overhead')  # eager: train.compile off


def compile_variant(recipe: recipes.Recipe, mode: str, channels_last: bool) -> recipes.Recipe:
    train = replace(recipe.train, compile=mode != 'eager', compile_mode='default' if mode == 'eager' else mode,
                    channels_last=channels_last)
    return replace(recipe, train=train)


def first_step(run: Run) -> tuple[float, float]:
    """(seconds, loss) of the first optimizer step on a batch drawn from a fixed seed: compiling happens in it.
    Every RNG is seeded as training seeds step 0, so drop-path and dropout draw the same masks in every row
    whatever ran before it (the CUDA generator is not reseeded by build_run) and the loss gap is the compile's;
    inductor generates its random masks itself, so a compiled row's gap still holds their difference."""
    size, generator = run.recipe.data.img_size, torch.Generator().manual_seed(0)
    images = torch.randn(run.plan.per_device, 3, size, size, generator=generator).to(run.world.device)
    targets = torch.randint(0, run.module.num_classes, (run.plan.per_device,), generator=generator)
    memory_format = torch.channels_last if run.recipe.train.channels_last else torch.contiguous_format
    run.model.train()
    seed_micro_batch(run, step=0, micro_step=0)
    start = time.perf_counter()
    loss = forward_backward(run, images.contiguous(memory_format=memory_format), targets.to(run.world.device),
                            finishing=True)
    optimizer_step(run)
    _sync(run.world.device)
    return time.perf_counter() - start, float(loss)


def compile_table(recipe: recipes.Recipe, world: distributed.World, batch: int, modes: list[str], steps: int,
                  warmup: int) -> list[dict]:
    """One row per (mode, channels_last): model-only img/s, first step seconds, first loss relative to eager's."""
    rows = []
    for mode in modes:
        for channels_last in (True, False):
            with tempfile.TemporaryDirectory() as scratch:
                run = build_run(compile_variant(recipe, mode, channels_last), world, Path(scratch),
                                global_batch=batch * world.size, per_device_batch=batch)
                seconds, loss = first_step(run)
                rows.append({'compile': mode, 'channels_last': channels_last, 'first_step_s': seconds,
                             'first_loss': loss, 'model': model_rate(run, steps, warmup)})
    reference = {row['channels_last']: row['first_loss'] for row in rows if row['compile'] == 'eager'}
    for row in rows:
        if row['channels_last'] in reference:
            row['loss_vs_eager'] = abs(row['first_loss'] - reference[row['channels_last']]) / abs(
                reference[row['channels_last']])
    return rows


def print_compile_table(rows: list[dict]):
    print(f'  {"train.compile":28s} {"channels_last":>13s} {"img/s":>10s} {"first step s":>13s} {"loss vs eager":>14s}')
    for row in rows:
        gap = f'{row["loss_vs_eager"]:.2e}' if 'loss_vs_eager' in row else '-'
        print(f'  {row["compile"]:28s} {str(row["channels_last"]):>13s} {row["model"]:10.1f} '
              f'{row["first_step_s"]:13.2f} {gap:>14s}')


def compile_modes(value: str) -> list[str]:
    modes = list(COMPILE_MODES) if value == 'all' else value.split(',')
    unknown = [mode for mode in modes if mode not in COMPILE_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f'{", ".join(unknown)}: choose from all, {", ".join(COMPILE_MODES)}')
    return modes


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.bench', description=__doc__.split('\n\n')[0])
    p.add_argument('--recipe', required=True)
    add_recipe_arguments(p)
    p.add_argument('--img-size', type=at_least(1), help='default: the recipe\'s')
    p.add_argument('--batch-size', type=at_least(1), help='per device (default: the recipe\'s train.batch_size)')
    p.add_argument('--workers', type=at_least(0), help='loader workers per process (default: the recipe\'s)')
    p.add_argument('--steps', type=at_least(1), default=20, help='timed optimizer steps per measurement')
    p.add_argument('--warmup', type=at_least(1), default=3, metavar='N',
                   help='untimed steps first (compile, cudnn autotune, caches); at least 1')
    instead = p.add_mutually_exclusive_group()
    instead.add_argument('--compare-shards', metavar='SHARDS', help='instead: input img/s of the folder against the '
                                                                    'same images as MDS shards at SHARDS (path or s3://)')
    p.add_argument('--rounds', type=at_least(1), default=3, help='--compare-shards: alternate measurements of each')
    p.add_argument('--device', default='auto')
    p.add_argument('--json', help='write the figures here')
    instead.add_argument('--compile-modes', type=compile_modes, metavar='MODE[,MODE]',
                         help=f'instead: model-only rates per train.compile mode, with channels_last on and off (all, '
                              f'or of {", ".join(COMPILE_MODES)})')
    instead.add_argument('--ramp', action='store_true',
                         help='instead: model-only img/s at each train size of schedule.train_size_ramp, and the '
                              'ramped epoch time over a constant-size one')
    return p


def run_ramp(recipe: recipes.Recipe, world: distributed.World, batch: int, steps: int, warmup: int,
             json_path: Optional[str]):
    """--ramp: measure, print and write ramp_rates for the recipe."""
    if recipe.schedule.train_size_ramp is None:
        raise UserError(f'--ramp: recipe {recipe.name} has no schedule.train_size_ramp; give a progressive-resolution '
                        f'recipe such as mnv4_hybrid_large_prog')
    with tempfile.TemporaryDirectory() as scratch:
        run = build_run(recipe, world, Path(scratch), global_batch=batch * world.size, per_device_batch=batch)
        result = ramp_rates(run, steps, warmup)
    if world.is_main:
        print(f'{recipe.name} {recipe.model.name}, model only at each train size, batch {batch} x {world.size}, '
              f'amp {recipe.train.amp}, compile {recipe.train.compile}')
        print_ramp_rates(result, recipe.data.img_size)
        if json_path:
            Path(json_path).write_text(json.dumps({'recipe': recipe.name, 'batch': batch, 'world_size': world.size,
                                                   'steps': steps, 'warmup': warmup, **result}, indent=1))


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    overrides = recipe_overrides(args)
    overrides += [f'data.img_size={args.img_size}'] if args.img_size else []
    overrides += [f'data.num_workers={args.workers}'] if args.workers is not None else []
    recipe = recipes.load(args.recipe, overrides)
    world = distributed.init(args.device)
    logs.configure(world.is_main, quiet=True)
    batch = args.batch_size or recipe.train.batch_size
    if args.compile_modes:
        rows = compile_table(recipe, world, batch, args.compile_modes, args.steps, args.warmup)
        if world.is_main:
            print(f'{recipe.name} {recipe.model.name} @{recipe.data.img_size}, batch {batch}, amp {recipe.train.amp}')
            print_compile_table(rows)
            if args.json:
                Path(args.json).write_text(json.dumps({'recipe': recipe.name, 'compile_modes': rows}, indent=1))
        return 0
    if args.ramp:
        run_ramp(recipe, world, batch, args.steps, args.warmup, args.json)
        return 0
    if args.compare_shards:
        # loader workers may still be reading ahead into the shard cache while the folder is removed
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as scratch:
            runs = [build_run(variant, world, Path(scratch) / name, global_batch=batch * world.size,
                              per_device_batch=batch)
                    for name, variant in (('folder', recipe), ('streaming', streamed_variant(
                        recipe, args.compare_shards, Path(scratch) / 'cache')))]
            result = shard_comparison(*runs, args.steps, args.warmup, args.rounds)
        if world.is_main:
            print(f'{recipe.name} input pipeline @{recipe.data.img_size}, batch {batch}, {recipe.data.num_workers} '
                  f'workers: {recipe.data.data_dir} against {args.compare_shards}')
            print_shard_comparison(result)
            if args.json:
                Path(args.json).write_text(json.dumps({'recipe': recipe.name, 'workers': recipe.data.num_workers,
                                                       'batch': batch, 'steps': args.steps, **result}, indent=1))
        return 0
    with tempfile.TemporaryDirectory() as scratch:  # the run writes nothing worth keeping
        run = build_run(recipe, world, Path(scratch), global_batch=batch * world.size, per_device_batch=batch)
        result = bench(run, args.steps, args.warmup)
    result.update({'recipe': recipe.name, 'model_name': recipe.model.name, 'img_size': recipe.data.img_size,
                   'per_device_batch': run.plan.per_device, 'world_size': world.size,
                   'device': torch.cuda.get_device_name() if world.device.type == 'cuda' else 'cpu',
                   'threads': torch.get_num_threads(), 'workers': recipe.data.num_workers,
                   'amp': recipe.train.amp, 'channels_last': recipe.train.channels_last,
                   'compile': recipe.train.compile, 'steps': args.steps})
    if world.is_main:
        print(f'{recipe.name} {recipe.model.name} @{recipe.data.img_size}, batch {run.plan.per_device} x '
              f'{world.size} on {result["device"]}')
        for key, label in (('model', 'model only'), ('input', 'input pipeline'), ('train', 'end to end')):
            print(f'  {label:15s} {result[key]:10.1f} img/s')
        print(f'  bound by the {result["bound_by"]}; end to end = {100 * result["train_vs_bound"]:.0f} % of it')
        print(f'  sampler and seeding {1e3 * result["sampling_s_per_step"]:.2f} ms a step, '
              f'{100 * result["sampling_share"]:.2f} % of a training step')
        if 'shared_cores_bound' in result:
            print(f'  on CPU the loader shares the cores with the model: together they allow '
                  f'{result["shared_cores_bound"]:.1f} img/s; end to end = '
                  f'{100 * result["train_vs_shared_cores_bound"]:.0f} % of that')
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
            print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
