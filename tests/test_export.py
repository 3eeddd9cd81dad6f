"""Release files and exports, each checked against PyTorch; the MobileNet v1/v2/v3 family end to end."""
import hashlib
import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from mnv_train import checkpoint, export
from mnv_train.cli import train_main, validate_main

from conftest import ONE_EPOCH, REPO, merge, train_tiny


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp('export'), ONE_EPOCH)[1] / 'checkpoints' / 'last.pt'


def release_files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_release_holds_hashed_safetensors_recipe_metrics_and_a_checked_torchscript(trained, tmp_path, capsys):
    out = tmp_path / 'release'
    assert export.main([str(trained), '--output', str(out), '--torchscript']) == 0
    files = release_files(out)
    weights_name = next(name for name in files if name.endswith('.safetensors'))
    sha = hashlib.sha256(files[weights_name]).hexdigest()
    stem = f'tiny-ema-{sha[:8]}'
    assert set(files) == {f'{stem}.safetensors', f'{stem}.yaml', f'{stem}.json', f'{stem}.torchscript.pt'}

    payload, manifest = checkpoint.load(trained), checkpoint.read_manifest(trained)
    released = load_file(str(out / f'{stem}.safetensors'))
    assert released.keys() == payload['ema'].keys()
    assert all(torch.equal(released[k], payload['ema'][k]) for k in released)
    info = json.loads(files[f'{stem}.json'])
    assert (info['sha256'], info['weights'], info['metrics']) == (sha, 'ema', manifest['metrics'])
    assert info['input'] == {'img_size': 32, 'crop_pct': 1.0, 'interpolation': 'bicubic', 'layout': 'NCHW float32 RGB',
                             'mean': pytest.approx([0.485, 0.456, 0.406]), 'std': pytest.approx([0.229, 0.224, 0.225])}
    check = info['checks']['torchscript']
    assert check['images'] == 8 and check['max_abs_diff'] <= 1e-5
    assert f'torchscript: max |export - PyTorch| {check["max_abs_diff"]:.3g} (logits up to ' in capsys.readouterr().out

    scripted = torch.jit.load(str(out / f'{stem}.torchscript.pt'))
    module = export.build_model(export.recipes.load(str(out / f'{stem}.yaml')), released, 4, trained)
    images = torch.randn(3, 3, 32, 32)
    assert torch.allclose(scripted(images), module(images), atol=1e-5)
    # the release alone reproduces the run's EMA evaluation
    assert validate_main([str(out / f'{stem}.safetensors'), '--recipe', str(out / f'{stem}.yaml'),
                          '--json', str(tmp_path / 'eval.json')]) == 0
    assert json.loads((tmp_path / 'eval.json').read_text())['top1'] == pytest.approx(manifest['metrics']['ema_top1'])


def test_onnx_export_is_checked_with_onnxruntime_and_a_failed_check_writes_nothing(trained, tmp_path, capsys):
    import onnxruntime  # CI installs it (and onnx, onnxscript): a missing one fails here rather than skipping
    strict = tmp_path / 'strict'
    assert export.main([str(trained), '--output', str(strict), '--onnx', '--weights', 'raw',
                        '--tolerance', '1e-12']) == 2
    assert 'onnx export differs from PyTorch by' in capsys.readouterr().err and not strict.exists()

    out = tmp_path / 'release'
    assert export.main([str(trained), '--output', str(out), '--onnx', '--weights', 'raw']) == 0
    onnx_file = next(out.glob('tiny-raw-*.onnx'))
    info = json.loads(onnx_file.with_suffix('.json').read_text())
    check = info['checks']['onnx']
    assert 0 < check['max_abs_diff'] <= 1e-4 * check['max_abs_logit']
    session = onnxruntime.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    module = export.build_model(export.recipes.load(str(onnx_file.with_suffix('.yaml'))),
                                checkpoint.load(trained)['model'], 4, trained)
    images = torch.randn(3, 3, 32, 32)  # another batch size than the export's
    with torch.no_grad():
        expected = module(images)
    assert torch.allclose(torch.from_numpy(session.run(None, {'images': images.numpy()})[0]), expected,
                          atol=1e-4 * check['max_abs_logit'])


def test_existing_release_files_are_kept_unless_forced(trained, tmp_path):
    out = tmp_path / 'release'
    assert export.main([str(trained), '--output', str(out)]) == 0
    first = release_files(out)
    (out / next(name for name in first if name.endswith('.json'))).write_text('edited by hand')
    result = subprocess.run([sys.executable, '-m', 'mnv_train.export', str(trained), '--output', str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 2 and 'already exists; pass --force' in result.stderr
    assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
    assert b'edited by hand' in release_files(out).values()
    assert export.main([str(trained), '--output', str(out), '--force']) == 0
    assert release_files(out) == first


def test_a_format_added_to_a_release_later_keeps_the_check_of_the_one_before(trained, tmp_path, capsys):
    out = tmp_path / 'release'
    assert export.main([str(trained), '--output', str(out), '--torchscript', '--check-images', '2']) == 0
    first = release_files(out)
    assert export.main([str(trained), '--output', str(out), '--onnx', '--check-images', '2']) == 0
    now = release_files(out)
    info = json.loads(next(content for name, content in now.items() if name.endswith('.json')))
    assert set(info['checks']) == {'torchscript', 'onnx'}
    assert info['checks']['torchscript'] == json.loads(
        next(content for name, content in first.items() if name.endswith('.json')))['checks']['torchscript']
    assert {name: now[name] for name in first if not name.endswith('.json')} == {
        name: content for name, content in first.items() if not name.endswith('.json')}  # the rest as it was
    capsys.readouterr()
    assert export.main([str(trained), '--output', str(out), '--onnx']) == 2  # that one is there already
    assert 'onnx already exists; pass --force' in capsys.readouterr().err
    assert release_files(out) == now


def test_a_checkpoint_without_manifest_or_ema_is_refused(trained, tmp_path, capsys):
    plain = tmp_path / 'plain.pt'
    plain.write_bytes(trained.read_bytes())
    assert export.main([str(plain), '--output', str(tmp_path / 'out')]) == 2
    assert 'export needs an mnv-train checkpoint with its .json manifest' in capsys.readouterr().err
    payload, manifest = checkpoint.load(trained), checkpoint.read_manifest(trained)
    no_ema = checkpoint.Checkpointer(tmp_path / 'no-ema', 1, True).save({**payload, 'ema': None}, manifest, False)
    assert export.main([str(no_ema), '--output', str(tmp_path / 'out'), '--weights', 'ema']) == 2
    assert 'holds no EMA weights' in capsys.readouterr().err and not (tmp_path / 'out').exists()


FAMILY = {'data': {'synthetic_train_size': 64}, 'aug': {'mixup': 0.8, 'cutmix': 1.0},
          'train': {'precise_bn_batches': 2}, 'schedule': {'epochs': 1, 'warmup_epochs': 0.5}}


@pytest.mark.parametrize('name', ['mobilenetv1_100', 'mobilenetv2_100', 'mobilenetv3_large_100',
                                  'mobilenetv3_small_100'])
def test_mobilenet_family_trains_fine_tunes_and_exports(name, write_recipe, tmp_path, capsys):
    """One training run per model: it fine-tunes 4-class timm weights of that model (an untrained timm model's,
    which is all that --init-from needs), with drop-path, mixup/cutmix, precise BN and frozen layers."""
    pretrained = tmp_path / 'pre.pth'
    torch.save(timm.create_model(name, num_classes=4).state_dict(), pretrained)
    tuned = write_recipe(merge(FAMILY, {'model': {'name': name, 'drop_path_rate': 0.1, 'freeze': ['conv_stem', 'bn1']},
                                        'data': {'synthetic_classes': 3}}), name='tuned')
    capsys.readouterr()
    assert train_main(['--recipe', str(tuned), '--output', str(tmp_path / 'tuned'), '--quiet',
                       '--init-from', str(pretrained)]) == 0
    assert 'classifier reset: pre.pth has 4 classes, this model 3 classes' in capsys.readouterr().err
    best = tmp_path / 'tuned' / 'checkpoints' / 'best.pt'
    # --onnx always: CI installs onnx, onnxscript and onnxruntime, so an export that cannot import them fails
    assert export.main([str(best), '--output', str(tmp_path / 'release'), '--torchscript', '--onnx']) == 0
    info = json.loads(next((tmp_path / 'release').glob('*.json')).read_text())
    assert set(info['checks']) == {'torchscript', 'onnx'}
    assert all(c['max_abs_diff'] <= 1e-4 * c['max_abs_logit'] for c in info['checks'].values()), info['checks']
