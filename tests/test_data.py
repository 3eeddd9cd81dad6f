import numpy as np
import PIL
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform

from mnv_train import augment, data
from mnv_train.errors import UserError
from mnv_train.recipe import AugConfig, DataConfig, TFRandAugmentConfig, TrainSizeRampConfig


def test_posterize_to_zero_bits_gives_black_instead_of_raising():
    image = Image.new('RGB', (8, 8), (200, 100, 50))
    if int(PIL.__version__.split('.')[0]) >= 13:
        with pytest.raises(ValueError):  # what the guard protects against
            ImageOps.posterize(image, 0)
    assert np.asarray(augment.posterize_zero_safe(image, 0)).max() == 0
    assert np.array_equal(np.asarray(augment.posterize_zero_safe(image, 4)), np.asarray(ImageOps.posterize(image, 4)))


def test_randaugment_inc1_survives_many_images_that_ask_for_zero_posterize_bits(monkeypatch):
    """rand-m9-mstd0.5-inc1 asks for 0 posterize bits on ~0.2% of images; 5000 calls hit it ~10 times."""
    zero_bits = []

    def counting(img, bits_to_keep, **kwargs):
        out = augment.posterize_zero_safe(img, bits_to_keep, **kwargs)
        if bits_to_keep <= 0:
            zero_bits.append(np.asarray(out).max())
        return out
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        assert timm_auto_augment.NAME_TO_OP[name] is augment.posterize_zero_safe  # the guard is what timm calls
        monkeypatch.setitem(timm_auto_augment.NAME_TO_OP, name, counting)
    transform = create_transform(32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', use_prefetcher=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    data.seed_everything(0)
    for _ in range(5000):
        transform(image)
    assert len(zero_bits) >= 3 and set(zero_bits) == {0}, zero_bits  # the 0-bit case was hit, and gave black


def test_fashion_mnist_reader_gives_rgb_images_and_labels(tiny_fmnist):
    train = data.FashionMNIST(str(tiny_fmnist), 'train')
    test = data.FashionMNIST(str(tiny_fmnist), 'test')
    assert (len(train), len(test), train.num_classes) == (64, 32, 10)
    image, label = train.load(13)
    assert image.mode == 'RGB' and image.size == (28, 28) and label == 3
    assert np.asarray(image)[..., 0].min() >= 75  # brightness encodes the class in the fixture


def test_fashion_mnist_missing_or_corrupt_files_are_one_line_errors(tmp_path, tiny_fmnist):
    with pytest.raises(UserError, match='dataset-fashion-mnist'):
        data.FashionMNIST(str(tmp_path / 'nowhere'), 'train')
    (tiny_fmnist / 'train-labels-idx1-ubyte.gz').write_bytes(b'garbage')
    with pytest.raises(UserError, match='not a readable idx file'):
        data.FashionMNIST(str(tiny_fmnist), 'train')


def test_sampler_seeks_without_replaying():
    sampler = data.EpochSampler(100, rank=0, world_size=1, seed=3)
    sampler.set_position(epoch=2)
    full = list(sampler)
    sampler.set_position(epoch=2, start=37)
    assert list(sampler) == full[37:]
    sampler.set_position(epoch=3)
    other_epoch = list(sampler)
    assert sorted(i for i, _ in full) == sorted(i for i, _ in other_epoch) == list(range(100))
    assert [i for i, _ in full] != [i for i, _ in other_epoch]
    assert len({s for _, s in full + other_epoch}) == 200  # every sample of every epoch has its own seed


def test_sampler_shards_ranks_and_repeats():
    shards = [list(data.EpochSampler(10, rank, 2, seed=0)) for rank in range(2)]
    assert sorted(i for shard in shards for i, _ in shard) == list(range(10))
    repeated = list(data.EpochSampler(300, 0, 1, seed=0, repeats=3))
    assert len(repeated) == 256 and max(np.bincount([i for i, _ in repeated])) == 3


@pytest.mark.parametrize('repeats', [0, 3])
def test_the_samplers_indices_and_places_alone_give_what_it_yields_on_every_rank_and_from_any_step(repeats):
    for rank in range(2):
        sampler = data.EpochSampler(300, rank, world_size=2, seed=1, repeats=repeats, micro_batch=4, accum=3)
        sampler.set_position(epoch=2, start=sampler.step_size * 5)
        indices, places = sampler.indices_and_places()
        assert [(int(index), data.sample_seed(1, 2, int(place))) for index, place in zip(indices, places)] == \
            list(sampler)


def test_eval_shards_count_every_sample_once():
    parts = [list(data.ShardSampler(11, rank, 3)) for rank in range(3)]
    assert sorted(i for part in parts for i, _ in part) == list(range(11))


def test_transform_depends_only_on_the_sample_seed():
    cfg = DataConfig(dataset='synthetic', img_size=32)
    aug = AugConfig(auto_augment='rand-m9-mstd0.5-inc1', hflip=0.5)
    source = data.SyntheticImages(8, 4, 32, seed=0, training=True)
    dataset = data.TransformedDataset(source, data.train_transform(cfg, aug, data.Normalization((0.5,) * 3,
                                                                                               (0.5,) * 3)))
    first, label, skipped = dataset[(5, 1234)]
    torch.manual_seed(99)
    np.random.seed(7)
    again, _, _ = dataset[(5, 1234)]
    other, _, _ = dataset[(5, 4321)]
    assert first.dtype == torch.uint8 and first.shape == (3, 32, 32) and label == 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_the_ramped_train_size_rounds_to_32_px_or_to_8_below_64_px_as_a_function_of_the_epoch():
    # FFCV's ResNet-50 ramp, then the same shape below 64 px; an explicit step overrides the rule
    assert data.train_sizes(192, TrainSizeRampConfig(start_size=160, start_epoch=2, end_epoch=6), 8) == [
        160, 160, 160, 160, 192, 192, 192, 192]  # 168 and 176 round to 160 and 192 (half up), 184 to 192
    assert data.train_sizes(64, TrainSizeRampConfig(start_size=32, end_epoch=8), 10) == [
        32, 40, 40, 48, 48, 56, 56, 64, 64, 64]  # 36, 44, 52 and 60 round half up
    assert data.train_sizes(64, TrainSizeRampConfig(start_size=16, end_epoch=3, step=16), 4) == [16, 32, 48, 64]
    assert data.train_sizes(64, None, 3) is None


def test_each_epochs_batches_come_at_that_epochs_size_from_persistent_workers():
    cfg = DataConfig(dataset='synthetic', img_size=32)
    aug = AugConfig(scale=[0.5, 1.0], tf_randaugment=TFRandAugmentConfig(translate_const=12, cutout_const=12))
    norm = data.Normalization((0.5,) * 3, (0.5,) * 3)
    sizes = data.train_sizes(32, TrainSizeRampConfig(start_size=16, end_epoch=2), 3)
    sampler = data.EpochSampler(8, rank=0, world_size=1, seed=0, micro_batch=4, sizes=sizes)
    dataset = data.TransformedDataset(data.SyntheticImages(8, 4, 32, seed=0, training=True),
                                      data.train_transform(cfg, aug, norm),
                                      {size: data.train_transform(cfg, aug, norm, size) for size in set(sizes)})
    loader = data.make_loader(dataset, sampler, 4, num_workers=1, drop_last=True, pin_memory=False)
    shapes = []
    for epoch in range(3):
        sampler.set_position(epoch)
        shapes.append({tuple(images.shape[2:]) for images, _, _ in loader})
    assert loader.persistent_workers and sizes == [16, 24, 32]
    assert shapes == [{(16, 16)}, {(24, 24)}, {(32, 32)}]
    # Google's RandAugment states pixels at data.img_size: at half the size, half the translate and cutout
    google = next(t for t in dataset.sized[16].transforms if isinstance(t, timm_auto_augment.RandAugment))
    assert {(op.hparams['translate_const'], op.hparams['cutout_const']) for op in google.ops} == {(6.0, 6.0)}


def test_unreadable_image_in_a_folder_dataset_is_named(tmp_path):
    for split in ('train', 'validation'):
        folder = tmp_path / split / 'cat'
        folder.mkdir(parents=True)
        Image.new('RGB', (16, 16)).save(folder / 'good.png')
    (tmp_path / 'train' / 'cat' / 'broken.jpg').write_bytes(b'not a jpeg')
    source = data.open_source(DataConfig(dataset='folder', data_dir=str(tmp_path)), 'train', 0)
    assert source.num_classes == 1
    broken = next(i for i in range(len(source)) if 'broken' in source.describe(i))
    with pytest.raises(UserError, match=r'cannot read image .*broken.jpg'):
        source.load(broken)


def test_missing_data_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        data.open_source(DataConfig(dataset='folder', data_dir=str(tmp_path / 'missing')), 'train', 0)
    with pytest.raises(UserError, match='data_dir is not set'):
        data.open_source(DataConfig(dataset='folder'), 'train', 0)


def test_batch_augment_turns_mixup_off_at_the_off_epoch():
    aug = data.BatchAugment(AugConfig(mixup=0.8, cutmix=1.0, mixup_off_epoch=3), num_classes=4, smoothing=0.1,
                            device=torch.device('cpu'))
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, mixed = aug(images, labels, epoch=2)
    _, plain = aug(images, labels, epoch=3)
    assert mixed.shape == (4, 4) and torch.allclose(mixed.sum(1), torch.ones(4))
    assert torch.equal(plain, labels)


def image_folder(root, splits, classes=3, per_class=8, size=32):
    """root/<split>/<class>/<n>.png for each split, with one flat colour per class."""
    for split in splits:
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for n in range(per_class):
                Image.new('RGB', (size, size), (80 * c, 40 + n, 200 - 60 * c)).save(folder / f'{n}.png')
    return root


def test_train_split_names_the_training_folder_everywhere(tmp_path, write_recipe):
    from mnv_train import checkpoint
    from mnv_train.cli import train_main
    root = image_folder(tmp_path / 'data', ['trainset', 'holdout'])
    recipe = write_recipe({'data': {'dataset': 'folder', 'data_dir': str(root), 'train_split': 'trainset',
                                    'val_split': 'holdout'},
                           'train': {'global_batch_size': 8, 'batch_size': 8, 'precise_bn_batches': 1},
                           'schedule': {'epochs': 1, 'warmup_epochs': 0}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    payload = checkpoint.load(tmp_path / 'run' / 'checkpoints' / 'last.pt')
    assert payload['model']['classifier.weight'].shape[0] == 3  # the classes, not the split folders
    assert payload['state']['samples_seen'] == 24


def test_a_missing_split_folder_is_named_instead_of_read_as_classes(tmp_path):
    root = image_folder(tmp_path, ['trainset', 'holdout'], classes=1, per_class=1)
    with pytest.raises(UserError, match=r"no 'train' folder under .* \(it holds holdout, trainset\)"):
        data.open_source(DataConfig(dataset='folder', data_dir=str(root)), 'train', 0)
    flat = data.open_source(DataConfig(dataset='folder', data_dir=str(root / 'holdout'), val_split=''), '', 0)
    assert flat.num_classes == 1
