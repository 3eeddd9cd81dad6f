"""Google's RandAugment semantics: pixel translate, fill 128, Identity, exclude_ops, prob_to_apply, seeding."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mnv_train.augment import tf_rand_augment
from mnv_train.errors import UserError

GOOGLE_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
              'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd']
SEEDS = range(40)


def config(**changes):
    """Google's config defaults (official/vision/configs/common.py), with `changes`."""
    return SimpleNamespace(**{**dict(num_layers=2, magnitude=10., magnitude_std=0., prob_to_apply=None,
                                     translate_const=10., cutout_const=40., exclude_ops=[]), **changes})


def only(op: str, **changes):
    """One layer that picks `op` or Identity."""
    return config(num_layers=1, exclude_ops=[name for name in GOOGLE_OPS if name != op], **changes)


def run(transform, image: Image.Image, seed: int) -> np.ndarray:
    random.seed(seed)
    np.random.seed(seed)
    return np.asarray(transform(image))


def uniform(value: int, size: int = 384) -> Image.Image:
    return Image.new('RGB', (size, size), (value,) * 3)


def noise(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def changed_outputs(transform, image: Image.Image) -> list[np.ndarray]:
    original = np.asarray(image)
    outputs = [run(transform, image, seed) for seed in SEEDS]
    return [out for out in outputs if not np.array_equal(out, original)]


@pytest.mark.parametrize('op, axis', [('TranslateX', 1), ('TranslateY', 0)])
def test_translate_at_magnitude_15_and_translate_const_10_moves_the_image_by_exactly_15_px(op, axis):
    pixels = np.zeros((384, 384, 3), np.uint8)
    pixels[(slice(None), 192) if axis == 1 else 192] = 255  # a bright column for X, a bright row for Y
    transform = tf_rand_augment(only(op, magnitude=15, translate_const=10), img_size=384)
    shifts = set()
    for out in changed_outputs(transform, Image.fromarray(pixels)):
        bright = np.nonzero(out[..., 0].max(axis=1 - axis) == 255)[0]
        assert len(bright) == 1
        shifts.add(int(bright[0]) - 192)
    assert shifts == {-15, 15}  # timm's rand-m15-mmax15 would move it by up to 259 px


@pytest.mark.parametrize('op', ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout'])
def test_pixels_an_op_uncovers_are_filled_with_128_and_the_rest_sampled_nearest(op):
    binary = np.random.default_rng(0).integers(0, 2, (384, 384, 1), dtype=np.uint8).repeat(3, axis=2) * 255
    transform = tf_rand_augment(only(op, magnitude=15), img_size=384)
    outputs = changed_outputs(transform, Image.fromarray(binary))
    assert outputs
    for out in outputs:
        assert set(np.unique(out)) == {0, 128, 255}  # bilinear or bicubic sampling would add other values


def test_cutout_fills_a_square_of_twice_magnitude_times_cutout_const_over_10():
    transform = tf_rand_augment(only('Cutout', magnitude=15, cutout_const=20), img_size=384)
    sides = set()
    for out in changed_outputs(transform, uniform(0)):
        rows, cols = np.nonzero(out[..., 0] == 128)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == height * width and height <= 60 and width <= 60  # one rectangle, clipped at borders
        sides.add((height, width))
    assert (60, 60) in sides  # 2 * int(15 / 10 * 20)


def test_identity_is_one_of_the_ops_and_excluded_ops_are_not():
    assert [op.name for op in tf_rand_augment(config(), 224).ops] == GOOGLE_OPS + ['Identity']
    names = [op.name for op in tf_rand_augment(config(exclude_ops=['Cutout']), 224).ops]
    assert 'Cutout' not in names and len(names) == 16


def test_with_every_named_op_excluded_only_identity_is_left_and_images_pass_unchanged():
    transform = tf_rand_augment(config(exclude_ops=GOOGLE_OPS, magnitude=15), img_size=64)
    assert not changed_outputs(transform, noise())
    assert changed_outputs(tf_rand_augment(only('Cutout', magnitude=15), img_size=64), noise())


def test_prob_to_apply_0_returns_every_image_unchanged():
    transform = tf_rand_augment(config(magnitude=15, prob_to_apply=0.), img_size=64)
    assert not changed_outputs(transform, noise())


def test_the_same_seeds_give_the_same_images_and_other_seeds_other_images():
    transform = tf_rand_augment(config(magnitude=15, prob_to_apply=0.7), img_size=64)
    first = [run(transform, noise(), seed) for seed in SEEDS]
    assert all(np.array_equal(a, run(transform, noise(), seed)) for seed, a in zip(SEEDS, first))
    assert len({a.tobytes() for a in first}) > len(SEEDS) // 2


def test_magnitude_std_switches_on_googles_unit_noise_clipped_to_10():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, 32] = 255

    def shifts(**changes):
        transform = tf_rand_augment(only('TranslateX', translate_const=10, **changes), img_size=64)
        return {abs(int(np.argmax(out[0, :, 0])) - 32) for out in changed_outputs(transform, Image.fromarray(pixels))}

    assert shifts(magnitude=15, magnitude_std=0.5) == {10}  # 15 + N(0, 1) clipped to 10, never 15
    assert len(shifts(magnitude=5, magnitude_std=0.01)) >= 3  # std 1 whatever magnitude_std says


def test_posterize_at_magnitude_below_2_5_keeps_0_bits_and_gives_black_instead_of_raising():
    transform = tf_rand_augment(only('Posterize', magnitude=2), img_size=64)
    assert all(out.max() == 0 for out in changed_outputs(transform, uniform(200, 64)))


def test_solarize_add_adds_googles_165_at_magnitude_15_past_timms_cap_of_128():
    transform = tf_rand_augment(only('SolarizeAdd', magnitude=15), img_size=64)
    assert {int(out.max()) for out in changed_outputs(transform, uniform(10, 64))} == {175}


def test_contrast_blends_towards_googles_grey_of_pixel_count_over_256_not_the_image_mean():
    transform = tf_rand_augment(only('Contrast', magnitude=2), img_size=384)
    factor = 2 / 10 * 1.8 + 0.1
    expected = int(255 + factor * (100 - 255))  # 384 * 384 / 256 clipped to 255; PIL's mean grey would keep 100
    assert {int(out.max()) for out in changed_outputs(transform, uniform(100))} == {expected}


def test_an_unknown_op_name_is_a_user_error_naming_the_key():
    with pytest.raises(UserError, match=r"aug\.tf_randaugment\.exclude_ops: 'Foo' is not a Google RandAugment op"):
        tf_rand_augment(config(exclude_ops=['Foo']), 224)
    with pytest.raises(UserError, match=r"did you mean 'Cutout'"):
        tf_rand_augment(config(exclude_ops=['cutout']), 224)
    with pytest.raises(UserError, match=r"exclude_ops: 'Identity' cannot be excluded"):
        tf_rand_augment(config(exclude_ops=['Identity']), 224)


def test_a_translate_that_covers_the_whole_image_is_a_user_error_unless_translate_is_excluded():
    with pytest.raises(UserError, match=r'aug\.tf_randaugment\.translate_const: 300 at magnitude 15 reaches 450 px'):
        tf_rand_augment(config(magnitude=15, translate_const=300), 384)
    tf_rand_augment(config(magnitude=15, translate_const=300, exclude_ops=['TranslateX', 'TranslateY']), 384)


def _rand_augment(recipe_name):
    from timm.data.auto_augment import RandAugment

    from mnv_train import data
    from mnv_train import recipe as recipes
    recipe = recipes.load(recipe_name)
    transform = data.train_transform(recipe.data, recipe.aug, data.Normalization((0.5,) * 3, (0.5,) * 3))
    return next(t for t in transform.transforms if isinstance(t, RandAugment))


def test_google_recipes_translate_in_pixels_and_timm_recipes_by_image_fraction():
    google = _rand_augment('mnv4_hybrid_large_tf')
    names = [op.name for op in google.ops]
    assert 'Identity' in names and 'Cutout' not in names and 'TranslateX' in names
    translate = next(op for op in google.ops if op.name == 'TranslateX')
    assert abs(translate.level_fn(translate.magnitude, translate.hparams)[0]) == 15.0  # pixels at M15, random sign
    assert translate.hparams['img_mean'] == (128, 128, 128)
    timm_variant = _rand_augment('mnv4_hybrid_large')
    assert 'TranslateXRel' in [op.name for op in timm_variant.ops]  # timm's RandAugment, stated as such
