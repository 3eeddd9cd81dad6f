"""PIL-level augmentation: a guard that keeps timm's RandAugment alive on Pillow 13, and Google's RandAugment
(TF Model Garden, official/vision/ops/augment.py) as a PIL transform for the `*_tf` recipes.

The `*_tf` recipes reproduce Google's MobileNetV4 configs, and Google's RandAugment is not timm's `rand-mX`, so no
timm string reproduces it. Google translates by `magnitude / 10 * translate_const` pixels, not by a fraction of
the image: 15 px at M15 with translate_const 10, where timm's rand-m15-mmax15 moves a 384 px image by up to
259 px. Google fills uncovered pixels with 128, not the image mean. It chooses among its ops plus an identity
branch, and applies the chosen op with `prob_to_apply`, not 0.5. It does not cap the magnitude at 10, and it
scales SolarizeAdd, Contrast and Cutout its own way. This module builds Google's version from timm's AugmentOp and
RandAugment. It swaps in its own op function or level function only where timm's differs from Google's.

Level L = magnitude, not capped at 10. When magnitude_std > 0, L = clip(magnitude + N(0, 1), 0, 10). Google's std
only switches the noise on, because its noise always has std 1. Per op (geometric ops use nearest-neighbour
sampling and fill with 128, as Google does):
  AutoContrast, Equalize, Invert  timm's PIL ops; Google's ops are TF ports of the same PIL code. Same output.
  Rotate        +-30 * L/10 degrees, timm's op. Differences: PIL samples at pixel centres and TF at integer
                coordinates, so a few pixels can land one pixel apart.
  ShearX/Y      +-0.3 * L/10, timm's op with Google's matrix. Same sampling-grid difference as Rotate (half a
                pixel times the shear factor).
  TranslateX/Y  +-translate_const * L/10 px, timm's absolute-pixel op. Whole-pixel shifts match exactly.
                PIL rounds fractional shifts in its own way.
  Posterize     keeps int(4 * L/10) bits, timm's 'Posterize' level (not 'PosterizeIncreasing'). Uses
                posterize_zero_safe, because Pillow 13 refuses 0 bits. 0 bits (L < 2.5) gives black, a
                full 8-bit shift; TF calls a shift by the bit width implementation-defined, so Google's own
                output there is uncertain.
  Solarize      inverts pixels >= int(256 * L/10), timm's op (its cap at 256 inverts nothing either). Does
                nothing at L >= 10.
  Color, Brightness, Sharpness
                blend factor 1.8 * L/10 + 0.1 (2.8 at M15), timm's fixed-sign ops (not '*Increasing'). Color
                uses PIL's integer grey weights and Sharpness's PIL filter rounds where TF truncates, so values
                can differ by one grey level.
  Contrast      hand-written. Google blends towards a constant grey of min(255, pixels / 256): its 'mean' is
                the sum of a 256-bin histogram divided by 256, i.e. the pixel count / 256. That is 196 at 224 px
                and 255 from 256 px on. PIL and timm use the image's mean grey. Google's version is reproduced
                on purpose.
  Cutout        hand-written; timm has none. A square of side 2 * int(cutout_const * L/10) filled with 128,
                centred on a uniformly drawn pixel and clipped at the borders.
  SolarizeAdd   timm's op (adds to pixels < 128, clips at 255) with Google's level int(110 * L/10). timm's
                level caps at 128; Google's reaches 165 at M15.
  Identity      hand-written. Google's extra branch of the op choice; it cannot be excluded.
Each layer picks one op uniformly, with replacement, from the ops left after exclude_ops plus Identity (timm's
RandAugment, numpy's global RNG). Google's `tf.random.uniform(maxval=len(ops) + 1)` does the same. The op runs with
probability prob_to_apply, or always when that is None. Google's RandAugment also draws a per-op probability in
[0.2, 0.8] but then discards it, so this module has no equivalent. Signs, gates, noise and Cutout centres come
from `random`. Input must be RGB, like Google's.
Not reproduced: Google's classification parser (dataloaders/classification_input.py) never passes magnitude_std
to RandAugment, so in Google's own ImageNet runs it acts as 0. All MNV4 configs set 0 anyway.
"""
from __future__ import annotations

import difflib
import random
from typing import Callable

from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data.auto_augment import AugmentOp, RandAugment

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
_FILL = (128, 128, 128)  # Google's `replace` for every pixel an op uncovers
_MAX_LEVEL = 10.  # Google's _MAX_LEVEL: an op's range is reached at magnitude 10


def _identity(img, **_):
    return img


def _contrast(img, factor, **_):
    """Google's blend towards min(255, pixel count / 256), which is what its histogram 'mean' computes."""
    grey = int(min(255., img.width * img.height / 256.))
    return Image.blend(Image.new(img.mode, img.size, (grey,) * len(img.getbands())), img, factor)


def _cutout(img, pad, fillcolor, **_):
    """Google's cutout: a (2 * pad) px square of fill centred on a uniformly drawn pixel, clipped at the borders."""
    x, y = random.randrange(img.width), random.randrange(img.height)
    img = img.copy()
    img.paste(fillcolor, (max(0, x - pad), max(0, y - pad), min(img.width, x + pad), min(img.height, y + pad)))
    return img


def _cutout_level_to_arg(level, hparams):
    return int(level / _MAX_LEVEL * hparams['cutout_const']),


def _solarize_add_level_to_arg(level, _hparams):
    return int(level / _MAX_LEVEL * 110),  # timm's caps this at 128; Google's does not


# Google's ops in Google's order -> (timm AugmentOp to start from, op function, level-to-arg); None keeps timm's.
# Cutout and Identity have no timm op: they start from Invert, which takes no argument, and replace its function.
_OPS = {
    'AutoContrast': ('AutoContrast', None, None),
    'Equalize': ('Equalize', None, None),
    'Invert': ('Invert', None, None),
    'Rotate': ('Rotate', None, None),
    'Posterize': ('Posterize', posterize_zero_safe, None),
    'Solarize': ('Solarize', None, None),
    'Color': ('Color', None, None),
    'Contrast': ('Contrast', _contrast, None),
    'Brightness': ('Brightness', None, None),
    'Sharpness': ('Sharpness', None, None),
    'ShearX': ('ShearX', None, None),
    'ShearY': ('ShearY', None, None),
    'TranslateX': ('TranslateX', None, None),
    'TranslateY': ('TranslateY', None, None),
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
