"""Google's RandAugment and MixupAndCutmix against the output of Google's own code (tests/fixtures/google_augment,
written by tools/google_augment_fixtures.py), and its semantics: pixel translate, Identity, exclude_ops,
prob_to_apply, seeding; timm's RandAugment past magnitude 10 warns."""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from mnv_train import augment, distributed, logs
from mnv_train import recipe as recipes
from mnv_train.augment import GoogleMixup, tf_rand_augment
from mnv_train.build import build_run
from mnv_train.errors import UserError

from conftest import RAMP, merge

GOOGLE_OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
              'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd']
SEEDS = range(40)
FIXTURES = Path(__file__).parent / 'fixtures' / 'google_augment'
SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}


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


@pytest.mark.parametrize('op', ['Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'])
def test_geometric_ops_mirror_the_image_into_uncovered_pixels_as_googles_reflect_fill_does_and_sample_nearest(op):
    binary = np.random.default_rng(0).integers(0, 2, (384, 384, 1), dtype=np.uint8).repeat(3, axis=2) * 255
    transform = tf_rand_augment(only(op, magnitude=15), img_size=384)
    outputs = changed_outputs(transform, Image.fromarray(binary))
    assert outputs
    for out in outputs:
        assert set(np.unique(out)) == {0, 255}  # no 128 fill; bilinear or bicubic sampling would add other values


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


def google_op(name: str, magnitude: float):
    """Our op `name` at `magnitude` as tools/google_augment_fixtures.py ran Google's (translate_const 10,
    cutout_const 10): (op function, level-to-arg function, AugmentOp)."""
    op = next(o for o in tf_rand_augment(only(name, magnitude=magnitude, cutout_const=10.), 64).ops if o.name == name)
    return lambda img, sign: op.aug_fn(img, *[sign * abs(a) if name in SIGNED else a
                                              for a in (op.level_fn(op.magnitude, op.hparams) if op.level_fn else ())],
                                       **op.kwargs)


@pytest.mark.parametrize('op', [op for op in GOOGLE_OPS if op != 'Cutout'])
def test_each_op_equals_googles_own_output_within_one_grey_level_at_magnitudes_5_10_and_15(op):
    fixture = np.load(FIXTURES / 'ops.npz')
    compared = 0
    for magnitude in (5, 10, 15):
        ours = google_op(op, magnitude)
        for key in (k for k in fixture.files if k.startswith(f'{op}_m{magnitude}_s')):
            sign, index = int(key.split('_s')[1][:2]), key[-1]
            out = np.asarray(ours(Image.fromarray(fixture[f'input_{index}']), sign)).astype(int)
            assert np.abs(out - fixture[key].astype(int)).max() <= 1, key
            compared += 1
    assert compared == 3 * 3 * (2 if op in SIGNED else 1)


def test_googles_randaugment_path_translates_with_reflection_exactly_as_our_translate_does():
    fixture = np.load(FIXTURES / 'ops.npz')
    image = Image.fromarray(fixture['input_0'])
    candidates = [np.asarray(image)] + [np.asarray(google_op('TranslateX', 15)(image, sign)) for sign in (1, -1)]
    for out in fixture['randaugment_translatex_m15_0']:
        assert any(np.array_equal(out, c) for c in candidates)
        assert not (out == 128).all(-1).any()  # Google's wrap/unwrap never fills 128 under its reflect fill mode


def test_solarize_at_magnitudes_10_and_15_wraps_the_threshold_like_googles_uint8_compare():
    fixture = np.load(FIXTURES / 'ops.npz')
    pixels = fixture['input_1'].astype(int)
    assert np.array_equal(fixture['Solarize_m10_s+1_1'], 255 - pixels)  # threshold 256 -> 0: every pixel inverted
    assert np.array_equal(fixture['Solarize_m15_s+1_1'], np.where(pixels < 128, pixels, 255 - pixels))  # 384 -> 128


def cutout_rectangles(outputs: np.ndarray, original: np.ndarray) -> set:
    """(height, width) of the one 128-filled rectangle each output differs from `original` in."""
    sides = set()
    for out in outputs:
        rows, cols = np.nonzero((out != original).any(-1))
        assert (out[rows, cols] == 128).all()
        sides.add((int(np.ptp(rows)) + 1, int(np.ptp(cols)) + 1))
    return sides


@pytest.mark.parametrize('magnitude', [5, 10, 15])
def test_cutout_fills_a_clipped_square_of_128_as_large_as_googles(magnitude):
    fixture = np.load(FIXTURES / 'cutout.npz')
    original = fixture['input']
    google = cutout_rectangles(fixture[f'm{magnitude}'], original)
    transform = tf_rand_augment(only('Cutout', magnitude=magnitude, cutout_const=10.), img_size=32)
    ours = cutout_rectangles(changed_outputs(transform, Image.fromarray(original)), original)
    side = 2 * int(magnitude / 10 * 10)
    assert max(max(s) for s in google) == max(max(s) for s in ours) == side
    assert all(h <= side and w <= side for h, w in google | ours)


def mixup_statistics(settings, trials: int, batch: int, classes: int, size: int):
    """GoogleMixup on the fixture's batch (image i constant i + 1): targets, own share of each image, mode."""
    mixup_alpha, cutmix_alpha, prob, switch_prob, smoothing = (float(v) for v in settings)
    mixer = GoogleMixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                        label_smoothing=smoothing, num_classes=classes)
    values = torch.arange(1, batch + 1, dtype=torch.float32)
    partner = values.flip(0)
    targets, shares, modes = [], [], []
    np.random.seed(0)
    for _ in range(trials):
        images = values.view(-1, 1, 1, 1).expand(batch, 3, size, size).clone()
        mixed, target = mixer(images, torch.arange(batch) % classes)
        flat = mixed[:, 0].reshape(batch, -1)
        own, other = flat == values[:, None], flat == partner[:, None]
        if (own | other).all():
            shares.append(own.float().mean(1))
            modes.append(0 if own.all() else 2)
        else:
            shares.append((flat[:, 0] - partner) / (values - partner))
            modes.append(1)
        targets.append(target)
    return torch.stack(targets).numpy(), torch.stack(shares).numpy(), np.array(modes)


@pytest.fixture(scope='module')
def mixup_runs():
    google = np.load(FIXTURES / 'mixup.npz')
    trials, batch, classes = google['targets'].shape
    ours = mixup_statistics(google['settings'], trials, batch, classes, size=16)
    return (google['targets'], google['own_share'], google['mode']), ours, google['settings'][-1]


def test_google_mixup_decides_per_batch_as_often_as_googles_code(mixup_runs):
    (_, _, google_mode), (_, _, our_mode), _ = mixup_runs
    for mode in (0, 1, 2):  # none, mixup, cutmix: prob 0.5, switch 0.5 -> about 1/2, 1/4, 1/4
        assert abs((google_mode == mode).mean() - (our_mode == mode).mean()) < 0.1


def test_google_mixup_draws_lambda_per_sample_and_pairs_with_the_reversed_batch(mixup_runs):
    for targets, share, mode in mixup_runs[:2]:
        mixup = share[mode == 1]
        assert (mixup.std(1) > 0.05).mean() > 0.9  # one lambda per image, not one per batch
        batch = targets.shape[1]
        for i in range(batch):  # the only other label with weight is the mirror image's
            others = np.delete(targets[mode != 0][:, i], [i, batch - 1 - i], axis=1)
            assert np.allclose(others, others.min())


def test_google_mixup_label_weights_follow_googles_formula_and_match_its_lambda_distribution(mixup_runs):
    smoothing = mixup_runs[2]
    weights = {}
    for name, (targets, share, mode) in zip(('google', 'ours'), mixup_runs[:2]):
        batch, classes = targets.shape[1:]
        off, on = smoothing / classes, 1 - smoothing + smoothing / classes
        own = targets[:, np.arange(batch), np.arange(batch) % classes]
        lam = (own - off) / (on - off)
        assert np.allclose(lam[mode == 0], 1)  # not mixed: smoothed labels only
        assert np.allclose(lam[mode == 1], share[mode == 1], atol=1e-5)  # mixup: the pixels' own weight
        cut_lam, cut_share = lam[mode == 2], share[mode == 2]
        side = np.sqrt(np.clip(1 - cut_lam, 0, 1) * 16 * 16)
        assert np.allclose(side, np.round(side), atol=1e-3)  # 1 - side^2 / (H W), side = int(sqrt(1 - lam) H)
        assert (cut_share >= cut_lam - 1e-6).all()  # the label ignores the part of the box clipped at the border
        weights[name] = np.sort(lam[mode == 1].ravel())
    quantiles = np.linspace(0.1, 0.9, 9)
    assert np.abs(np.quantile(weights['google'], quantiles) - np.quantile(weights['ours'], quantiles)).max() < 0.1


def test_the_google_recipes_mix_the_google_way_and_the_timm_variants_per_batch():
    from mnv_train import recipe as recipes
    from mnv_train.data import BatchAugment
    for name, kind in (('mnv4_hybrid_large_tf', GoogleMixup), ('mnv4_hybrid_large', None)):
        recipe = recipes.load(name)
        mixup = BatchAugment(recipe.aug, 10, 0.1, torch.device('cpu')).mixup
        assert isinstance(mixup, kind) if kind else (type(mixup).__name__, mixup.mode) == ('Mixup', 'batch')


def timm_rand_augment(string: str):
    return rand_augment_transform(string, dict(translate_const=100, img_mean=(124, 116, 104)))  # timm fills it in


def test_timm_randaugment_past_magnitude_10_warns_in_one_line_with_the_op_and_its_pixels(capsys):
    augment.warn_beyond_timm_range([timm_rand_augment('rand-m15-mmax15-n2-mstd0-p1.0')], 384)
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    assert 'magnitude 15 (> 10): TranslateXRel reaches 259 px at 384 px' in err
    augment.warn_beyond_timm_range([timm_rand_augment('rand-m9-inc1-mstd1.0')], 384)
    augment.warn_beyond_timm_range([timm_rand_augment('rand-m15-n2')], 384)  # timm clamps this to 10
    assert capsys.readouterr().err == ''


def test_a_ramped_run_warns_once_at_its_full_size_not_once_per_train_size(write_recipe, tmp_path, capsys,
                                                                          monkeypatch):
    monkeypatch.setattr(logs, '_main', True)
    recipe = recipes.load(str(write_recipe(merge(RAMP, {'aug': {'auto_augment': 'rand-m15-mmax15-n2-mstd0-p1.0'}}))))
    build_run(recipe, distributed.init('cpu'), tmp_path / 'run')  # builds a transform at 16, 24 and 32 px
    warnings = [line for line in capsys.readouterr().err.splitlines() if '(> 10)' in line]
    assert len(warnings) == 1 and 'TranslateXRel reaches 22 px at 32 px' in warnings[0], warnings


def test_the_largest_effects_come_from_timms_level_functions_and_leave_the_random_stream_alone():
    random.seed(3)
    expected = random.random()
    random.seed(3)
    effects = {e.name: e for e in augment.rand_augment_effects(timm_rand_augment('rand-m9-mstd0.5'), 200)}
    assert random.random() == expected
    assert effects['TranslateXRel'].text() == '90 px'  # 0.45 x 200 at the clamp 10: noise can reach it
    assert effects['Rotate'].text() == '30 deg' and effects['ShearX'].text() == '16.7 deg'  # atan(0.3)
    assert effects['Rotate'].chance == pytest.approx(1 - (1 - 0.5 / 15) ** 2)


def test_tfs_bilinear_resize_is_torchs_without_antialias_and_pils_bilinear_is_not():
    fixture = np.load(FIXTURES / 'resize.npz')
    pixels = torch.tensor(fixture['input'], dtype=torch.float32).permute(2, 0, 1)[None]
    for size in (13, 20, 48):
        google = fixture[f'to_{size}']
        ours = torch.nn.functional.interpolate(pixels, size=(size, size), mode='bilinear', align_corners=False,
                                               antialias=False)[0].permute(1, 2, 0).numpy()
        assert np.abs(ours - google).max() < 1e-3
        pil = np.asarray(Image.fromarray(fixture['input']).resize((size, size), Image.Resampling.BILINEAR))
        assert np.abs(pil - google).max() > (5 if size < 32 else 0.5)  # PIL antialiases when it shrinks


def test_google_mixup_with_timms_cutmix_minmax_is_a_user_error_naming_the_key():
    with pytest.raises(UserError, match=r'aug\.cutmix_minmax: .*set cutmix_minmax to null'):
        GoogleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=[0.2, 0.8], num_classes=10)


def google_cutmix(batch: int, seed: int = 0):
    """GoogleMixup, always cutmix, on `batch` random 3 x 12 x 20 images: (input, output, label weights)."""
    mixer = GoogleMixup(mixup_alpha=0., cutmix_alpha=1., prob=1., label_smoothing=0., num_classes=batch)
    images = torch.randn(batch, 3, 12, 20, generator=torch.Generator().manual_seed(seed))
    np.random.seed(seed)
    mixed, targets = mixer(images.clone(), torch.arange(batch))
    return images, mixed, targets.diagonal()


def test_google_cutmix_pastes_the_reversed_batchs_box_around_a_centre_drawn_per_sample():
    images, mixed, weights = google_cutmix(batch=16)
    np.random.seed(0)  # the same draws, in Google's order: mix or not, lambda per sample, then y, x per sample
    assert np.random.rand() < 1
    lam = np.random.beta(1., 1., 16).astype(np.float32)
    expected = images.clone()
    for i, side in enumerate(np.sqrt(1 - lam) * 12):
        half, y, x = int(side) // 2, np.random.randint(12), np.random.randint(20)
        box = (slice(None), slice(max(0, y - half), y + half), slice(max(0, x - half), x + half))
        expected[i][box] = images[15 - i][box]
        assert weights[i] == np.float32(1 - int(side) ** 2 / (12 * 20))
    assert torch.equal(mixed, expected)


def test_google_cutmix_runs_as_many_tensor_ops_for_a_large_batch_as_for_a_small_one():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))
    counts = []
    for batch in (4, 64):  # a Python loop over the batch runs a few ops per image
        with CountOps() as ops:
            google_cutmix(batch)
        counts.append(ops.count)
    assert counts[0] == counts[1]
