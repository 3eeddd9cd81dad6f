#!/usr/bin/env python3
"""Train a model from a recipe: python train.py --recipe fmnist_mnv4_conv_small (torchrun for N processes)."""
import sys

from mnv_train.cli import train_main

if __name__ == '__main__':
    sys.exit(train_main())
