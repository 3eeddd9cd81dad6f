"""Model construction from timm, and the BatchNorm settings recipes carry over from TF configs."""
from __future__ import annotations

import contextlib

import timm
import torch
from timm.layers import convert_sync_batchnorm
from torch import nn

from .errors import UserError
from .recipe import ModelConfig


def create(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if not timm.is_model(cfg.name):
        close = timm.list_models(f'*{cfg.name.split("_")[0]}*')[:5]
        examples = f' (e.g. {", ".join(close)})' if close else ''
        raise UserError(f'model.name {cfg.name!r} is not a timm model{examples}')
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, drop_rate=cfg.drop_rate,
                                  drop_path_rate=cfg.drop_path_rate, **cfg.kwargs)
    except TypeError as e:
        raise UserError(f'model.kwargs for {cfg.name}: {e}') from None
    set_batchnorm(model, cfg.bn_momentum, cfg.bn_eps)
    return model


def load_weights(model: nn.Module, state_dict: dict, source: str) -> nn.Module:
    """Strict load; weights of another architecture or class count fail in one line naming where they came from."""
    name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    classes = getattr(model, 'num_classes', None)
    trained_for = classifier_classes(model, state_dict)
    if classes and trained_for and trained_for != classes:
        raise UserError(f'{source} was trained for {trained_for} classes, but {name} is built here for {classes} '
                        f'classes (the data\'s, or model.num_classes)')
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [str(e)]  # past the header
        raise UserError(f'{source} does not fit {name} with {classes} classes: {detail[0][:200]}') from None
    return model


def classifier_classes(model: nn.Module, state_dict: dict):
    """The class count of the classifier in state_dict, by the name timm's pretrained cfg gives it; else None."""
    names = getattr(model, 'pretrained_cfg', {}).get('classifier') or ()
    for name in (names,) if isinstance(names, str) else names:
        weight = state_dict.get(f'{name}.weight')
        if weight is not None and weight.ndim >= 1:
            return weight.shape[0]
    return None


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm layers synchronised across processes, activations kept.

    torch's own conversion turns timm's BatchNormAct2d into a plain SyncBatchNorm: the activation stays as a
    child module that is never called, and MobileNetV4 becomes nearly linear. timm's conversion keeps it.
    """
    return convert_sync_batchnorm(model)


def set_batchnorm(model: nn.Module, momentum, eps):
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                module.momentum = momentum
            if eps is not None:
                module.eps = eps


def autocast(amp: str, device: torch.device):
    """train.amp as a context: bf16 or fp16 autocast on the run's device, or nothing."""
    if amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
