"""Exact resume, preemption, crash-safe checkpoints, non-finite losses, hostile files."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from mnv_train import checkpoint
from mnv_train.cli import train_main, validate_main
from mnv_train.errors import UserError

from conftest import REPO, TINY, assert_same_training_state, merge, run_cli, wait_for

LONGER = {'data': {'synthetic_train_size': 256},  # 8 steps an epoch, 16 in all
          'aug': {'auto_augment': 'rand-m9-mstd0.5-inc1', 'reprob': 0.25, 'mixup': 0.8, 'cutmix': 1.0},
          'model': {'drop_rate': 0.2, 'drop_path_rate': 0.1},
          'train': {'checkpoint_every_steps': 3, 'log_every': 4}}


def weights(run_dir, name='last.pt'):
    return checkpoint.load(run_dir / 'checkpoints' / name)


def start_training(recipe, out, *extra):
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), '--recipe', str(recipe), '--output', str(out),
                             '--quiet', *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run of the LONGER recipe: (recipe path, final checkpoint), trained once per worker count for
    every test of this module that compares against it."""
    runs = {}

    def make(workers):
        if workers not in runs:
            root = tmp_path_factory.mktemp(f'reference-{workers}')
            recipe = root / f'w{workers}.yaml'
            recipe.write_text(yaml.safe_dump(merge(TINY, {**LONGER, 'data': {**LONGER['data'],
                                                                                'num_workers': workers}})))
            assert train_main(['--recipe', str(recipe), '--output', str(root / 'run'), '--quiet']) == 0
            runs[workers] = recipe, weights(root / 'run')
        return runs[workers]
    return make


@pytest.mark.parametrize('workers', [0, 2])
def test_kill_9_mid_epoch_then_resume_auto_is_bit_identical(reference, tmp_path, workers):
    recipe, expected = reference(workers)
    out = tmp_path / 'killed'
    process = start_training(recipe, out)
    wait_for(out / 'checkpoints' / 'step-00000012.pt.json', process)  # mid second epoch
    process.kill()
    assert process.wait() == -signal.SIGKILL
    # step 12's own file: the kill may land while last.pt and its manifest are relinked to a newer step, a pair
    # that --resume auto passes over (that case is the crash-during-save test's)
    assert weights(out, 'step-00000012.pt')['state']['samples_in_epoch'] > 0
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto', '--quiet']) == 0
    assert_same_training_state(weights(out), expected)


def test_sigterm_saves_a_mid_epoch_checkpoint_and_exits_cleanly(reference, tmp_path):
    recipe, expected = reference(0)
    out = tmp_path / 'preempted'
    process = start_training(recipe, out, '--set', 'train.checkpoint_every_steps=0')
    wait_for(out / 'checkpoints' / 'step-00000008.pt.json', process)  # end of the first epoch
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert 'received SIGTERM' in stdout and '--resume auto' in stdout
    stopped = weights(out)
    assert 8 < stopped['state']['step'] < 16
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto', '--quiet',
                       '--set', 'train.checkpoint_every_steps=0']) == 0
    assert_same_training_state(weights(out), expected)


def test_max_steps_slices_a_run_and_resume_from_an_epoch_end_matches(reference, tmp_path, capsys):
    recipe, expected = reference(0)
    out = tmp_path / 'sliced'
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--max-steps', '8']) == 0
    assert weights(out)['state']['step'] == 8
    capsys.readouterr()
    # the same command line again (a job script resubmitted): it says so and trains nothing, not one step more
    again = ['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto', '--max-steps', '8']
    assert train_main(again) == 0 and weights(out)['state']['step'] == 8
    assert 'the run is at step 8, already at --max-steps 8: nothing to train' in capsys.readouterr().out
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']) == 0
    assert_same_training_state(weights(out), expected)


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys):
    recipe, expected = reference(0)
    out = tmp_path / 'corrupt'
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--max-steps', '10']) == 0
    newest = out / 'checkpoints' / 'step-00000010.pt'
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: torch.load alone would not notice
    newest.write_bytes(bytes(data))
    (out / 'checkpoints' / '.step-00000011.pt.tmp-999').write_bytes(b'half a checkpoint')  # a crashed save
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']) == 0
    err = capsys.readouterr().err
    assert 'step-00000010.pt is truncated or corrupt' in err and 'falling back' in err
    assert_same_training_state(weights(out), expected)


# Runs train_main in a child that dies (os._exit, as kill -9: no cleanup runs) at one point of the real
# checkpoint.atomic_write of the step-6 checkpoint: os.replace is the seam, atomic_write itself runs unchanged.
DIE_WHILE_SAVING = """
import os, sys
from mnv_train.cli import train_main
target, after_rename = sys.argv[1], sys.argv[2] == 'after'
real_replace = os.replace

def replace(source, destination):
    if os.path.basename(destination) == target and not after_rename:
        os._exit(137)
    real_replace(source, destination)
    if os.path.basename(destination) == target:
        os._exit(137)

os.replace = replace
sys.exit(train_main(sys.argv[3:]))
"""


@pytest.mark.parametrize('target, when, left', [
    ('step-00000006.pt', 'before', '.step-00000006.pt.tmp-'),  # checkpoint written to its temp file, not renamed
    ('step-00000006.pt', 'after', 'step-00000006.pt'),  # renamed into place, its manifest not yet written
    ('step-00000006.pt.json', 'before', '.step-00000006.pt.json.tmp-'),  # manifest in its temp file, not renamed
], ids=['temp file written', 'renamed', 'manifest not yet written'])
def test_a_crash_during_save_leaves_the_previous_checkpoint_to_resume_auto(write_recipe, tmp_path, capfd,
                                                                           target, when, left):
    out = tmp_path / 'crash'
    recipe = write_recipe({'train': {'checkpoint_every_steps': 2}})
    crashed = subprocess.run([sys.executable, '-c', DIE_WHILE_SAVING, target, when, '--recipe', recipe,
                              '--output', out, '--quiet'], capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 137, crashed.stderr
    files = sorted(p.name for p in (out / 'checkpoints').iterdir())
    assert any(name.startswith(left) for name in files) and 'step-00000006.pt.json' not in files, files
    assert weights(out)['state']['step'] == 4  # last.pt still names the previous checkpoint
    capfd.readouterr()
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto', '--max-steps', '5']) == 0
    assert f'resumed from {out / "checkpoints" / "step-00000004.pt"} at epoch 2, step 4' in capfd.readouterr().out
    assert weights(out)['state']['step'] == 5


def test_keeps_the_newest_step_checkpoints_plus_last_and_best(write_recipe, tmp_path):
    out = tmp_path / 'keep'
    recipe = write_recipe({'train': {'checkpoint_every_steps': 1, 'keep_checkpoints': 2},
                           'schedule': {'epochs': 3, 'warmup_epochs': 0}})
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 0
    names = sorted(p.name for p in (out / 'checkpoints').glob('*.pt'))
    assert names == ['best.pt', 'last.pt', 'step-00000011.pt', 'step-00000012.pt']
    history = weights(out)['state']['history']
    best_epoch = max(range(3), key=lambda e: max(history[e]['top1'], history[e]['ema_top1']))
    assert weights(out, 'best.pt')['state']['epoch'] == best_epoch + 1


def test_best_is_only_replaced_by_a_better_metric(write_recipe, tmp_path):
    out = tmp_path / 'best'
    recipe = write_recipe({'optim': {'lr': 1e-12}, 'schedule': {'epochs': 3, 'warmup_epochs': 0},
                           'ema': {'enabled': False}, 'aug': {'hflip': 0.0, 'scale': [1.0, 1.0],
                                                              'ratio': [1.0, 1.0]}})
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 0
    history = weights(out)['state']['history']
    first_best = max(range(3), key=lambda e: (history[e]['top1'], -e))
    assert weights(out, 'best.pt')['state']['epoch'] == first_best + 1


def test_non_finite_loss_rolls_back_and_never_overwrites_a_good_checkpoint(write_recipe, tmp_path, capsys):
    out = tmp_path / 'nan'
    recipe = write_recipe({'ema': {'enabled': False}})
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--max-steps', '6']) == 0
    good = {p.name: p.read_bytes() for p in (out / 'checkpoints').iterdir()}
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto',
                       '--allow-recipe-change', '--set', 'optim.lr=1e30', '--set', 'train.log_every=1']) == 2
    err = capsys.readouterr().err
    assert err.count('rolling back to') == 2
    assert 'error: ' in err and 'lower optim.lr or set optim.clip_grad' in err
    assert {p.name: p.read_bytes() for p in (out / 'checkpoints').iterdir()} == good
    assert weights(out)['state']['step'] == 6


def test_a_checkpoint_with_a_code_payload_is_refused(tmp_path):
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))

    path = tmp_path / 'step-00000001.pt'
    torch.save({'format': checkpoint.FORMAT, 'model': Payload()}, path)
    checkpoint.manifest_path(path).write_text(json.dumps({
        'bytes': path.stat().st_size, 'sha256': __import__('hashlib').sha256(path.read_bytes()).hexdigest()}))
    with pytest.raises(UserError, match='refused: it holds Python objects'):
        checkpoint.load(path)
    for result in (run_cli('validate.py', path), run_cli('train.py', '--resume', path, '--output', tmp_path / 'x')):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f'error: checkpoint {path} refused: it holds Python objects')
    assert not marker.exists()


def test_resume_with_a_truncated_explicit_checkpoint_is_one_line(tmp_path, write_recipe):
    out = tmp_path / 'trunc'
    assert train_main(['--recipe', str(write_recipe()), '--output', str(out), '--quiet', '--max-steps', '2']) == 0
    path = out / 'checkpoints' / 'step-00000002.pt'
    path.write_bytes(path.read_bytes()[:1000])
    result = run_cli('train.py', '--resume', path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f'error: checkpoint {path} is truncated or corrupt (checksum does not match '
                                     f'its manifest)')
    assert validate_main([str(path)]) == 2


def test_a_lamb_run_resumes_bit_exactly(write_recipe, tmp_path):
    recipe = write_recipe({'optim': {'name': 'lamb', 'lr': 0.004, 'weight_decay': 0.03}}, name='lamb')
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'whole'), '--quiet']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'sliced'), '--quiet',
                       '--max-steps', '3']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'sliced'), '--quiet',
                       '--resume', 'auto']) == 0
    whole, sliced = weights(tmp_path / 'whole'), weights(tmp_path / 'sliced')
    group, moments = whole['optimizer']['param_groups'][0], whole['optimizer']['state'][0]
    # timm's Lamb: trust-ratio settings and a per-group step count; AdamW has none of these and counts per tensor
    assert {'trust_clip', 'always_adapt', 'grad_averaging', 'max_grad_norm'} <= group.keys(), group.keys()
    assert group['step'] == 8 and set(moments) == {'exp_avg', 'exp_avg_sq'} and whole['state']['step'] == 8
    assert_same_training_state(sliced, whole)


def test_a_run_resumed_mid_ramp_matches_the_uninterrupted_one(write_recipe, tmp_path):
    recipe = write_recipe({'schedule': {'epochs': 3, 'train_size_ramp': {'start_size': 16, 'end_epoch': 2}},
                           'aug': {'auto_augment': 'rand-m9-mstd0.5-inc1'}}, name='ramp')  # 16, 24, 32 px
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'whole'), '--quiet']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'sliced'), '--quiet',
                       '--max-steps', '6']) == 0  # mid epoch 2 of 3, at 24 px
    assert weights(tmp_path / 'sliced')['state']['samples_in_epoch'] > 0
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'sliced'), '--quiet',
                       '--resume', 'auto']) == 0
    assert_same_training_state(weights(tmp_path / 'sliced'), weights(tmp_path / 'whole'))
