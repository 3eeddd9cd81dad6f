"""Starting from local weights. (Placeholder: filled in by the transfer issue.)"""
from __future__ import annotations


def prepare(module, cfg, img_size: int) -> list[str]:
    """Load cfg.pretrained_path into module, reset a mismatched classifier, freeze cfg.freeze; returns notes."""
    return []
