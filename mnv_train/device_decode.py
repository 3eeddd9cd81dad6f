"""Decoding JPEGs on the training device (data.decode: device), for when host cores cannot feed the model.

Loader workers only read the file, look at its header and plan the crop: they draw RandomResizedCrop's box
with timm's own sampler (the same scale/ratio distribution as the host path, from the same per-sample seed) and
the flip. A batch leaves the workers as a handful of tensors, all files' bytes in one flat tensor with offsets,
because torch shares every tensor a worker returns through its own file descriptor: one tensor per image would
keep hundreds open per batch. The device then decodes the whole batch at once (torchvision's batched nvJPEG
path on CUDA), and crops, resizes and flips every image with one roi_align call per chunk of images rather than
several kernels per image. The host waits for the decode (decode_jpeg returns when nvJPEG is done), but not for
the crops.

Files the decoder cannot take (PNG, CMYK JPEG) are finished on the host with the same plan. A file the batched
decode rejects is decoded alone, then by PIL; one neither can read is replaced by the next image of its batch,
named in a warning and counted like any unreadable image of the host path. RandAugment and colour jitter exist
only on the host path, and the device resamples with roi_align's area-averaged bilinear filter whatever
aug.train_interpolation says.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from . import logs
from .data import UNREADABLE, DeviceNormalize, replacing_unreadable, seed_everything
from .errors import UserError
from .recipe import AugConfig

INTERPOLATIONS = ('bilinear', 'bicubic')
CANVAS_BYTES = 256 * 2**20  # float32 canvas that roi_align reads, per chunk of images


@dataclass
class CropPlan:
    top: int
    left: int
    height: int
    width: int
    interpolation: str  # used by the host path only; the device resamples with roi_align
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
    """(index, seed) -> (file bytes or host-finished pixels as a flat uint8 tensor, finished?, plan, label, name,
    unreadable samples skipped for it)."""

    def __init__(self, source, planner: CropPlanner, img_size: int):
        if not hasattr(source, 'read_bytes'):
            raise UserError('data.decode device reads image files (data.dataset folder or hfds/...)')
        self.source, self.planner, self.img_size = source, planner, img_size

    def __len__(self):
        return len(self.source)

    def __getitem__(self, item):
        index, seed = item
        sample, skipped = replacing_unreadable(self.source, index, lambda i: self.planned(i, seed))
        return (*sample, skipped)

    def planned(self, index: int, seed: int):
        data, label = self.source.read_bytes(index)
        seed_everything(seed)
        name = self.source.describe(index)
        try:
            header = Image.open(io.BytesIO(data))
            plan = self.planner(header)
            if header.format == 'JPEG' and header.mode in ('RGB', 'L'):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), False, plan, label, name
            return plan.apply_on_host(header, self.img_size).reshape(-1), True, plan, label, name
        except UNREADABLE as e:
            raise UserError(f'cannot read image {name}: {e}') from None


class EncodedBatch(NamedTuple):
    data: torch.Tensor  # every sample's bytes (JPEG) or pixels (finished on the host), end to end
    offsets: torch.Tensor  # sample i is data[offsets[i]:offsets[i + 1]]
    finished: torch.Tensor  # bool: pixels at img_size, already cropped and flipped on the host
    boxes: torch.Tensor  # (top, left, height, width) of each crop, in the source image
    flips: torch.Tensor
    labels: torch.Tensor
    names: list  # file names, for messages about files the device cannot read
    skipped: int  # unreadable samples the workers replaced


def collate(samples) -> EncodedBatch:
    payloads, finished, plans, labels, names, skipped = zip(*samples)
    sizes = torch.tensor([0] + [len(p) for p in payloads], dtype=torch.int64)
    return EncodedBatch(torch.cat(payloads), sizes.cumsum(0), torch.tensor(finished),
                        torch.tensor([[p.top, p.left, p.height, p.width] for p in plans], dtype=torch.int64),
                        torch.tensor([p.flip for p in plans]), torch.tensor(labels, dtype=torch.long), list(names),
                        sum(skipped))


class DeviceDecode(DeviceNormalize):
    """EncodedBatch -> (normalised image batch on the device, labels, unreadable samples replaced)."""

    def __init__(self, norm, device: torch.device, channels_last: bool, img_size: int):
        super().__init__(norm, device, channels_last)
        self.img_size = img_size

    def __call__(self, batch: EncodedBatch):
        pieces = list(batch.data.split(batch.offsets.diff().tolist()))
        finished = batch.finished.tolist()
        encoded = [i for i, done in enumerate(finished) if not done]
        decoded, replaced = self.decode(pieces, encoded, batch.names)
        boxes, flips, labels = batch.boxes.clone(), batch.flips.clone(), batch.labels.clone()
        for bad, good in replaced.items():  # the same image, crop and label as the sample that stands in
            decoded[bad], boxes[bad], flips[bad], labels[bad] = decoded[good], boxes[good], flips[good], labels[good]
        images = torch.empty(len(pieces), 3, self.img_size, self.img_size, device=self.device)
        if encoded:
            images[encoded] = self.crop([decoded[i] for i in encoded], boxes[encoded], flips[encoded])
        done = [i for i, flag in enumerate(finished) if flag]
        if done:
            pixels = torch.stack([pieces[i] for i in done]).view(len(done), 3, self.img_size, self.img_size)
            images[done] = pixels.to(self.device, non_blocking=True).float()
        images = images.sub_(self.mean).div_(self.std).contiguous(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True), batch.skipped + len(replaced)

    def decode(self, pieces: list, encoded: list, names: list) -> tuple[dict, dict]:
        """({sample: CHW uint8 image on the device}, {unreadable sample: the sample that replaces it})."""
        if self.device.type == 'cuda':
            # decode_jpeg allocates its outputs on this (side) stream but writes them from nvJPEG's own stream:
            # blocks that this stream's queued crop kernels still read could be handed to nvJPEG. Draining the
            # stream first costs little, since the decode blocks the host anyway.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            images = decode_jpeg([pieces[i] for i in encoded], mode=ImageReadMode.RGB, device=self.device)
            return dict(zip(encoded, images)), {}
        except RuntimeError:
            decoded = {i: image for i in encoded if (image := self.decode_one(pieces[i], names[i])) is not None}
        bad = [i for i in encoded if i not in decoded]
        readable = sorted(decoded)
        if not readable:
            raise UserError(f'no image of a batch could be decoded, e.g. {names[bad[0]]}: check the data with '
                            f'python -m mnv_train.check_data DATA_DIR')
        replaced = {i: next((j for j in readable if j > i), readable[0]) for i in bad}
        for i, j in replaced.items():
            logs.warn_every_rank(f'cannot read image {names[i]} on the device or the host; skipped it, '
                                 f'{names[j]} takes its place')
        return decoded, replaced

    def decode_one(self, piece: torch.Tensor, name: str):
        """One file alone on the device, else with PIL (nvJPEG refuses some files PIL reads); None if neither can."""
        try:
            return decode_jpeg(piece, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:
            with Image.open(io.BytesIO(piece.numpy().tobytes())) as image:
                pixels = np.asarray(image.convert('RGB'))
        except UNREADABLE:
            return None
        logs.warn_every_rank(f'{name}: the device decoder refused it; decoded on the host instead')
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(self.device)

    def crop(self, images: list, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop, resize to img_size and flip every image, rounded like an 8-bit image: one roi_align per chunk.

        roi_align with adaptive sampling averages a grid of bilinear samples over each output pixel, which
        antialiases like PIL's resize. Images sit in a zero canvas of the batch's largest size, their last row
        and column copied once outward, because a bilinear sample can reach half a pixel past the image.
        """
        height = max(image.shape[1] for image in images) + 1
        width = max(image.shape[2] for image in images) + 1
        chunk = max(1, CANVAS_BYTES // (3 * height * width * 4))
        out = torch.empty(len(images), 3, self.img_size, self.img_size, device=self.device)
        top, left, box_h, box_w = boxes.to(torch.float32).unbind(1)
        rois = torch.stack([torch.zeros_like(top), left, top, left + box_w, top + box_h], 1).to(self.device)
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            canvas = torch.zeros(len(part), 3, height, width, device=self.device)
            for j, image in enumerate(part):
                h, w = image.shape[1:]
                canvas[j, :, :h, :w] = image
                canvas[j, :, h, :w] = image[:, -1]
                canvas[j, :, :h + 1, w] = canvas[j, :, :h + 1, w - 1]
            part_rois = rois[start:start + len(part)].clone()
            part_rois[:, 0] = torch.arange(len(part), device=self.device, dtype=part_rois.dtype)
            out[start:start + len(part)] = roi_align(canvas, part_rois, output_size=self.img_size,
                                                     spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flipped = flips.to(self.device)
        out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
        return out.round_().clamp_(0, 255)
