"""PIL-level augmentation: a guard that keeps timm's RandAugment alive on Pillow 13; Google's RandAugment and
MixupAndCutmix (TF Model Garden, official/vision/ops/augment.py) for the `*_tf` recipes, as Google's code actually
runs them; and the largest effect of each RandAugment op, for the dry run's preview and a warning.

The `*_tf` recipes reproduce Google's MobileNetV4 configs, and Google's RandAugment is not timm's `rand-mX`.
tools/google_augment_fixtures.py ran Google's code (tensorflow-cpu 2.21.0, tf-models-official 2.20.0) and
tests/test_augment.py compares every op below with its output at magnitudes 5, 10 and 15: all equal, pixel for
pixel. Several behaviours differ from what Google's source seems to intend; this module follows what it does:
  Translate/Rotate/Shear  Google wraps the image in an alpha channel so that uncovered pixels become 128, but its
                `transform` defaults to fill_mode 'reflect', so the alpha is never 0 and uncovered pixels are the
                image mirrored about its edge pixel (d c b a | a b c d). Nearest-neighbour sampling, rounding half
                away from zero, in float32. Translate is +-translate_const * L/10 px, Rotate +-30 * L/10 degrees
                about the image centre, Shear +-0.3 * L/10; the sign is random.
  Solarize      threshold int(256 * L/10) compared with uint8 pixels, so it wraps: M10 -> 0 inverts every pixel,
                M15 -> 384 -> 128 inverts pixels >= 128. No error and no no-op.
  Contrast      tf.image.adjust_contrast: each channel moves away from its own mean by the factor, in [0, 1]
                floats, converted back as x 255.5 truncated (not the histogram grey of older Model Garden code).
  Color, Sharpness, AutoContrast  Google's float32 arithmetic truncated to uint8 (PIL rounds).
  Posterize     keeps int(4 * L/10) bits, timm's 'Posterize' op. posterize_zero_safe handles 0 bits (L < 2.5,
                not among the fixtures), which Pillow 13 refuses; black there.
  Brightness, Equalize, Invert  timm's PIL ops give Google's output exactly.
  SolarizeAdd   timm's op with Google's level int(110 * L/10) (timm's caps at 128; Google's reaches 165).
  Cutout        a (2 * int(cutout_const * L/10)) px square of 128 centred on a uniform pixel, clipped.
  Identity      Google's extra branch of the op choice; it cannot be excluded.
Level L = magnitude, not capped at 10; with magnitude_std > 0, L = clip(magnitude + N(0, 1), 0, 10) (Google's
noise always has std 1). Each layer picks one op uniformly, with replacement, from the ops left after exclude_ops
plus Identity (timm's RandAugment, numpy's global RNG), and runs it with probability prob_to_apply, or always
when that is None. Google also draws a per-op probability in [0.2, 0.8] and discards it. Input must be RGB.
Not reproduced: Google's classification parser never passes magnitude_std to RandAugment (all MNV4 configs set 0),
and TF's bilinear resize without antialiasing (the crop is still PIL's, see docs/recipes-reference.md 4.8).
"""
from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import AugmentOp, RandAugment
from timm.data.mixup import Mixup

from . import logs
from .errors import UserError


def posterize_zero_safe(img, bits_to_keep, **kwargs):
    """Pillow >= 13 refuses bits=0, which timm's RandAugment asks for at full magnitude; older Pillow gave black."""
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep)


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    timm_auto_augment.NAME_TO_OP[_name] = posterize_zero_safe

_KEY = 'aug.tf_randaugment'
_FILL = (128, 128, 128)  # Google's `replace`: only Cutout uses it (see the module docstring)
_MAX_LEVEL = 10.  # Google's _MAX_LEVEL: an op's range is reached at magnitude 10


def _identity(img, **_):
    return img


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _to_image(values: np.ndarray) -> Image.Image:
    """TF's float -> uint8 cast: clip, then truncate."""
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def _reflect(coords: np.ndarray, size: int) -> np.ndarray:
    """TF's FILL_REFLECT ((d c b a | a b c d | d c b a), the edge pixel repeated), then its clamp to the image."""
    period = 2 * size
    low = coords + period * np.trunc(-coords / period)
    low = np.where(low < -size, low + period, -low - 1)
    high = coords - period * np.trunc(coords / period)
    high = np.where(high >= size, period - high - 1, high)
    return np.clip(np.where(coords < 0, low, np.where(coords > size - 1, high, coords)), 0, size - 1)


def _project(img, matrix, **_):
    """ImageProjectiveTransformV3 as Google's `transform` calls it: output (x, y) reads input (a0 x + a1 y + a2,
    b0 x + b1 y + b2), nearest neighbour (round half away from zero) in float32, fill mode reflect."""
    pixels = np.asarray(img)
    height, width = pixels.shape[:2]
    y, x = np.mgrid[:height, :width].astype(np.float32)
    a0, a1, a2, b0, b1, b2 = np.asarray(matrix, np.float32)
    source_x = np.floor(_reflect(a0 * x + a1 * y + a2, width) + np.float32(.5)).astype(np.intp)
    source_y = np.floor(_reflect(b0 * x + b1 * y + b2, height) + np.float32(.5)).astype(np.intp)
    return Image.fromarray(pixels[source_y, source_x])


def _rotate(img, degrees, **_):
    angle = np.float32(degrees * math.pi / 180.)
    cos, sin = np.cos(angle), np.sin(angle)
    width, height = np.float32(img.width - 1), np.float32(img.height - 1)
    x_offset = (width - (cos * width - sin * height)) / np.float32(2)
    y_offset = (height - (sin * width + cos * height)) / np.float32(2)
    return _project(img, (cos, -sin, x_offset, sin, cos, y_offset))


def _shear_x(img, factor, **_):
    return _project(img, (1, factor, 0, 0, 1, 0))


def _shear_y(img, factor, **_):
    return _project(img, (1, 0, 0, factor, 1, 0))


def _translate_x(img, pixels, **_):
    return _project(img, (1, 0, pixels, 0, 1, 0))


def _translate_y(img, pixels, **_):
    return _project(img, (1, 0, 0, 0, 1, pixels))


def _blend(base: np.ndarray, img, factor: float) -> Image.Image:
    """Google's blend: float32 base + factor * (image - base), clipped and truncated to uint8."""
    return _to_image(base + np.float32(factor) * (_pixels(img) - base))


def _color(img, factor, **_):
    """Blend with tf.image.rgb_to_grayscale: float weights, truncated to uint8 (PIL rounds integer weights)."""
    weights = np.array([0.2989, 0.5870, 0.1140], np.float32)
    grey = np.trunc(_pixels(img) / np.float32(255) @ weights * np.float32(255.5))[..., None]
    return _blend(np.broadcast_to(grey, (img.height, img.width, 3)), img, factor)


def _sharpness(img, factor, **_):
    """Blend with TF's 3x3 smoothing (centre 5, rest 1, / 13) truncated to uint8; the 1 px border keeps the image."""
    pixels = _pixels(img)
    smooth = pixels.copy()
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13)
    window = sum(pixels[dy:dy + img.height - 2, dx:dx + img.width - 2] * kernel[dy, dx]
                 for dy in range(3) for dx in range(3))
    smooth[1:-1, 1:-1] = np.trunc(np.clip(window, 0, 255))
    return _blend(smooth, img, factor)


def _contrast(img, factor, **_):
    """tf.image.adjust_contrast: each channel moves away from its own mean, in [0, 1] floats, x 255.5 truncated."""
    pixels = _pixels(img) / np.float32(255)
    mean = pixels.mean(axis=(0, 1), dtype=np.float32)
    return _to_image(((pixels - mean) * np.float32(factor) + mean) * np.float32(255.5))


def _auto_contrast(img, **_):
    """Google's autocontrast: each channel stretched to 0-255 in float32 and truncated (PIL's lookup table rounds)."""
    pixels = _pixels(img)
    low, high = pixels.min(axis=(0, 1)), pixels.max(axis=(0, 1))
    scale = np.float32(255) / np.where(high > low, high - low, 1)
    return _to_image(np.where(high > low, pixels * scale - low * scale, pixels))


def _cutout(img, pad, fillcolor, **_):
    """Google's cutout: a (2 * pad) px square of fill centred on a uniformly drawn pixel, clipped at the borders."""
    x, y = random.randrange(img.width), random.randrange(img.height)
    img = img.copy()
    img.paste(fillcolor, (max(0, x - pad), max(0, y - pad), min(img.width, x + pad), min(img.height, y + pad)))
    return img


def _cutout_level_to_arg(level, hparams):
    return int(level / _MAX_LEVEL * hparams['cutout_const']),


def _solarize_level_to_arg(level, _hparams):
    return int(level / _MAX_LEVEL * 256) % 256,  # Google compares uint8 pixels with a uint8 threshold: it wraps


def _solarize_add_level_to_arg(level, _hparams):
    return int(level / _MAX_LEVEL * 110),  # timm's caps this at 128; Google's does not


# Google's ops in Google's order -> (timm AugmentOp to start from, op function, level-to-arg); None keeps timm's.
# Cutout and Identity have no timm op: they start from Invert, which takes no argument, and replace its function.
_OPS = {
    'AutoContrast': ('AutoContrast', _auto_contrast, None),
    'Equalize': ('Equalize', None, None),
    'Invert': ('Invert', None, None),
    'Rotate': ('Rotate', _rotate, None),
    'Posterize': ('Posterize', posterize_zero_safe, None),
    'Solarize': ('Solarize', None, _solarize_level_to_arg),
    'Color': ('Color', _color, None),
    'Contrast': ('Contrast', _contrast, None),
    'Brightness': ('Brightness', None, None),
    'Sharpness': ('Sharpness', _sharpness, None),
    'ShearX': ('ShearX', _shear_x, None),
    'ShearY': ('ShearY', _shear_y, None),
    'TranslateX': ('TranslateX', _translate_x, None),
    'TranslateY': ('TranslateY', _translate_y, None),
    'Cutout': ('Invert', _cutout, _cutout_level_to_arg),
    'SolarizeAdd': ('SolarizeAdd', None, _solarize_add_level_to_arg),
}
_IDENTITY = ('Invert', _identity, None)


def tf_rand_augment(cfg, img_size: int) -> Callable[[Image.Image], Image.Image]:
    """Google's RandAugment for `cfg` (TFRandAugmentConfig); img_size only catches a translate or cutout that
    would cover the whole image."""
    _check_exclude_ops(cfg.exclude_ops)
    names = [name for name in _OPS if name not in cfg.exclude_ops]
    _check_fits_image(cfg, names, img_size)
    noisy = cfg.magnitude_std > 0
    hparams = dict(
        translate_const=cfg.translate_const, cutout_const=cfg.cutout_const, img_mean=_FILL,
        interpolation=Image.Resampling.NEAREST,
        magnitude_std=1. if noisy else 0.,  # Google adds N(0, 1) whatever magnitude_std is ...
        magnitude_max=_MAX_LEVEL if noisy else cfg.magnitude,  # ... then clips to 10; without noise nothing clips
    )
    prob = 1. if cfg.prob_to_apply is None else cfg.prob_to_apply
    ops = [_augment_op(name, prob, cfg.magnitude, hparams) for name in names + ['Identity']]
    return RandAugment(ops, num_layers=cfg.num_layers)


def _augment_op(name: str, prob: float, magnitude: float, hparams: dict) -> AugmentOp:
    """timm's AugmentOp (probability gate, magnitude noise and clamp) running Google's op `name`."""
    timm_name, aug_fn, level_fn = _OPS.get(name, _IDENTITY)
    op = AugmentOp(timm_name, prob=prob, magnitude=magnitude, hparams=hparams)
    op.name = name
    op.aug_fn = aug_fn or op.aug_fn
    op.level_fn = level_fn or op.level_fn
    return op


def _check_exclude_ops(exclude_ops: list[str]):
    for name in exclude_ops:
        if name == 'Identity':
            raise UserError(f"{_KEY}.exclude_ops: 'Identity' cannot be excluded: Google's RandAugment always keeps "
                            f'its identity branch')
        if name not in _OPS:
            close = difflib.get_close_matches(str(name), list(_OPS), n=1, cutoff=0.5)
            hint = f'did you mean {close[0]!r}? ' if close else ''
            raise UserError(f'{_KEY}.exclude_ops: {name!r} is not a Google RandAugment op '
                            f'({hint}ops: {", ".join(_OPS)})')


def _check_fits_image(cfg, names: list[str], img_size: int):
    """A translate or cutout as large as the image leaves nothing but fill, a unit mistake rather than augmentation."""
    level = min(cfg.magnitude, _MAX_LEVEL) if cfg.magnitude_std > 0 else cfg.magnitude
    for key, ops in (('translate_const', ('TranslateX', 'TranslateY')), ('cutout_const', ('Cutout',))):
        pixels = level / _MAX_LEVEL * getattr(cfg, key)
        if pixels >= img_size and any(op in names for op in ops):
            raise UserError(f'{_KEY}.{key}: {getattr(cfg, key):g} at magnitude {cfg.magnitude:g} reaches {pixels:g} '
                            f'px, the whole {img_size} px image; it is in pixels, not a fraction '
                            f"(Google's MNV4 configs use 10-40)")


@dataclass
class OpEffect:
    """One RandAugment op at its largest level: px for translates and cutout, degrees for rotate and shear, the
    level itself for the rest; `chance` that an image gets it."""
    name: str
    level: float
    value: float
    unit: str
    chance: float

    def text(self) -> str:
        return {'px': f'{self.value:.0f} px', 'deg': f'{self.value:.3g} deg'}.get(self.unit, f'level {self.level:g}')


def rand_augment_effects(transform: RandAugment, img_size: int) -> list[OpEffect]:
    """Every op of a timm RandAugment (timm's own or Google's here) at the largest level timm's AugmentOp can draw,
    through the op's own level-to-arg function, at a square train size of img_size."""
    state = random.getstate()  # level functions draw a random sign; the caller's stream stays as it was
    try:
        return [_effect(op, _largest_level(op), img_size, _chance(transform, index))
                for index, op in enumerate(transform.ops)]
    finally:
        random.setstate(state)


def _largest_level(op: AugmentOp) -> float:
    """AugmentOp.__call__'s range: noise (std > 0) can reach the clamp, uniform noise (std inf) only the magnitude."""
    bound = op.magnitude_max or timm_auto_augment._LEVEL_DENOM
    top = bound if 0 < op.magnitude_std < float('inf') else op.magnitude
    return max(0., min(top, bound))


def _effect(op: AugmentOp, level: float, img_size: int, chance: float) -> OpEffect:
    """Geometric ops through their own level-to-arg function (its random sign dropped); the rest by level."""
    if not op.name.startswith(('Translate', 'Rotate', 'Shear', 'Cutout')):
        return OpEffect(op.name, level, level, 'level', chance)
    value = abs(float(op.level_fn(level, op.hparams)[0]))
    if op.name.startswith('Translate'):
        return OpEffect(op.name, level, value * img_size if op.name.endswith('Rel') else value, 'px', chance)
    if op.name.startswith('Shear'):
        return OpEffect(op.name, level, math.degrees(math.atan(value)), 'deg', chance)
    if op.name == 'Cutout':
        return OpEffect(op.name, level, 2 * value, 'px', chance)
    return OpEffect(op.name, level, value, 'deg', chance)


def _chance(transform: RandAugment, index: int) -> float:
    """P(an image gets op `index`): picked in one of num_layers draws (uniform with replacement, or timm's weighted
    draws without replacement), then passing the op's own probability gate."""
    ops, layers, weights = transform.ops, transform.num_layers, transform.choice_weights
    if weights is None:
        return 1 - (1 - ops[index].prob / len(ops)) ** layers

    def missed(left: tuple, draws: int) -> float:
        if draws == 0 or len(left) == 0:
            return 1.
        total = sum(weights[j] for j in left)
        return sum(weights[j] / total * missed(tuple(k for k in left if k != j), draws - 1)
                   for j in left if j != index)

    return (1 - missed(tuple(range(len(ops))), layers)) * ops[index].prob


def warn_beyond_timm_range(transforms: list, img_size: int, key: str = 'aug.auto_augment'):
    """One line when a timm RandAugment among `transforms` can run past magnitude 10, which no known timm recipe
    does, naming the op that moves pixels the furthest and by how much at this train size."""
    effects = [e for t in transforms if isinstance(t, RandAugment) for e in rand_augment_effects(t, img_size)
               if e.level > timm_auto_augment._LEVEL_DENOM]
    if not effects:
        return
    worst = max(effects, key=lambda e: (e.unit == 'px', e.unit == 'deg', e.value))
    logs.warn(f'{key}: timm RandAugment at magnitude {worst.level:g} (> 10): {worst.name} reaches {worst.text()} at '
              f'{img_size} px; timm caps magnitudes at 10 and no known timm recipe goes past it')


def box_mask(centres: np.ndarray, halves: np.ndarray, length: int, device: torch.device) -> torch.Tensor:
    """(samples, length) bools: [centre - half, centre + half) on one axis, clipped to [0, length)."""
    positions = torch.arange(length, device=device)
    low, high = (torch.as_tensor(v, device=device)[:, None] for v in (centres - halves, centres + halves))
    return (positions >= low) & (positions < high)


class GoogleMixup(Mixup):
    """Google's MixupAndCutmix (official/vision/ops/augment.py, as run for tests/fixtures/google_augment): whether to
    mix, and mixup or cutmix, is drawn once per batch; lambda and the cutmix box per sample; each image is paired with
    the reversed batch. The box is [c - side // 2, c + side // 2) around a uniform centre, clipped, with
    side = int(sqrt(1 - lambda) * height) on both axes, and the label weight is 1 - side^2 / (height * width) even
    where the box was clipped. Labels are smoothed, then mixed, which is timm's mixup_target."""

    def __init__(self, **kwargs):
        if kwargs.get('cutmix_minmax') is not None:
            raise UserError("aug.cutmix_minmax: Google's MixupAndCutmix (aug.mixup_mode google) draws the box from "
                            'aug.cutmix only; set cutmix_minmax to null or mixup_mode to batch')
        super().__init__(**{**kwargs, 'mode': 'elem', 'correct_lam': False})

    def _params_per_elem(self, batch_size):
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or np.random.rand() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = np.ones(batch_size, np.float32)
        if self.mixup_enabled and np.random.rand() < self.mix_prob:
            lam = np.random.beta(alpha, alpha, batch_size).astype(np.float32)
        return lam, np.full(batch_size, use_cutmix)

    def _mix_elem(self, x):
        lam, use_cutmix = self._params_per_elem(len(x))
        partner = x.flip(0)
        if use_cutmix[0]:
            height, width = x.shape[-2:]
            sides = (np.sqrt(1 - lam) * height).astype(np.int64)
            centres = np.random.randint([height, width], size=(len(x), 2))  # y, x per sample, drawn in that order
            inside = [box_mask(centres[:, axis], sides // 2, length, x.device)
                      for axis, length in enumerate((height, width))]
            torch.where((inside[0][:, :, None] & inside[1][:, None, :]).unsqueeze(1), partner, x, out=x)
            lam = (1 - sides ** 2 / (height * width)).astype(np.float32)
        elif (lam < 1).any():
            weight = torch.as_tensor(lam, device=x.device, dtype=x.dtype).view(-1, *[1] * (x.ndim - 1))
            x.mul_(weight).add_(partner.mul_(1 - weight))
        return torch.as_tensor(lam, device=x.device, dtype=x.dtype).unsqueeze(1)
