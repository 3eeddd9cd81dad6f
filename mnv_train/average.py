"""Checkpoint averaging: the mean of a run's k best checkpoints by eval top-1, evaluated and saved.

The late checkpoints of a run sit around the same minimum; their mean is often better than each of them.

    python -m mnv_train.average runs/NAME --top-k 3 [--weights ema|raw] [--output PATH] [--precise-bn N]

The result is an mnv-train checkpoint (weights, recipe, manifest with metrics), so validate.py, export and
--init-from read it like any other.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from . import checkpoint, distributed, logs
from . import recipe as recipes
from .entry import Parser, add_recipe_arguments, at_least, guarded, recipe_overrides
from .errors import UserError
from .evaluation import evaluate_weights


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.average', description='Average the top-k checkpoints '
                                'of a run by eval top-1, evaluate the average and save it')
    p.add_argument('run_dir', help='run folder (the one holding checkpoints/)')
    p.add_argument('--top-k', type=at_least(1), required=True, help='how many of the best checkpoints to average')
    p.add_argument('--weights', choices=['auto', 'ema', 'raw'], default='auto',
                   help='average the EMA or the raw weights, ranked by ema_top1 or top1 (auto: EMA if the run has it)')
    p.add_argument('--output', help='where to save the average (default: RUN_DIR/average-top{K}-{weights}.pt)')
    p.add_argument('--force', action='store_true', help='overwrite an existing output file')
    p.add_argument('--precise-bn', type=at_least(0), metavar='N', help='recompute BatchNorm statistics of the average '
                   'over N training batches (default: the recipe\'s train.precise_bn_batches)')
    add_recipe_arguments(p)
    p.add_argument('--batch-size', type=at_least(1), default=128)
    p.add_argument('--device', default='auto')
    return p


def average_weights(paths: list[Path], part: str) -> tuple[dict, dict]:
    """(mean of payload[part] over the checkpoints, recipe of the first); sums in float64, one file at a time.
    Integer buffers (BatchNorm batch counters) are taken from the first checkpoint."""
    total = recipe = dtypes = None
    for path in paths:
        payload = checkpoint.load(path)
        weights = payload.get(part)
        if weights is None:
            raise UserError(f'checkpoint {path} has no {part} weights')
        if total is None:
            recipe, dtypes = payload['recipe'], {k: v.dtype for k, v in weights.items()}
            total = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
        elif weights.keys() != total.keys() or any(weights[k].shape != total[k].shape for k in total):
            raise UserError(f'checkpoint {path} holds other weights than {paths[0]} (another model?)')
        else:
            for key, value in weights.items():
                if value.is_floating_point():
                    total[key] += value.double()
    return {k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}, recipe


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / 'checkpoints').is_dir():
        raise UserError(f'{run_dir} is not a run folder: it has no checkpoints/')
    checkpointer = checkpoint.Checkpointer(run_dir / 'checkpoints', keep=1, is_writer=False)
    weights = args.weights
    if weights == 'auto':
        weights = 'ema' if checkpointer.ranked('ema_top1') else 'raw'
    key = 'ema_top1' if weights == 'ema' else 'top1'
    ranked = checkpointer.ranked(key)
    if len(ranked) < args.top_k:
        raise UserError(f'{run_dir / "checkpoints"} holds {len(ranked)} checkpoint(s) evaluated for {key}, fewer '
                        f'than --top-k {args.top_k}; set train.keep_best_checkpoints to at least {args.top_k} so '
                        f'pruning keeps them')
    chosen = ranked[:args.top_k]
    output = Path(args.output) if args.output else run_dir / f'average-top{args.top_k}-{weights}.pt'
    if not args.force and (output.exists() or checkpoint.manifest_path(output).exists()):
        raise UserError(f'{output} already exists; pass --force to overwrite it, or --output')

    world = distributed.init(args.device)
    logs.configure(world.is_main, False)
    averaged, recipe_dict = average_weights([path for _, path in chosen], 'ema' if weights == 'ema' else 'model')
    recipe = recipes.from_dict(recipes.apply_overrides(recipe_dict, recipe_overrides(args)))
    precise = recipe.train.precise_bn_batches if args.precise_bn is None else args.precise_bn
    results, evaluated, recalibrated = evaluate_weights(recipe, averaged, 'the averaged weights', world,
                                                        args.batch_size, precise)
    if recalibrated:
        logs.info(f'BatchNorm statistics recomputed over {recalibrated} training batches')
    metrics = {f'{key}{eval_set.name}': result[key] for eval_set, result in results for key in ('top1', 'top5', 'loss')}

    sources = [{'checkpoint': path.name, 'step': checkpoint.read_manifest(path)['step'], key: score}
               for score, path in chosen]
    step = max(s['step'] for s in sources)
    if world.is_main:
        checkpoint.write(output, {'model': evaluated, 'ema': None, 'recipe': recipe.to_dict()},
                         {'step': step, 'metrics': {'step': step, **metrics},
                          'averaged': {'weights': weights, 'ranked_by': key, 'precise_bn_batches': precise,
                                       'checkpoints': sources}})
        listed = ', '.join(f'step {s["step"]} ({s[key]:.2f})' for s in sources)
        print(f'averaged {len(sources)} checkpoint(s) by {key}: {listed}')
        print(f'average: top-1 {metrics["top1"]:.3f}  top-5 {metrics["top5"]:.3f}  loss {metrics["loss"]:.4f} '
              f'({metrics["top1"] - chosen[0][0]:+.3f} against the best one)')
        print(f'wrote {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
