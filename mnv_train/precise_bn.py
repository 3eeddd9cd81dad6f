"""BatchNorm recalibration ("precise BN"). (Placeholder: filled in by the transfer issue.)"""
from __future__ import annotations


def recalibrate_run(run):
    """Recompute BN running statistics of the raw and EMA weights over run.recipe.train.precise_bn_batches."""
