"""--dry-run, the epoch line and the stagnation warnings, on tiny synthetic data."""
import math
import re

import pytest
import torch

from mnv_train import data, diagnostics, distributed, dryrun
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.cli import train_main
from mnv_train.evaluation import evaluate

from conftest import RAMP, FakeDeviceClock

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000, path


@pytest.fixture
def built(write_recipe, tmp_path):
    """built({'ema': {...}}) -> a freshly built (untrained) run of the tiny recipe with those changes."""
    def build(changes=None):
        return build_run(recipes.load(str(write_recipe(changes))), distributed.init('cpu'), tmp_path / 'run')
    return build


def history(top1, ema_top1=None, train_loss=None, step_per_epoch=4):
    rows = []
    for epoch, value in enumerate(top1):
        rows.append({'epoch': epoch, 'step': (epoch + 1) * step_per_epoch, 'lr': 0.001,
                     'train_loss': train_loss[epoch] if train_loss else 1.4 - 0.1 * epoch, 'top1': value,
                     **({'ema_top1': ema_top1[epoch]} if ema_top1 else {})})
    return rows


def test_dry_run_reports_the_schedule_ema_and_speed_and_plots_the_lr(write_recipe, tmp_path, capsys):
    out = tmp_path / 'run'
    assert train_main(['--recipe', str(write_recipe()), '--output', str(out), '--dry-run']) == 0
    text = capsys.readouterr().out
    # TINY: 128 samples / global batch 32 = 4 steps per epoch, 2 epochs, warmup 0.5 epoch = 2 steps, then cosine
    total, warmup, peak = 8, 2, 0.002
    assert f'{total} optimizer steps of 32 samples' in text and '16 per device x 2 accumulation' in text
    warmup_end = 0.5 * peak * (1 + math.cos(math.pi * warmup / total))
    final = 0.5 * peak * (1 + math.cos(math.pi * (total - 1) / total))
    assert re.search(rf'warmup end +2 +0\.50 +{warmup_end:.4g}\n', text)
    assert re.search(rf'final step +7 +1\.75 +{final:.4g}\n', text)
    assert f'half-life {math.log(0.5) / math.log(0.9):.1f} steps' in text
    full_decay_step = math.ceil((1 - 0.9) ** -1.5 - 1) + 1  # ModelEmaV3 warmup: 1 - (1 + k)^-2/3 >= 0.9
    assert f'would reach 0.9 only at step {full_decay_step}' in text
    decays = [1 - (1 + step - 1) ** (-2 / 3) for step in (1, 1, 8)]  # get_decay counts from update_after_step + 1
    assert ('effective decay: ' + ', '.join(f'{max(d, 0):.6g} at {p} % (step {s})' for d, p, s in
                                            zip(decays, (1, 10, 100), (1, 1, 8)))) in text
    assert 's per optimizer step' in text and 'estimated training time' in text
    assert 'name: tiny' in text and 'batch plan' in text
    assert f'LR schedule plot: {out / "lr_schedule.png"}' in text
    assert_png(out / 'lr_schedule.png')
    assert not (out / 'checkpoints').exists()


def test_dry_run_times_each_ramp_size_and_evaluations_share(write_recipe, tmp_path, capsys):
    recipe = write_recipe({'schedule': {'epochs': 3, 'train_size_ramp': {'start_size': 16, 'end_epoch': 2}},
                           'data': {'extra_evals': [[24, 1.0]]}, 'train': {'extra_eval_every': 2}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--dry-run']) == 0
    text = capsys.readouterr().out
    rows = re.findall(r'^ +(16|24|32) +1 +33% +([\d.e+-]+) +\S+ s$', text, re.M)  # 16, 24, 32 px: an epoch each
    assert [size for size, _ in rows] == ['16', '24', '32'] and all(float(rate) > 0 for _, rate in rows), text
    assert re.search(r'against every epoch at 32 px \(.+\): .+ saved, -?\d+ % of the training time', text)
    # 3 evaluations of raw and EMA weights at 32 px; 24 px after epoch 2 and the last; the fit check every time
    assert re.search(r'evaluation: about .+, \d+\.\d % of the run\'s estimated time \(3 evaluations; 32 px x 6, '
                     r'24 px x 4, fit check x 3 passes\)', text), text


def test_dry_run_times_a_probe_batch_and_scales_it_when_a_micro_batch_is_slow(write_recipe, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setattr(dryrun, 'PROBE_SECONDS', 0.0)  # as if one sample took longer than the budget
    assert train_main(['--recipe', str(write_recipe()), '--output', str(tmp_path / 'run'), '--dry-run']) == 0
    text = capsys.readouterr().out
    assert '(3 micro-batches of 2 timed and scaled to the per-device 16)' in text
    assert '(2 micro-batches + update)' in text and 'model compute only' in text


def test_the_dry_run_times_every_shape_warm_so_a_slow_first_call_neither_stops_the_probe_nor_flattens_the_ramp(
        built, monkeypatch):
    # on an H200 the first call at batch 2 took seconds (cuDNN autotuning): the probe stopped there and scaled a
    # latency-bound time, the same img/s at every ramp size
    run = built(RAMP)
    clock = FakeDeviceClock(run.model)
    monkeypatch.setattr(dryrun, 'synchronized_time', lambda device: clock.now)
    text = '\n'.join(dryrun.benchmark_lines(run))
    assert '(mean of 3 micro-batches of 16)' in text, text  # the per-device batch, not a probe of 2
    step = {px: 2 * clock.forward_seconds(16, px) for px in (16, 24, 32)}  # 2 micro-batches; updates run no forward
    rates = {int(px): float(rate) for px, rate in re.findall(r'^ +(16|24|32) +1 +33% +([\d.]+) ', text, re.M)}
    assert rates == pytest.approx({px: 32 / seconds for px, seconds in step.items()}, abs=0.5), text
    assert rates[16] > rates[24] > rates[32]
    saved = 1 - sum(step.values()) / (3 * step[32])
    assert f'saved, {100 * saved:.0f} % of the training time' in text, text


def test_epoch_summary_marks_ema_numbers_while_the_ema_is_warming_up(built):
    run = built({'ema': {'decay': 0.99, 'warmup': False}})
    warm = 1 + math.ceil(math.log(0.5) / math.log(0.99))  # the EMA copies the model at step 1, then averages
    row = {'epoch': 0, 'step': 4, 'lr': 0.001, 'train_loss': 1.3, 'top1': 40.0, 'ema_top1': 25.0}
    assert diagnostics.epoch_summary(run, row).endswith(f'ema_top1 25.00  (EMA warming up until step {warm})')
    assert 'warming up' not in diagnostics.epoch_summary(run, {**row, 'step': warm})
    assert 'warming up' not in diagnostics.epoch_summary(built({'ema': {'decay': 0.99, 'warmup': True}}), row)


def test_a_flat_run_warns_with_its_own_numbers(write_recipe, tmp_path, capsys):
    # the same 32 images, uncropped and unflipped, every epoch: with no dropout the train loss is flat for a reason
    # (dropout or random crops would move it by 20 % from epoch to epoch at this lr)
    recipe = write_recipe({'data': {'img_size': 56, 'synthetic_train_size': 32, 'synthetic_val_size': 16},
                           'aug': {'scale': [1.0, 1.0], 'ratio': [1.0, 1.0], 'hflip': 0.0}, 'optim': {'lr': 1e-9},
                           'schedule': {'epochs': 3, 'warmup_epochs': 0},
                           'ema': {'warmup': False, 'decay': 0.99}, 'train': {'batch_size': 32}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning: top-1')]
    assert len(warnings) == 1  # only after the third evaluation
    warning = warnings[0]
    assert 'over the last 3 evaluations (epochs 1-3' in warning
    assert 'train loss is flat too' in warning and 'peak lr 1e-09' in warning
    assert '56 px gives a 2x2 final feature map (model stride 32)' in warning
    assert 'half-life of 69 steps and has averaged 2 of the 3 steps done' in warning


def test_stuck_at_chance_names_the_causes_that_apply(built):
    run = built({'model': {'drop_path_rate': 0.3, 'drop_rate': 0.5}})
    run.state.history = history([25.0, 26.0, 24.0])
    run.state.step = 12
    [warning] = diagnostics.epoch_warnings(run)
    assert warning.startswith('top-1 stayed at chance level (25 % for 4 classes) over the last 3 evaluations')
    assert 'train loss falls (1.4000 -> 1.2000) but eval does not' in warning
    assert 'dropout 0.5, drop-path 0.3' in warning and '32 px gives a 1x1 final feature map' in warning


def test_unchanged_top1_above_chance_warns(built):
    run = built()
    run.state.history = history([61.0, 61.0, 61.02])
    [warning] = diagnostics.epoch_warnings(run)
    assert warning.startswith('top-1 did not change over the last 3 evaluations (epochs 1-3: 61.00, 61.00, 61.02)')
    run.state.history = history([61.0, 61.0, 61.0], train_loss=[1.0, 1.5, 2.0])
    [warning] = diagnostics.epoch_warnings(run)
    assert 'train loss rose (1.0000 -> 2.0000): peak lr 0.002' in warning and 'likely too high' in warning


def test_an_ema_that_lags_a_learning_model_gets_its_own_warning(built):
    run = built({'ema': {'decay': 0.999, 'warmup': False}})
    run.state.history = history([40.0, 55.0, 70.0], ema_top1=[25.0, 25.0, 25.0])
    run.state.step = 12
    [warning] = diagnostics.epoch_warnings(run)
    assert warning.startswith('EMA top-1 stayed at chance level')
    assert 'while raw top-1 moved (40.00 -> 70.00)' in warning
    assert 'half-life of 693 steps and has averaged 11 of the 12 steps done' in warning


def test_only_a_stalled_top1_warns(built):
    run = built()
    run.state.history = history([40.0, 40.0, 40.0], ema_top1=[35.0, 50.0, 66.0])
    assert len(diagnostics.epoch_warnings(run)) == 1
    run.state.history = history([40.0, 55.0, 70.0], ema_top1=[35.0, 50.0, 66.0])  # healthy
    assert diagnostics.epoch_warnings(run) == []
    run.state.history = history([25.0, 25.0])  # too early to judge
    assert diagnostics.epoch_warnings(run) == []
    flat = history([25.0, 25.0, 25.0])
    flat[-1] = {key: value for key, value in flat[-1].items() if key != 'top1'}  # last epoch not evaluated
    run.state.history = flat
    assert diagnostics.epoch_warnings(run) == []


# ---------------------------------------------------------------------------------------------- wild logits

def two_channel_model(flat_variance: float) -> torch.nn.Sequential:
    """Red and green each into a BatchNorm channel, then 3 logits; the green channel's running variance is
    `flat_variance` (0: it never varied in training)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1, bias=False), torch.nn.BatchNorm2d(2),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])[:, :, None, None])
        model[1].running_var.copy_(torch.tensor([1.0, flat_variance]))
        model[4].weight.copy_(torch.tensor([[10.0, 10.0], [0, -10.0], [-10.0, 0]]))
        model[4].bias.zero_()
    return model


def test_evaluation_counts_images_with_wild_logits_and_the_share_of_the_loss_they_carry():
    """Four images, the last one green: through a channel whose running variance is 0 it is scaled by
    1/sqrt(1e-5) = 316, its logits reach ~3,000 and its loss alone is most of the mean."""
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:3, 0] = torch.tensor([50, 100, 150], dtype=torch.uint8)[:, None, None]
    images[3, 1] = 255
    targets = torch.tensor([0, 0, 0, 2])
    normalize = data.DeviceNormalize(data.Normalization((0.0,) * 3, (1.0,) * 3), torch.device('cpu'), False)
    world = distributed.init('cpu')
    model = two_channel_model(0.0)
    wild = evaluate(model, [(images, targets, 0)], normalize, world, 'none')
    losses = torch.nn.functional.cross_entropy(model(images / 255.0), targets, reduction='none')  # in eval mode
    assert wild['wild_logits'] == 1 and wild['loss'] == pytest.approx(losses.mean().item())
    assert wild['wild_loss'] == pytest.approx(losses[3].item() / 4) and wild['wild_loss'] > 0.9 * wild['loss']
    tame = evaluate(two_channel_model(1.0), [(images, targets, 0)], normalize, world, 'none')
    assert tame['wild_logits'] == 0 and tame['wild_loss'] == 0 and tame['loss'] < 20


def test_wild_logits_are_warned_once_when_they_start_naming_the_flat_batchnorm_channels(built):
    run = built({'ema': {'enabled': False}})
    layers = [(name, layer) for name, layer in run.module.named_modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    name, layer = layers[1]
    with torch.no_grad():
        layer.running_var[:3] = 5.6e-45  # as measured in the quickstart's blocks.3.*.dw_mid.bn
    rows = history([60.0, 70.0, 80.0])
    for row, count in zip(rows, (0, 4, 4)):
        row.update(loss=57.4 if count else 0.5, wild_logits=count, wild_loss=55.0 if count else 0.0)
    run.state.history = rows[:2]
    [warning] = diagnostics.wild_logit_warnings(run)
    assert warning.startswith('raw weights, epoch 2: 4 evaluation image(s) gave a logit beyond 1000 and carry 55 '
                              'of the mean eval loss 57.4 (the other images: 2.4)')
    assert f'1/sqrt(eps) = 316 per layer: {name} (3 of {layer.num_features})' in warning
    run.state.history = rows  # still there an epoch later: said once
    assert diagnostics.wild_logit_warnings(run) == []
    with torch.no_grad():
        layer.running_var.fill_(1.0)
    run.state.history = rows[:2]
    assert 'no BatchNorm channel has a running variance of ~0' in diagnostics.wild_logit_warnings(run)[0]


def test_validate_says_how_many_images_had_wild_logits_and_their_share_of_the_loss(tmp_path, capsys):
    from types import SimpleNamespace

    from mnv_train.cli import report_validation
    from mnv_train.evaluation import EvalSetting
    recipe = SimpleNamespace(model=SimpleNamespace(name='tiny'), data=SimpleNamespace(val_split='val', dataset='x'))
    weights = SimpleNamespace(recipe=recipe, path=tmp_path / 'last.pt', kind='ema')
    setting = EvalSetting(img_size=64, crop_pct=1.0, crop_source='recipe', expected_top1=None)
    for wild, wild_loss in ((23, 36.56), (0, 0.0)):
        result = {'top1': 92.1, 'top5': 99.56, 'loss': 36.85 if wild else 0.29, 'count': 10000, 'wild_logits': wild,
                  'wild_loss': wild_loss}
        report_validation(weights, setting, result, 0, str(tmp_path / 'result.json'))
        warnings = [line for line in capsys.readouterr().err.splitlines() if 'logit beyond' in line]
        assert warnings == ([] if not wild else [
            'warning: 23 evaluation image(s) gave a logit beyond 1000 and carry 36.56 of the mean eval loss 36.85 '
            '(the other images: 0.29); top-1 hardly depends on them, the loss curves do'])
