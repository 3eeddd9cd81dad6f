"""The evaluations reported beside ImageNet validation: ImageNet-V2, Sketch, ImageNet-R, ImageNet-A and ReaL.

Each set has a labelling trap that gives plausible wrong numbers, so each gets its class map here rather than
timm's sorted folder names: V2's folders are the class indices as text ('10' sorts before '2'); R and A hold 200 of
the 1,000 classes, so the model's logits are restricted to those 200, in the set's order, or top-1 is near 0
(pytorch-image-models #2456); ReaL gives validation images sets of labels, and none to some. The class lists are
the ones timm ships (ImageNetInfo, data/_info/imagenet_r_synsets.txt and imagenet_a_synsets.txt), not copies.
"""
from __future__ import annotations

import difflib
import json
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from timm.data import ImageNetInfo

from . import data
from . import recipe as recipes
from .distributed import World
from .errors import UserError
from .evaluation import evaluate, evaluated_model
from .pipeline import eval_loader, eval_size

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class SuiteSet:
    name: str
    layout: str  # its folder (or file) under --data-root, as the set is published
    labels: str  # how its class folders name classes: 'wnid' (ImageNet-1k's), 'index' (0..999), or a 200-class
    # subset of timm's data/_info ('imagenet_r', 'imagenet_a': the folders are its WNIDs, the logits restricted)


SETS = (SuiteSet('imagenet', 'val', 'wnid'),
        SuiteSet('imagenet-v2', 'imagenetv2-matched-frequency', 'index'),
        SuiteSet('sketch', 'sketch', 'wnid'),
        SuiteSet('imagenet-r', 'imagenet-r', 'imagenet_r'),
        SuiteSet('imagenet-a', 'imagenet-a', 'imagenet_a'),
        SuiteSet('real', 'real.json', 'real'))  # ReaL labels for val/'s images, scored in imagenet's pass
BY_NAME = {s.name: s for s in SETS}
REAL_FILENAME = re.compile(r'ILSVRC2012_val_(\d{8})\.[A-Za-z]+$')  # the validation images real.json is ordered by


def set_paths(root: Optional[Path], picks: list[str]) -> dict[str, Path]:
    """{set name: its folder (real: its real.json)} for the picked sets, all by default: 'NAME' is looked for
    under root in its public layout, 'NAME=PATH' anywhere. ReaL relabels val/'s images, so it brings imagenet."""
    picked = {}
    for pick in picks or list(BY_NAME):
        name, _, path = pick.partition('=')
        if name not in BY_NAME:
            close = difflib.get_close_matches(name, BY_NAME, n=1)
            raise UserError(f'--sets: unknown set {name!r}{f" (did you mean {close[0]!r}?)" if close else ""}; '
                            f'the sets are {", ".join(BY_NAME)}')
        if not path and root is None:
            raise UserError(f'--sets {name}: give its folder as {name}=PATH, or --data-root holding '
                            f'{BY_NAME[name].layout}')
        if path and not Path(path).exists():
            raise UserError(f'--sets {pick}: {path} does not exist')
        picked[name] = Path(path) if path else root / BY_NAME[name].layout
    if 'real' in picked and 'imagenet' not in picked:
        if root is None:
            raise UserError('--sets real: ReaL scores the images of val/; give imagenet=PATH too, or --data-root')
        picked['imagenet'] = root / BY_NAME['imagenet'].layout
    return {s.name: picked[s.name] for s in SETS if s.name in picked}


def class_map(suite_set: SuiteSet) -> tuple[dict[str, int], Optional[list[int]], str]:
    """(class folder name -> label, the ImageNet-1k logits the labels index or None for all, where the names
    come from)."""
    wnids = ImageNetInfo('imagenet-1k').label_names()
    if suite_set.labels == 'index':
        return {str(i): i for i in range(IMAGENET_CLASSES)}, None, f'folders 0 to {IMAGENET_CLASSES - 1}'
    if suite_set.labels == 'wnid':
        return {w: i for i, w in enumerate(wnids)}, None, 'the ImageNet-1k WNIDs of timm\'s ImageNetInfo'
    listed = f'{suite_set.labels}_synsets.txt'
    subset = pkgutil.get_data('timm.data', f'_info/{listed}').decode().split()
    index = {w: i for i, w in enumerate(wnids)}
    return {w: i for i, w in enumerate(subset)}, [index[w] for w in subset], f'the WNIDs of timm\'s {listed}'


def check_class_folders(name: str, folder: Path, labels: dict[str, int], source: str):
    """The set's folder holds exactly its classes' folders: a partial download or the wrong folder would
    otherwise be scored, plausibly, against the wrong labels."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(found) != len(labels):
        raise UserError(f'{name}: {folder} holds {len(found)} class folders, expected {len(labels)} ({source})')
    unknown = [f for f in found if f not in labels]
    if unknown:
        raise UserError(f'{name}: class folder {unknown[0]!r} in {folder} is not one of its {len(labels)} classes '
                        f'({source})')


class ClassSubset(torch.nn.Module):
    """The model's logits at these classes only, in this order: a 200-class set is scored among its own 200."""

    def __init__(self, model: torch.nn.Module, classes: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer('classes', torch.tensor(classes), persistent=False)

    def forward(self, images):
        return self.model(images).index_select(1, self.classes.to(images.device))


def real_labels(path: Path, filenames: list[str], num_classes: int) -> torch.Tensor:
    """Multi-hot ReaL labels [image, class] for the validation images, by their ILSVRC2012_val_N file name:
    real.json lists every validation image's labels in file-number order, as timm's RealLabelsImagenet reads it."""
    try:
        lists = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f'real: cannot read {path} ({e})') from None
    if not isinstance(lists, list) or not all(isinstance(labels, list) for labels in lists):
        raise UserError(f'real: {path} is not a list of label lists (one per validation image)')
    if len(lists) != len(filenames):
        raise UserError(f'real: {path} holds labels for {len(lists)} images, val/ holds {len(filenames)} (one list '
                        f'per validation image)')
    hot = torch.zeros(len(filenames), num_classes, dtype=torch.bool)
    for row, filename in enumerate(filenames):
        match = REAL_FILENAME.search(filename)
        if match is None or not 1 <= int(match[1]) <= len(lists):
            raise UserError(f'real: {filename} is not named ILSVRC2012_val_N.JPEG with N from 1 to {len(lists)}, '
                            f'as {path} needs')
        labels = lists[int(match[1]) - 1]
        if not all(isinstance(label, int) and 0 <= label < num_classes for label in labels):
            raise UserError(f'real: {path} gives {filename} labels {labels}, not classes 0 to {num_classes - 1}')
        hot[row, labels] = True
    return hot


def evaluate_suite(recipe: recipes.Recipe, state_dict: dict, source_name: str, world: World, batch_size: int,
                   paths: dict[str, Path], precise_bn_batches: int = 0) -> tuple[list[dict], int]:
    """([a row per set: set, path, images, top1, top5, gap_top1 to imagenet; or missing], BatchNorm
    recalibration batches), at the recipe's eval size and crop."""
    model = evaluated_model(recipe, state_dict, source_name, world, batch_size, precise_bn_batches,
                            recipe.model.num_classes or IMAGENET_CLASSES)
    if model.module.num_classes != IMAGENET_CLASSES:
        raise UserError(f'the evaluation suite scores ImageNet-1k classes: {source_name} has '
                        f'{model.module.num_classes} outputs, not {IMAGENET_CLASSES}')
    rows = []
    for name, path in paths.items():
        if name != 'real' and path.is_dir():  # real is scored in imagenet's pass, over the same images
            rows += evaluate_set(name, path, paths.get('real') if name == 'imagenet' else None, recipe, model, world,
                                 batch_size)
    scored = {row['set'] for row in rows}
    rows += [{'set': name, 'path': str(path), 'missing': True} for name, path in paths.items() if name not in scored]
    return with_gaps(rows), model.recalibrated


def with_gaps(rows: list[dict]) -> list[dict]:
    """The rows in the suite's order, each scored one with its top-1 gap to ImageNet val when that was scored."""
    rows = sorted(rows, key=lambda row: list(BY_NAME).index(row['set']))
    reference = next((row['top1'] for row in rows if row['set'] == 'imagenet' and 'top1' in row), None)
    for row in rows:
        row.pop('gap_top1', None)
        if 'top1' in row and reference is not None:
            row['gap_top1'] = row['top1'] - reference
    return rows


def merged(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """This evaluation's rows over an earlier one's of the same weights and setting, so that sets scored one
    --sets at a time add up; a set this evaluation found missing keeps its earlier score."""
    by_set = {row['set']: row for row in earlier}
    for row in rows:
        if 'top1' in row or 'top1' not in by_set.get(row['set'], {}):
            by_set[row['set']] = row
    return with_gaps(list(by_set.values()))


def evaluate_set(name: str, folder: Path, real_path: Optional[Path], recipe: recipes.Recipe, model, world: World,
                 batch_size: int) -> list[dict]:
    """The set's row (and ReaL's, when real_path is a file beside val/), through the one evaluation path."""
    labels, classes, listed = class_map(BY_NAME[name])
    check_class_folders(name, folder, labels, listed)
    source = data.TimmImages('folder', str(folder), '', False, labels)
    loader = eval_loader(recipe.data, source, eval_size(recipe.data), recipe.data.crop_pct, model.norm, world,
                         batch_size)
    real = None
    if real_path is not None and real_path.is_file():
        hot = real_labels(real_path, source.dataset.filenames(basename=True), IMAGENET_CLASSES)
        real = hot[list(loader.sampler.indices)]  # in this rank's loader order
    net = model.module if classes is None else ClassSubset(model.module, classes)
    result = evaluate(net, loader, model.normalize, world, recipe.train.amp, real)
    rows = [{'set': name, 'path': str(folder), 'images': result['count'], 'top1': result['top1'],
             'top5': result['top5']}]
    if real is not None:
        rows.append({'set': 'real', 'path': str(real_path), 'images': result['real_count'],
                     'top1': result['real_top1'], 'top5': result['real_top5']})
    return rows
