"""--dry-run's augmentation preview: the picture of 32 augmented training images and the table of RandAugment ops."""
from __future__ import annotations

import re

import pytest

from mnv_train import data, distributed, preview
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.cli import train_main
from mnv_train.preview import effects_table, find_rand_augment

from conftest import RAMP, merge

OLD_TIMM_STRING = 'rand-m15-mmax15-n2-mstd0-p1.0'  # mnv4_hybrid_large's string before the fix


def table_for(name: str, overrides: list[str] | None = None) -> str:
    recipe = recipes.load(name, overrides)
    transform = data.train_transform(recipe.data, recipe.aug, data.Normalization((0.5,) * 3, (0.5,) * 3))
    return effects_table(find_rand_augment(transform), recipe.data.img_size, recipe.name)


def largest_px(table: str, op: str) -> float:
    return float(re.search(rf'\| {op} \| [\d.]+ \| ([\d.]+) px \|', table).group(1))


def test_the_table_gives_259_px_of_translate_for_the_old_hybrid_large_string_and_at_most_173_now():
    old = table_for('mnv4_hybrid_large', [f'aug.auto_augment={OLD_TIMM_STRING}'])
    assert largest_px(old, 'TranslateXRel') == largest_px(old, 'TranslateYRel') == 259
    assert '| TranslateXRel | 15 | 259 px | 12.9 % |' in old  # 1 - (1 - 1/15)^2 with p1.0
    new = table_for('mnv4_hybrid_large')
    assert largest_px(new, 'TranslateXRel') <= 173
    assert '| Rotate | 10 | 30 deg |' in new and '| ShearX | 10 | 16.7 deg |' in new


def test_the_table_gives_googles_pixel_translate_for_the_google_recipe():
    table = table_for('mnv4_hybrid_large_tf')
    assert '| TranslateX | 15 | 15 px | 12.1 % |' in table  # translate_const 10 at M15; 1 - (1 - 1/16)^2
    assert '| Identity |' in table and 'Cutout' not in table


@pytest.fixture(scope='module')
def dry_run_folder(tmp_path_factory):
    import yaml

    from conftest import TINY, merge
    root = tmp_path_factory.mktemp('preview')
    recipe = root / 'tiny.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, {'aug': {'auto_augment': 'rand-m9-n2-mstd0-p1.0', 'mixup': 0.8}})))
    assert train_main(['--recipe', str(recipe), '--output', str(root / 'run'), '--dry-run', '--quiet']) == 0
    return root / 'run'


def test_dry_run_writes_the_preview_picture_and_the_table_beside_it(dry_run_folder, capsys):
    png, table = dry_run_folder / 'plots' / 'augment_preview.png', dry_run_folder / 'plots' / 'augment_preview.md'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000
    text = table.read_text()
    assert text.startswith('# RandAugment in tiny at 32 px') and text.count('\n| ') == 16  # header + 15 ops


def test_a_ramped_runs_preview_says_it_shows_the_last_train_size_and_where_the_ramp_starts(write_recipe, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setattr(preview, 'pyplot', lambda: None)  # the table alone
    recipe = recipes.load(str(write_recipe(merge(RAMP, {'aug': {'auto_augment': 'rand-m9-n2-mstd0-p1.0'}}))))
    [table] = preview.write_preview(build_run(recipe, distributed.init('cpu'), tmp_path / 'run'))
    assert table.read_text().startswith('# RandAugment in tiny at 32 px (the last train size: '
                                        'schedule.train_size_ramp trains from 16 px, where translates move by the '
                                        'same share of the image)\n')


def test_the_preview_captions_name_the_ops_that_changed_each_image_and_the_mixed_label_weight(write_recipe,
                                                                                               tmp_path):
    from mnv_train.build import build_run
    from mnv_train.distributed import World
    from mnv_train.preview import PREVIEW_IMAGES, augmented_batch
    recipe = recipes.load(str(write_recipe({'aug': {'auto_augment': 'rand-m9-n2-mstd0-p1.0', 'mixup': 0.8}})))
    run = build_run(recipe, World(), tmp_path / 'run')
    rand_augment = find_rand_augment(run.train_loader.dataset.transform)
    ops = rand_augment.ops
    images, captions = augmented_batch(run, rand_augment)
    assert rand_augment.ops is ops  # the recorders are taken out again
    assert images.shape == (PREVIEW_IMAGES, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    names = {op.name for op in ops}
    applied = [caption.split('\n')[0] for caption in captions]
    assert sum(part in names for caption in applied for part in caption.split(' + ')) > PREVIEW_IMAGES  # ~2 each
    assert all(re.search(r'\nlabel weight 0\.\d\d|\nlabel weight 1\.00', caption) for caption in captions)
