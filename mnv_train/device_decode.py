"""Decoding JPEGs on the training device (data.decode: device), for when host cores cannot feed the model.

Loader workers only read the file, look at its header and plan the crop: they draw RandomResizedCrop's box
with timm's own sampler (the same scale/ratio distribution as the host path, from the same per-sample seed),
the interpolation and the flip. The device then decodes the whole batch at once (torchvision's batched
nvJPEG path on CUDA), crops, resizes and flips. Files the decoder cannot take (PNG, CMYK JPEG) are finished
on the host with the same plan. RandAugment and colour jitter exist only on the host path.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from .data import DeviceNormalize, seed_everything
from .errors import UserError
from .recipe import AugConfig

INTERPOLATIONS = ('bilinear', 'bicubic')


@dataclass
class CropPlan:
    top: int
    left: int
    height: int
    width: int
    interpolation: str
    flip: bool

    def apply_on_host(self, image: Image.Image, size: int) -> torch.Tensor:
        """The same crop done with PIL, for files the device decoder does not read."""
        box = (self.left, self.top, self.left + self.width, self.top + self.height)
        resample = Image.BICUBIC if self.interpolation == 'bicubic' else Image.BILINEAR
        image = image.convert('RGB').resize((size, size), resample, box=box)
        if self.flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


class CropPlanner:
    """Draws a RandomResizedCrop box, interpolation and flip for an image of a given size."""

    def __init__(self, aug: AugConfig):
        if aug.auto_augment or aug.tf_randaugment is not None or aug.color_jitter:
            raise UserError('data.decode device does RandomResizedCrop and flip only: set aug.auto_augment and '
                            'aug.tf_randaugment null and aug.color_jitter 0, or use data.decode host')
        self.scale, self.ratio, self.hflip = tuple(aug.scale), tuple(aug.ratio), aug.hflip
        if aug.train_interpolation not in INTERPOLATIONS + ('random',):
            raise UserError(f'aug.train_interpolation {aug.train_interpolation!r}: data.decode device supports '
                            f'{", ".join(INTERPOLATIONS)} or random')
        self.interpolation = aug.train_interpolation

    def __call__(self, image: Image.Image) -> CropPlan:
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(image, self.scale, self.ratio)
        interpolation = random.choice(INTERPOLATIONS) if self.interpolation == 'random' else self.interpolation
        return CropPlan(top, left, height, width, interpolation, random.random() < self.hflip)


class EncodedDataset(torch.utils.data.Dataset):
    """(index, seed) -> (JPEG bytes or a finished host image, crop plan, label)."""

    def __init__(self, source, planner: CropPlanner, img_size: int):
        if not hasattr(source, 'read_bytes'):
            raise UserError('data.decode device reads image files (data.dataset folder or hfds/...)')
        self.source, self.planner, self.img_size = source, planner, img_size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        index, seed = item
        data, label = self.source.read_bytes(index)
        seed_everything(seed)
        try:
            header = Image.open(io.BytesIO(data))
            plan = self.planner(header)
            if header.format == 'JPEG' and header.mode in ('RGB', 'L'):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), plan, label
            return plan.apply_on_host(header, self.img_size), plan, label
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f'cannot read image {self.source.describe(index)}: {e}') from None


def collate(batch):
    payloads, plans, labels = zip(*batch)
    return list(payloads), list(plans), torch.tensor(labels, dtype=torch.long)


class DeviceDecode(DeviceNormalize):
    """Collated (payloads, plans, labels) -> normalised image batch on the device."""

    def __init__(self, norm, device: torch.device, channels_last: bool, img_size: int):
        super().__init__(norm, device, channels_last)
        self.img_size = img_size

    def crop(self, image: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        """uint8 CHW -> float CHW at img_size, on the image's device, rounded like an 8-bit image."""
        patch = image[:, plan.top:plan.top + plan.height, plan.left:plan.left + plan.width]
        patch = F.interpolate(patch[None].float(), size=(self.img_size, self.img_size), mode=plan.interpolation,
                              align_corners=False, antialias=True)[0]
        patch = patch.round_().clamp_(0, 255)
        return patch.flip(-1) if plan.flip else patch

    def __call__(self, batch):
        payloads, plans, labels = batch
        encoded = [i for i, p in enumerate(payloads) if p.dim() == 1]
        decoded = decode_jpeg([payloads[i] for i in encoded], mode=ImageReadMode.RGB, device=self.device) \
            if encoded else []
        images = torch.empty(len(payloads), 3, self.img_size, self.img_size, device=self.device)
        for i, image in zip(encoded, decoded):
            images[i] = self.crop(image, plans[i])
        for i, payload in enumerate(payloads):
            if payload.dim() == 3:
                images[i] = payload.to(self.device, non_blocking=True).float()
        images = images.sub_(self.mean).div_(self.std).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)
