#!/usr/bin/env python3
"""Evaluate a checkpoint: python validate.py runs/NAME/checkpoints/best.pt --img-size 448 --crop-pct 1.0"""
import sys

from mnv_train.cli import validate_main

if __name__ == '__main__':
    sys.exit(validate_main())
