"""--dry-run's picture of what training sees, before GPU-days are spent on it.

plots/augment_preview.png: 32 training images from the run's own data after the recipe's full training transform
and batch mixing, at the train size, each captioned with the RandAugment ops that changed it. Beside it
augment_preview.md: every RandAugment op with its largest effect at the train size and the chance an image gets it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from timm.data.auto_augment import RandAugment

from . import augment, dali_pipeline, data
from .build import Run
from .plots import pyplot, save_figure

PREVIEW_IMAGES = 32  # even, as Mixup needs
COLUMNS = 8
DISPLAY_PX = 192  # per image in the saved figure (8 columns across 16 inches at 100 dpi)
GAP_SHARE = 0.18  # caption room under each image, as a share of the image's side


class _Recorder:
    """An AugmentOp that notes its name when it changed the image (AugmentOp returns its input when its gate says
    no, and Identity returns it too)."""

    def __init__(self, op, log: list):
        self.op, self.log = op, log

    def __call__(self, img):
        out = self.op(img)
        if out is not img:
            self.log.append(self.op.name)
        return out


def find_rand_augment(transform) -> Optional[RandAugment]:
    return next((t for t in getattr(transform, 'transforms', []) if isinstance(t, RandAugment)), None)


def runs_dali(run: Run) -> bool:
    return isinstance(run.train_loader, dali_pipeline.DaliLoader)


def recipe_rand_augment(run: Run) -> Optional[RandAugment]:
    """The host transform's RandAugment; under DALI, which runs the same ops in timm's list and ranges on whole
    batches, the one the host transform would hold."""
    if runs_dali(run):
        norm = data.resolve_normalization(run.recipe.data, run.module)
        return find_rand_augment(data.train_transform(run.recipe.data, run.recipe.aug, norm))
    return find_rand_augment(getattr(run.train_loader.dataset, 'transform', None))


def write_preview(run: Run) -> list[Path]:
    """The table always; the picture where matplotlib is installed. Spends nothing of the run but RNG draws."""
    folder = run.run_dir / 'plots'
    folder.mkdir(parents=True, exist_ok=True)
    rand_augment, note = recipe_rand_augment(run), ramp_note(run.train_sampler.sizes)
    table = folder / 'augment_preview.md'
    table.write_text(effects_table(rand_augment, run.recipe.data.img_size, run.recipe.name, note))
    plt = pyplot()
    if plt is None:
        return [table]
    images, captions = augmented_batch(run, rand_augment)
    title = (f'{run.recipe.name}: what training sees at {images.shape[-1]} px (full transform and batch mixing); '
             f'under each image the RandAugment ops that changed it') + (f'\n({note})' if note else '')
    return [save_figure(draw_mosaic(plt, images, captions, title), folder / 'augment_preview.png'), table]


def ramp_note(sizes: Optional[list[int]]) -> str:
    """What the preview's size is within a progressive-resolution ramp (every epoch's train size; None: no ramp). The
    preview shows data.img_size, the ramp's last size; its earlier sizes crop the same way and RandAugment moves
    pixels by the same share of the image (timm's relative translates, Google's scaled with the size)."""
    if not sizes:
        return ''
    return (f'the last train size: schedule.train_size_ramp trains from {sizes[0]} px, where translates move by the '
            f'same share of the image')


def draw_mosaic(plt, images: torch.Tensor, captions: list[str], title: str):
    """One mosaic drawn once, with a caption under each image: 32 separate axes, or matplotlib resampling a mosaic of
    384 px images, cost seconds. Images are shrunk to the DISPLAY_PX the figure has room for."""
    size = min(images.shape[-1], DISPLAY_PX)
    images = torch.nn.functional.interpolate(images, size=(size, size), mode='bilinear', antialias=True)
    gap, rows = max(2, round(size * GAP_SHARE)), -(-len(images) // COLUMNS)
    mosaic = torch.ones(3, rows * (size + gap), COLUMNS * (size + gap))
    fig, ax = plt.subplots(figsize=(2 * COLUMNS, 2.3 * rows))
    for index, caption in enumerate(captions):
        top, left = index // COLUMNS * (size + gap), index % COLUMNS * (size + gap)
        mosaic[:, top:top + size, left:left + size] = images[index]
        ax.text(left + size / 2, top + size + size / 50, caption, ha='center', va='top', fontsize=7)
    ax.imshow(mosaic.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation='nearest')
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    return fig


def augmented_batch(run: Run, rand_augment: Optional[RandAugment]):
    """PREVIEW_IMAGES training images as NCHW floats in [0, 1] on the CPU, and a caption per image."""
    (images, targets, _), captions = prepared_batch(run, PREVIEW_IMAGES, rand_augment)
    images, targets = run.augment(images, targets, epoch=0)
    if targets.ndim == 2:  # mixed: the image's own label keeps this weight
        captions = [f'{caption}\nlabel weight {weight:.2f}' for caption, weight in zip(captions, targets.max(1)[0])]
    pixels = images.float() * run.train_input.std + run.train_input.mean
    return (pixels / 255).clamp(0, 1).cpu(), captions


def prepared_batch(run: Run, size: int, rand_augment: Optional[RandAugment] = None):
    """`size` training samples prepared as the loader would, in this process, on the device, and a caption per
    sample naming the RandAugment ops that changed it (with `rand_augment`). DALI augments whole batches in its own
    graph: at most one batch, the ops not known. The dry run's probes and the preview both take their batch here."""
    if runs_dali(run):
        images, labels, skipped = run.train_loader.probe_batch()
        batch = run.train_input((images[:size], labels[:size], skipped))
        return batch, ['DALI: ops not recorded'] * len(batch[0])
    dataset, seed, log, ops = run.train_loader.dataset, run.recipe.train.seed, [], []
    if rand_augment is not None:
        ops, rand_augment.ops = rand_augment.ops, [_Recorder(op, log) for op in rand_augment.ops]
    samples, captions = [], []
    try:
        for index in range(size):
            log.clear()
            samples.append(dataset[(index % len(dataset), data.derive_seed(seed, index))])
            captions.append(' + '.join(log) or '-')
    finally:
        if rand_augment is not None:
            rand_augment.ops = ops
    return run.train_input(run.train_loader.collate_fn(samples)), captions


def effects_table(rand_augment: Optional[RandAugment], img_size: int, name: str, note: str = '') -> str:
    if rand_augment is None:
        return f'# RandAugment in {name}\n\nThis recipe has no RandAugment.\n'
    lines = [f'# RandAugment in {name} at {img_size} px' + (f' ({note})' if note else ''), '',
             f'{rand_augment.num_layers} layers, each picking one of {len(rand_augment.ops)} ops; largest effect at '
             f'the largest level the op can draw (px for translates and cutout, degrees for rotate and shear, the '
             f'level for the rest).', '',
             '| op | largest level | largest effect | chance an image gets it |', '|---|---|---|---|']
    lines += [f'| {e.name} | {e.level:g} | {e.text()} | {100 * e.chance:.1f} % |'
              for e in augment.rand_augment_effects(rand_augment, img_size)]
    return '\n'.join(lines) + '\n'
