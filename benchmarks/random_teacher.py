"""Write a randomly initialised teacher for a distillation recipe as a safetensors file, so that its dry run can
time the teacher's share of a step without trained weights (nothing is downloaded).

    PYTHONPATH=. python benchmarks/random_teacher.py RECIPE OUT.safetensors [--set KEY=VALUE ...]
"""
import argparse

import timm
import torch
from safetensors.torch import save_file

from mnv_train import recipe as recipes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('recipe')
    parser.add_argument('out')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
    args = parser.parse_args()
    recipe = recipes.load(args.recipe, overrides=args.set)
    classes = recipe.model.num_classes or recipe.data.synthetic_classes
    torch.manual_seed(0)
    model = timm.create_model(recipe.distill.teacher, num_classes=classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)


if __name__ == '__main__':
    main()
