"""data.decode: device — the logic runs on CPU tensors here; on CUDA the same code decodes with nvJPEG."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.io import ImageReadMode, decode_jpeg

from mnv_train import data, device_decode
from mnv_train.cli import train_main
from mnv_train.errors import UserError
from mnv_train.recipe import AugConfig


def photo(width=120, height=90, seed=0) -> Image.Image:
    """A smooth image with some texture, so resampling differences show but stay small."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 9 + c) * 80 + np.cos(yy / 7 - c) * 60 + 128 for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, fmt='JPEG') -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def test_crop_boxes_come_from_the_host_path_distribution():
    aug = AugConfig(scale=[0.08, 1.0], ratio=[0.75, 1.3333333])
    planner = device_decode.CropPlanner(aug)
    image = photo()
    areas = []
    for seed in range(500):
        data.seed_everything(seed)
        expected = RandomResizedCropAndInterpolation.get_params(image, tuple(aug.scale), tuple(aug.ratio))
        data.seed_everything(seed)
        plan = planner(image)
        assert (plan.top, plan.left, plan.height, plan.width) == expected
        areas.append(plan.height * plan.width / (120 * 90))
    assert 0.08 * 0.9 <= min(areas) and max(areas) <= 1.0
    assert 0.4 < np.mean(areas) < 0.65  # uniform area in [0.08, 1] before clipping to the image
    flips = [planner(image).flip for _ in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_device_crop_matches_the_host_crop():
    image = photo()
    encoded = torch.frombuffer(bytearray(jpeg_bytes(image)), dtype=torch.uint8)
    decoded = decode_jpeg([encoded], mode=ImageReadMode.RGB, device='cpu')[0]
    on_host = Image.open(io.BytesIO(jpeg_bytes(image)))
    norm = data.Normalization((0.5,) * 3, (0.5,) * 3)
    decode = device_decode.DeviceDecode(norm, torch.device('cpu'), channels_last=False, img_size=48)
    for plan in (device_decode.CropPlan(10, 20, 60, 80, 'bilinear', False),
                 device_decode.CropPlan(0, 0, 90, 120, 'bicubic', True)):
        boxes = torch.tensor([[plan.top, plan.left, plan.height, plan.width]])
        device_result = decode.crop([decoded], boxes, torch.tensor([plan.flip]))[0]
        host_result = plan.apply_on_host(on_host, 48).float()
        assert device_result.shape == host_result.shape == (3, 48, 48)
        assert (device_result - host_result).abs().mean() < 2.0  # of 255


def test_batches_mix_device_decoded_jpegs_and_host_finished_pngs(tmp_path):
    class Files:
        def __init__(self):
            self.items = [jpeg_bytes(photo(seed=1)), jpeg_bytes(photo(seed=2), 'PNG'), jpeg_bytes(photo(seed=3))]

        def __len__(self):
            return 3

        def read_bytes(self, index):
            return self.items[index], index

        def describe(self, index):
            return f'file {index}'

    dataset = device_decode.EncodedDataset(Files(), device_decode.CropPlanner(AugConfig()), img_size=32)
    batch = device_decode.collate([dataset[(i, 100 + i)] for i in range(3)])
    assert batch.finished.tolist() == [False, True, False]  # the PNG was finished on the host
    norm = data.Normalization((0.5,) * 3, (0.5,) * 3)
    images, labels, skipped = device_decode.DeviceDecode(norm, torch.device('cpu'), True, 32)(batch)
    assert images.shape == (3, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    assert labels.tolist() == [0, 1, 2] and skipped == 0
    assert -1.01 <= images.min() and images.max() <= 1.01
    again = device_decode.collate([dataset[(i, 100 + i)] for i in range(3)])
    assert torch.equal(again.boxes, batch.boxes) and torch.equal(again.flips, batch.flips)  # same seeds, same plans


def test_randaugment_needs_the_host_path():
    with pytest.raises(UserError, match='data.decode device does RandomResizedCrop and flip only'):
        device_decode.CropPlanner(AugConfig(auto_augment='rand-m9-mstd0.5'))


def test_training_with_device_decode_runs_and_is_deterministic(tmp_path, write_recipe):
    root = tmp_path / 'images'
    for split, count in (('train', 32), ('validation', 8)):
        for label in range(2):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(count // 2):
                photo(60 + 10 * label, 50, seed=i + 100 * label).save(folder / f'{i}.jpg', quality=90)
    recipe = write_recipe({'data': {'dataset': 'folder', 'data_dir': str(root), 'decode': 'device'},
                           'train': {'global_batch_size': 8, 'batch_size': 8}, 'schedule': {'epochs': 1}})
    for name in ('a', 'b'):
        assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / name), '--quiet']) == 0
    from mnv_train import checkpoint
    a, b = (checkpoint.load(tmp_path / n / 'checkpoints' / 'last.pt') for n in 'ab')
    assert a['state']['step'] == 4
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


class JpegFiles:
    """A folder-like source of JPEG bytes; `broken` indices hold a file whose header reads but whose data stops."""

    def __init__(self, count, broken=()):
        self.items = [jpeg_bytes(photo(seed=i)) for i in range(count)]
        for i in broken:
            self.items[i] = self.items[i][:self.items[i].index(b'\xff\xda') + 20]

    def __len__(self):
        return len(self.items)

    def read_bytes(self, index):
        return self.items[index], index % 2

    def describe(self, index):
        return f'img{index}.jpg'


def test_a_batch_travels_as_a_few_tensors_whatever_its_size_also_through_workers():
    dataset = device_decode.EncodedDataset(JpegFiles(12), device_decode.CropPlanner(AugConfig()), img_size=32)
    sampler = [(i, 7 + i) for i in range(12)]
    loader = data.make_loader(dataset, sampler, 6, num_workers=2, drop_last=True, pin_memory=False,
                              collate_fn=device_decode.collate)
    batches = list(loader)
    assert len(batches) == 2
    for number, batch in enumerate(batches):
        assert sum(isinstance(field, torch.Tensor) for field in batch) == 6  # not one tensor per image
        files = dataset.source.items[6 * number:6 * number + 6]
        assert batch.offsets.tolist() == np.cumsum([0] + [len(f) for f in files]).tolist()
    single = device_decode.collate([dataset[item] for item in sampler[:6]])
    assert torch.equal(single.data, batches[0].data) and torch.equal(single.boxes, batches[0].boxes)


def test_a_file_the_device_cannot_decode_is_replaced_by_the_next_one_and_named(capsys):
    dataset = device_decode.EncodedDataset(JpegFiles(4, broken=[1]), device_decode.CropPlanner(AugConfig()), 32)
    batch = device_decode.collate([dataset[(i, i)] for i in range(4)])
    norm = data.Normalization((0.5,) * 3, (0.5,) * 3)
    decode = device_decode.DeviceDecode(norm, torch.device('cpu'), False, 32)
    images, labels, skipped = decode(batch)
    assert skipped == 1 and labels.tolist() == [0, 0, 0, 1]  # sample 2 (label 0) stands in for sample 1
    assert torch.equal(images[1], images[2])
    assert 'cannot read image img1.jpg on the device or the host; skipped it, img2.jpg takes its place' in \
        capsys.readouterr().err
    again, _, _ = decode(batch)
    assert torch.equal(again, images)
