#!/usr/bin/env python3
"""What the wild-logit images of a checkpoint become when each BatchNorm layer's running variances are raised to at
least FLOOR x that layer's median: a measurement for choosing a remedy, not one. The flat channels that the warning
names have a running variance of ~0 because their input was constant on every training batch; an evaluation image
that moves them is scaled by up to 1/sqrt(eps) per layer, and the layers after multiply it.

  python benchmarks/bn_variance_floor.py CHECKPOINT [--weights raw|ema] [--floors 0 1e-3 1e-2 1e-1]

Evaluates on the recipe's main eval set (its size and crop), on the CPU; prints one line per floor.
"""
import argparse
import copy

import torch

from mnv_train import data, distributed, evaluation
from mnv_train.pipeline import eval_sets


def floor_running_variances(module: torch.nn.Module, floor: float) -> int:
    """Raises running variances below floor x their layer's median to that value; how many channels it raised."""
    raised = 0
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.running_var is not None and floor:
            low = float(layer.running_var.median()) * floor
            raised += int((layer.running_var < low).sum())
            layer.running_var.clamp_(min=low)
    return raised


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('checkpoint')
    p.add_argument('--weights', choices=['raw', 'ema'], default='raw')
    p.add_argument('--floors', type=float, nargs='+', default=[0, 1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument('--batch-size', type=int, default=256)
    args = p.parse_args()
    world = distributed.init('cpu')
    weights = evaluation.load_weights(args.checkpoint, args.weights)
    recipe = weights.recipe
    source = data.open_source(recipe.data, recipe.data.val_split, recipe.train.seed)
    model = evaluation.evaluated_model(recipe, weights.state_dict, args.checkpoint, world, args.batch_size, 0,
                                       recipe.model.num_classes or getattr(source, 'num_classes', None))
    eval_set = eval_sets(recipe, source, model.norm, world, args.batch_size)[0]
    trained = copy.deepcopy(model.module.state_dict())
    for floor in args.floors:
        model.module.load_state_dict(trained)
        raised = floor_running_variances(model.module, floor)
        result = evaluation.evaluate(model.module, eval_set.loader, model.normalize, world, 'none')
        print(f'{args.weights} floor {floor:g}: {raised} channels raised; top-1 {result["top1"]:.2f}, loss '
              f'{result["loss"]:.4f}, {int(result["wild_logits"])} wild images carrying {result["wild_loss"]:.4f}',
              flush=True)


if __name__ == '__main__':
    main()
