"""Release files from a checkpoint: safetensors weights, ONNX and TorchScript, each checked against PyTorch.

    python -m mnv_train.export runs/NAME/checkpoints/best.pt --output release/ [--onnx] [--torchscript]

A release holds one set of weights (EMA or raw), no optimizer state, and can be loaded without unpickling
anything. Its name carries the first 8 hex digits of its sha256; the recipe (YAML) and the metrics and input
settings (JSON) lie beside it under the same name. Exports are compared with the PyTorch model on validation
images from the recipe's eval pipeline; nothing is written unless every check passes, and existing files are
only replaced with --force.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save as safetensors_bytes
from timm.layers import set_layer_config

from . import checkpoint, data
from . import model as models
from . import recipe as recipes
from .distributed import World
from .entry import Parser, add_recipe_arguments, check_creatable, guarded, make_folder, recipe_overrides
from .errors import UserError
from .evaluation import Weights, load_weights
from .pipeline import eval_sets, eval_size


def parser() -> argparse.ArgumentParser:
    p = Parser(prog='python -m mnv_train.export', description='Write release files for a '
                                'checkpoint: safetensors weights + recipe + metrics, optionally ONNX and TorchScript')
    p.add_argument('checkpoint', help='mnv-train checkpoint (.pt with its .json manifest)')
    p.add_argument('--output', required=True, help='folder for the release files')
    p.add_argument('--weights', choices=['auto', 'ema', 'raw'], default='auto',
                   help='EMA or raw weights (auto: EMA when the checkpoint has them)')
    p.add_argument('--onnx', action='store_true', help='also export ONNX (needs the onnx, onnxscript and '
                   'onnxruntime packages)')
    p.add_argument('--torchscript', action='store_true', help='also export TorchScript')
    p.add_argument('--force', action='store_true', help='overwrite existing release files')
    p.add_argument('--check-images', type=int, default=8, help='validation images the exports are checked on')
    p.add_argument('--tolerance', type=float, default=1e-4, help='largest acceptable |export - PyTorch| in the '
                   'logits, relative to the largest |logit| (or to 1 if that is smaller)')
    add_recipe_arguments(p)  # the recipe's data gives the check images, e.g. --data-dir /data
    return p


def build_model(recipe: recipes.Recipe, state_dict: dict, num_classes: int, path: Path) -> torch.nn.Module:
    """The model in eval mode, from layers timm marks as scriptable and exportable."""
    with set_layer_config(scriptable=True, exportable=True):
        module = models.create(recipe.model, num_classes)
    return models.load_weights(module, state_dict, str(path)).eval()


def check_images(recipe: recipes.Recipe, source, norm, count: int) -> torch.Tensor:
    """The first `count` validation images as the recipe's eval pipeline prepares them (resize, crop, normalise)."""
    eval_set = eval_sets(recipe, source, norm, World(), max(count, 1))[0]
    batch = next(iter(eval_set.loader))
    return data.DeviceNormalize(norm, torch.device('cpu'), channels_last=False)(batch)[0]


def max_abs_diff(outputs, reference: torch.Tensor) -> float:
    return float((torch.as_tensor(outputs) - reference).abs().max())


def export_onnx(module: torch.nn.Module, images: torch.Tensor, reference: torch.Tensor) -> tuple[bytes, float]:
    """ONNX with a dynamic batch, run by onnxruntime on the whole batch and on a batch of one."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError('--onnx needs the onnx, onnxscript and onnxruntime packages '
                        '(pip install onnx onnxscript onnxruntime)') from None
    example = images if len(images) > 1 else images.expand(2, -1, -1, -1)  # a batch of 1 would be fixed at 1
    batch = torch.export.Dim('batch')
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=['images'], output_names=['logits'],
                                dynamic_shapes=({0: batch},), verbose=False)
    model_bytes = program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(model_bytes, providers=['CPUExecutionProvider'])
    diffs = [max_abs_diff(session.run(None, {'images': part.numpy()})[0], expected)
             for part, expected in ((images, reference), (images[:1], reference[:1]))]
    return model_bytes, max(diffs)


def export_torchscript(module: torch.nn.Module, images: torch.Tensor, reference: torch.Tensor) -> tuple[bytes, float]:
    """torch.jit.script (keeps control flow, unlike tracing), saved, then loaded back for the check."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    model_bytes = buffer.getvalue()
    loaded = torch.jit.load(io.BytesIO(model_bytes), map_location='cpu')
    return model_bytes, max_abs_diff(loaded(images), reference)


def checked_exports(module: torch.nn.Module, images: torch.Tensor, exporters: list, tolerance: float):
    """({file name: bytes}, {kind: check}) for every exporter whose output matches PyTorch's within tolerance."""
    files, checks = {}, {}
    with torch.no_grad():
        reference = module(images)
        scale = max(1.0, float(reference.abs().max()))
        for kind, name, export in exporters:
            files[name], diff = export(module, images, reference)
            if not diff <= tolerance * scale:
                raise UserError(f'{kind} export differs from PyTorch by {diff:.3g} in logits up to {scale:.3g} on '
                                f'{len(images)} validation images (over --tolerance {tolerance:g}); nothing written')
            checks[kind] = {'file': name, 'max_abs_diff': diff, 'max_abs_logit': scale, 'images': len(images)}
    return files, checks


def release_info(weights: Weights, sha256: str, stem: str, num_classes: int, norm: data.Normalization,
                 checks: dict) -> dict:
    """The release's JSON: where the weights come from, their metrics, and the input they expect."""
    recipe, manifest = weights.recipe, weights.manifest
    metrics = manifest.get('metrics') or {}
    return {'weights_file': f'{stem}.safetensors', 'sha256': sha256, 'weights': weights.kind,
            'model': recipe.model.name, 'num_classes': num_classes, 'recipe_file': f'{stem}.yaml',
            'from_checkpoint': str(weights.path), 'step': manifest.get('step'),
            # a mid-epoch checkpoint carries the metrics of the last epoch end, which are not its own
            'metrics': metrics if metrics.get('step') == manifest.get('step') else None,
            'input': {'img_size': eval_size(recipe.data), 'crop_pct': recipe.data.crop_pct,
                      'interpolation': recipe.data.interpolation,
                      'mean': list(norm.mean), 'std': list(norm.std), 'layout': 'NCHW float32 RGB'},
            'checks': checks}


def earlier_checks(path: Path, sha256: str) -> Optional[dict]:
    """The checks that the release JSON at path records for formats still beside it, when it is this release's
    (same weights): a format added later keeps them. {} when there is no JSON, None when it is not this release's."""
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text())
        if info['sha256'] != sha256:
            return None
        return {kind: check for kind, check in info['checks'].items() if (path.parent / check['file']).is_file()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # edited by hand, or not a release
        return None


@guarded
def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    path, out = Path(args.checkpoint), Path(args.output)
    if not checkpoint.manifest_path(path).is_file():
        raise UserError(f'{path}: export needs an mnv-train checkpoint with its .json manifest (the recipe and '
                        f'metrics come from it)')
    weights = load_weights(path, args.weights, overrides=recipe_overrides(args))
    recipe, state_dict = weights.recipe, {k: v.contiguous() for k, v in weights.state_dict.items()}
    # one metadata key only: safetensors writes several in a per-process random order, which would change the hash
    release = safetensors_bytes(state_dict, metadata={'format': 'pt'})
    sha256 = hashlib.sha256(release).hexdigest()
    stem = f'{recipe.name}-{weights.kind}-{sha256[:8]}'
    files = {f'{stem}.safetensors': release, f'{stem}.yaml': recipe.to_yaml().encode()}
    formats = [stem + suffix for suffix in ['.onnx'] * args.onnx + ['.torchscript.pt'] * args.torchscript]
    earlier = earlier_checks(out / f'{stem}.json', sha256)
    clashes = [out / name for name in formats if (out / name).exists()]
    clashes += [out / name for name, content in files.items() if (out / name).exists()
                and (out / name).read_bytes() != content]
    if (out / f'{stem}.json').exists() and (earlier is None or not formats):  # not ours, or nothing to add
        clashes.append(out / f'{stem}.json')
    if clashes and not args.force:
        raise UserError(f'{clashes[0]} already exists; pass --force to overwrite the release files')
    check_creatable(out, 'the release folder')  # before the work; made only when every check has passed

    source = data.open_source(recipe.data, recipe.data.val_split, recipe.train.seed)
    num_classes = recipe.model.num_classes or getattr(source, 'num_classes', None)
    module = build_model(recipe, state_dict, num_classes, path)
    norm = data.resolve_normalization(recipe.data, module)
    exporters = [('onnx', f'{stem}.onnx', export_onnx)] * args.onnx
    exporters += [('torchscript', f'{stem}.torchscript.pt', export_torchscript)] * args.torchscript
    checks = {}
    if exporters:
        exported, checks = checked_exports(module, check_images(recipe, source, norm, args.check_images), exporters,
                                           args.tolerance)
        files.update(exported)
    info = release_info(weights, sha256, stem, num_classes, norm, {**(earlier or {}), **checks})
    files[f'{stem}.json'] = json.dumps(info, indent=1).encode()
    make_folder(out, 'the release folder')
    for name, content in files.items():
        checkpoint.atomic_write(out / name, content)
    for kind, check in checks.items():
        print(f'{kind}: max |export - PyTorch| {check["max_abs_diff"]:.3g} (logits up to '
              f'{check["max_abs_logit"]:.3g}) over {check["images"]} validation images')
    print(f'wrote {", ".join(files)} to {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
