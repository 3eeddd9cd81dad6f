"""Runs Google's own augment code (TF Model Garden, official/vision/ops/augment.py) and writes what it outputs to
tests/fixtures/google_augment/, so that the tests compare mnv_train/augment.py with Google's behaviour, not with a
reading of Google's source. The project never depends on TensorFlow: only this script does, in its own venv.

Set-up (tf-models-official's full dependency list is large; augment.py imports only these):
    python -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu matplotlib
    /tmp/tfvenv/bin/pip install --no-deps tf-models-official tf-keras pyyaml gin-config tensorflow-datasets etils \
        scipy immutabledict pycocotools pillow opencv-python-headless toml
    /tmp/tfvenv/bin/python tools/google_augment_fixtures.py

Writes (about 0.4 MB in all):
  ops.npz     the input images and, per op, magnitude (5, 10, 15) and sign, Google's output for each image;
              'error:' entries say where Google's op raised instead;
  cutout.npz  Cutout outputs for 10 TF seeds per magnitude (the centre is random);
  mixup.npz   MixupAndCutmix statistics over 400 seeded batches of 8 constant images: the label matrices, the
              share of each image that still comes from itself, and the batch-level mode;
  resize.npz  tf.image.resize bilinear without antialias, down and up;
  versions.txt  the tensorflow and tf-models-official versions.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import tensorflow as tf
from official.vision.ops import augment

OUT = Path(__file__).resolve().parent.parent / 'tests' / 'fixtures' / 'google_augment'
MAGNITUDES = (5, 10, 15)
TRANSLATE_CONST, CUTOUT_CONST = 10., 10.  # MNV4 configs' translate_const; a cutout that fits a 32 px image
SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}  # Google negates these with chance 0.5
OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast', 'Brightness',
       'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'SolarizeAdd']
REPLACE = [128] * 3  # what Google's RandAugment passes as `replace`
MIX_BATCH, MIX_CLASSES, MIX_SIZE, MIX_TRIALS = 8, 10, 16, 400


def images() -> list[np.ndarray]:
    """Three fixed images: a noisy gradient, uniform noise, and flat rectangles on a non-square canvas."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:32, :32]
    gradient = np.stack([x * 8, y * 8, (x + y) * 4], -1) + rng.integers(-20, 20, (32, 32, 3))
    noise = rng.integers(0, 256, (32, 32, 3))
    shapes = np.full((28, 36, 3), 30)
    shapes[4:14, 6:20] = (220, 40, 90)
    shapes[16:26, 18:33] = (60, 200, 240)
    return [np.clip(a, 0, 255).astype(np.uint8) for a in (gradient, noise, shapes)]


def op_output(name: str, image: np.ndarray, magnitude: float, sign: int):
    """Google's op at Google's level-to-arg for `magnitude`, with the random sign fixed to `sign`."""
    args = augment.level_to_arg(CUTOUT_CONST, TRANSLATE_CONST)[name](float(magnitude))
    if name in SIGNED:
        args = (sign * abs(float(args[0])),)
    if name in augment.REPLACE_FUNCS:
        args = args + (REPLACE,)
    try:
        return np.asarray(augment.NAME_TO_FUNC[name](tf.constant(image), *args))
    except Exception as error:  # recorded: what Google's op does with this magnitude is the point of the fixture
        return f'error: {type(error).__name__}: {str(error).splitlines()[0]}'


def write_ops():
    inputs, arrays = images(), {}
    for index, image in enumerate(inputs):
        arrays[f'input_{index}'] = image
        for name in OPS:
            for magnitude in MAGNITUDES:
                for sign in ((1, -1) if name in SIGNED else (1,)):
                    out = op_output(name, image, magnitude, sign)
                    arrays[f'{name}_m{magnitude}_s{sign:+d}_{index}'] = np.asarray(out)
    # The full RandAugment path once, to show that it calls the same functions with the same fill
    tf.random.set_seed(0)
    only_translate = augment.RandAugment(num_layers=1, magnitude=15, translate_const=TRANSLATE_CONST,
                                         exclude_ops=[op for op in OPS + ['Cutout'] if op != 'TranslateX'])
    outputs = [np.asarray(only_translate.distort(tf.constant(inputs[0]))) for _ in range(8)]
    arrays['randaugment_translatex_m15_0'] = np.stack(outputs)
    np.savez_compressed(OUT / 'ops.npz', **arrays)


def write_cutout():
    image, arrays = images()[0], {}
    for magnitude in MAGNITUDES:
        outputs = []
        for seed in range(10):
            tf.random.set_seed(seed)
            pad = augment.level_to_arg(CUTOUT_CONST, TRANSLATE_CONST)['Cutout'](float(magnitude))[0]
            outputs.append(np.asarray(augment.cutout(tf.constant(image), pad, REPLACE)))
        arrays[f'm{magnitude}'] = np.stack(outputs)
    np.savez_compressed(OUT / 'cutout.npz', input=image, **arrays)


def write_mixup():
    """Image i is constant i + 1, so what each output pixel is made of can be read off its value."""
    values = np.arange(1, MIX_BATCH + 1, dtype=np.float32)
    batch = tf.constant(np.broadcast_to(values[:, None, None, None], (MIX_BATCH, MIX_SIZE, MIX_SIZE, 3)).copy())
    labels = tf.constant(np.arange(MIX_BATCH) % MIX_CLASSES)
    mixer = augment.MixupAndCutmix(num_classes=MIX_CLASSES, mixup_alpha=.8, cutmix_alpha=1., prob=.5,
                                   switch_prob=.5, label_smoothing=.1)
    targets, own_share, mode = [], [], []
    partner = values[::-1]
    for seed in range(MIX_TRIALS):
        tf.random.set_seed(seed)
        mixed, target = mixer(batch, labels)
        mixed = np.asarray(mixed)[..., 0].reshape(MIX_BATCH, -1)
        is_own, is_partner = mixed == values[:, None], mixed == partner[:, None]
        if (is_own | is_partner).all():  # cutmix, or no mixing at all
            own_share.append(is_own.mean(1))
            mode.append(0 if is_own.all() else 2)
        else:  # mixup: v = lam * own + (1 - lam) * partner
            own_share.append((mixed[:, 0] - partner) / (values - partner))
            mode.append(1)
        targets.append(np.asarray(target))
    np.savez_compressed(OUT / 'mixup.npz', targets=np.stack(targets).astype(np.float32),
                        own_share=np.stack(own_share).astype(np.float32), mode=np.array(mode, np.int8),
                        labels=np.asarray(labels), settings=np.array([.8, 1., .5, .5, .1], np.float32))


def write_resize():
    image = images()[0]
    arrays = {f'to_{size}': np.asarray(tf.image.resize(tf.constant(image, tf.float32), (size, size), 'bilinear',
                                                       antialias=False)) for size in (13, 20, 48)}
    np.savez_compressed(OUT / 'resize.npz', input=image, **arrays)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    write_ops()
    write_cutout()
    write_mixup()
    write_resize()
    versions = {name: importlib.metadata.version(name) for name in ('tensorflow-cpu', 'tf-models-official')}
    (OUT / 'versions.txt').write_text(''.join(f'{name} {version}\n' for name, version in versions.items()))
    print(f'wrote {OUT}: ' + ', '.join(f'{p.name} {p.stat().st_size // 1024} KiB' for p in sorted(OUT.iterdir())))


if __name__ == '__main__':
    main()
