"""Starting from local weights: load them, reset a classifier that does not fit, freeze what should not train.

Nothing is downloaded. The weights come from one of our checkpoints (its EMA weights when it has them), a timm
.pth/.pth.tar file, or a .safetensors file. Every adaptation is returned as a note, so nothing changes silently.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint
from .errors import UserError
from .recipe import ModelConfig


def prepare(module: nn.Module, cfg: ModelConfig, img_size: int) -> list[str]:
    """Load cfg.pretrained_path into module, reset a mismatched classifier, freeze cfg.freeze; returns notes."""
    notes = []
    if cfg.pretrained_path:
        notes += load_pretrained(module, cfg, img_size)
    if cfg.freeze:
        notes.append(freeze(module, cfg.freeze))
    return notes


def load_pretrained(module: nn.Module, cfg: ModelConfig, img_size: int) -> list[str]:
    path = Path(cfg.pretrained_path)
    stored = checkpoint.read_weights(path, needs=('model', 'recipe'))
    own = stored.recipe or {}  # an mnv-train checkpoint's recipe says what it was trained as, and at which size
    notes = [f'initialised from the {"raw" if stored.ema is None else "EMA"} weights of {path}']
    notes += load_into(module, stored.preferred, path, cfg.name, trained_as=own.get('model', {}).get('name'))
    if own:
        pretrained_size, size_source = own.get('data', {}).get('img_size'), 'its recipe'
    else:
        pretrained_size = module.pretrained_cfg.get('input_size', (None,))[-1]
        tag = f'{cfg.name}.{module.pretrained_cfg.get("tag")}'
        size_source = f'{path.name} does not say; timm\'s pretrained cfg {tag} does'
    if pretrained_size is None:
        notes.append(f'the input size {path} was trained at is unknown; fine-tuning at {img_size} px')
    elif pretrained_size != img_size:
        notes.append(f'input size differs from pretraining: {pretrained_size} px ({size_source}), fine-tuning at '
                     f'{img_size} px; expect lower accuracy until the model adapts')
    return notes


def classifier_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the classifier(s) named in timm's pretrained cfg (e.g. 'classifier.weight')."""
    names = module.pretrained_cfg.get('classifier') or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return [key for key in module.state_dict() if key.rsplit('.', 1)[0] in names]


def load_into(module: nn.Module, state_dict: dict, path: Path, model_name: str, trained_as=None) -> list[str]:
    """Load weights that fit; a classifier of another shape starts from scratch, any other misfit is an error."""
    own = module.state_dict()
    reset = [k for k in classifier_keys(module) if k not in state_dict or state_dict[k].shape != own[k].shape]
    notes = []
    if reset:
        weight = next((k for k in reset if k.endswith('weight')), reset[0])
        theirs = f'{state_dict[weight].shape[0]} classes' if weight in state_dict else 'no classifier'
        notes.append(f'classifier reset: {path.name} has {theirs}, this model {own[weight].shape[0]} classes; '
                     f'{", ".join(reset)} start from scratch')
        state_dict = {k: v for k, v in state_dict.items() if k not in reset}
    problems = {'missing': [k for k in own if k not in state_dict and k not in reset],
                'unexpected': [k for k in state_dict if k not in own],
                'wrong shape': [k for k in state_dict if k in own and state_dict[k].shape != own[k].shape]}
    if any(problems.values()):
        found = '; '.join(f'{what} {", ".join(keys[:3])}{" ..." if len(keys) > 3 else ""}'
                          for what, keys in problems.items() if keys)
        was = f' (it was trained as {trained_as})' if trained_as and trained_as != model_name else ''
        raise UserError(f'{path} does not fit {model_name}{was}: {found}')
    module.load_state_dict(state_dict, strict=False)
    return notes


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + '.')


def freeze(module: nn.Module, prefixes: list) -> str:
    """Frozen parameters get no gradient, and BatchNorm layers under the prefixes keep their statistics."""
    prefixes = [str(p).rstrip('.') for p in prefixes]
    parameters = dict(module.named_parameters())
    frozen = 0
    for prefix in prefixes:
        names = [name for name in parameters if _matches(name, prefix)]
        if not names:
            top = ', '.join(name for name, _ in module.named_children())
            raise UserError(f'model.freeze: {prefix!r} matches no parameter name (top-level modules: {top})')
        for name in names:
            parameters[name].requires_grad_(False)
        frozen += len(names)
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and any(_matches(name, p) for p in prefixes):
            layer.register_forward_pre_hook(_use_running_statistics)
    return f'frozen: {frozen} parameter tensors under {", ".join(prefixes)} (their BatchNorm statistics too)'


def _use_running_statistics(layer: nn.Module, _inputs):
    """Keeps a frozen BatchNorm in inference mode even when the model trains, so its statistics never move."""
    layer.training = False


def has_frozen_statistics(layer: nn.Module) -> bool:
    return _use_running_statistics in layer._forward_pre_hooks.values()
