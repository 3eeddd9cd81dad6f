"""BatchNorm recalibration: repairs stale statistics, is deterministic, leaves exact resume intact."""
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mnv_train import checkpoint, data, finetune, precise_bn, resume
from mnv_train import model as models
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.cli import train_main, validate_main
from mnv_train.distributed import World

from conftest import train_tiny

PRECISE = {'train': {'precise_bn_batches': 2}, 'aug': {'mixup': 0.8}, 'model': {'drop_path_rate': 0.1}}


def bn_buffers(state_dict):
    return {k: v for k, v in state_dict.items() if k.endswith(('running_mean', 'running_var'))}


def synthetic_batches(count, img_size, batch_size):
    source = data.SyntheticImages(count, 4, img_size, seed=0, training=True)
    samples = [source.load(i) for i in range(count)]
    images = torch.stack([torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) for img, _ in samples])
    images = (images - images.mean()) / images.std()
    labels = torch.tensor([label for _, label in samples])
    return list(zip(images.split(batch_size), labels.split(batch_size)))


def mean_loss(model, batches, train_mode):
    model.train(train_mode)
    with torch.no_grad():
        return sum(F.cross_entropy(model(x), y).item() for x, y in batches) / len(batches)


def test_recalibration_repairs_stale_statistics():
    """BN momentum 0.01: after 10 steps the running statistics still describe the initial weights."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv3_small_100', num_classes=4)
    models.set_batchnorm(model, momentum=0.01, eps=None)
    batches = synthetic_batches(64, 64, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(10):
        images, labels = batches[step % len(batches)]
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    train_loss = mean_loss(model, batches, train_mode=True)
    stale = mean_loss(model, batches, train_mode=False)

    assert precise_bn.recalibrate(model, (images for images, _ in batches), 5) == len(batches)
    repaired = mean_loss(model, batches, train_mode=False)
    assert train_loss < 0.1 and stale > 1.0, (train_loss, stale)
    assert repaired < train_loss + 0.1, (train_loss, stale, repaired)
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta


def test_only_batchnorm_runs_in_training_mode_and_modes_are_restored():
    """Stochastic depth must stay off: the statistics are for the network as evaluation runs it."""
    torch.manual_seed(0)
    plain = timm.create_model('mobilenetv4_conv_small', num_classes=4)
    with_drop_path = timm.create_model('mobilenetv4_conv_small', num_classes=4, drop_path_rate=0.5)
    with_drop_path.load_state_dict(plain.state_dict())
    plain.train()
    with_drop_path.eval()
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    assert precise_bn.recalibrate([plain, with_drop_path], iter(batches), 2) == 2
    a, b = bn_buffers(plain.state_dict()), bn_buffers(with_drop_path.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(m.training for m in plain.modules()) and not any(m.training for m in with_drop_path.modules())


def test_frozen_batchnorm_keeps_its_statistics():
    model = timm.create_model('mobilenetv4_conv_small', num_classes=4)
    finetune.freeze(model, ['conv_stem', 'bn1'])
    before = {k: v.clone() for k, v in bn_buffers(model.state_dict()).items()}
    precise_bn.recalibrate(model, iter([torch.randn(4, 3, 32, 32)]), 1)
    after = bn_buffers(model.state_dict())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == set(after) - {'bn1.running_mean', 'bn1.running_var'}
    assert precise_bn.recalibrate(model, iter([]), 2) == 0  # no batches: nothing is reset


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny run with EMA, mixup, drop path and precise BN: (recipe path, run folder)."""
    return train_tiny(tmp_path_factory.mktemp('precise'), PRECISE, name='precise')


def test_run_statistics_are_recalibrated_for_raw_and_ema_weights_deterministically(trained, tmp_path):
    recipe_path, run_dir = trained
    payload = checkpoint.load(run_dir / 'checkpoints' / 'last.pt')
    run = build_run(recipes.load(str(recipe_path)), World(), tmp_path)
    resume.restore(run, payload, 'last.pt')
    run.state.epoch = payload['state']['epoch'] - 1  # where end_epoch recalibrated before saving
    for module in (run.module, run.ema.module):
        for value in bn_buffers(module.state_dict()).values():
            value.add_(1.0)  # stale on purpose
    precise_bn.recalibrate_run(run)
    for part, module in (('model', run.module), ('ema', run.ema.module)):
        saved, now = bn_buffers(payload[part]), bn_buffers(module.state_dict())
        for key in saved:
            assert torch.equal(saved[key], now[key]), f'{part}.{key}'


def test_precise_bn_leaves_exact_resume_bit_identical(trained, tmp_path):
    recipe_path, run_dir = trained
    expected = checkpoint.load(run_dir / 'checkpoints' / 'last.pt')
    out = tmp_path / 'sliced'
    assert train_main(['--recipe', str(recipe_path), '--output', str(out), '--quiet', '--max-steps', '6']) == 0
    assert train_main(['--recipe', str(recipe_path), '--output', str(out), '--quiet', '--resume', 'auto']) == 0
    resumed = checkpoint.load(out / 'checkpoints' / 'last.pt')
    for part in ('model', 'ema'):
        for key in expected[part]:
            assert torch.equal(expected[part][key], resumed[part][key]), f'{part}.{key}'


def test_validate_recalibrates_with_precise_bn(trained, capsys):
    _, run_dir = trained
    best = run_dir / 'checkpoints' / 'best.pt'
    assert validate_main([str(best), '--weights', 'raw', '--precise-bn', '3', '--batch-size', '16']) == 0
    assert validate_main([str(best), '--weights', 'raw']) == 0
    recalibrated = json.loads((run_dir / 'checkpoints' / 'best.eval-raw-32-1-pbn3.json').read_text())
    plain = json.loads((run_dir / 'checkpoints' / 'best.eval-raw-32-1.json').read_text())
    assert (recalibrated['precise_bn_batches'], plain['precise_bn_batches']) == (3, 0)
    assert recalibrated['loss'] != plain['loss']  # 3 batches of 16, not the run's 2 of 16
