"""The LR range test: the real loop with an exponential LR ramp, its suggestion, plot and JSON."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from mnv_train import distributed
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.lr_find import find_lr, main, suggest_lr

from conftest import REPO

SMALL = {'data': {'synthetic_train_size': 64}}  # 2 optimizer steps per epoch: the test crosses epochs


def test_lr_find_writes_its_plot_and_json_and_suggests_an_lr_in_range(write_recipe, tmp_path, capsys):
    out = tmp_path / 'lr'
    assert main(['--recipe', str(write_recipe(SMALL)), '--steps', '12', '--min-lr', '1e-5', '--max-lr', '0.01',
                 '--output', str(out)]) == 0
    result = json.loads((out / 'lr_find.json').read_text())
    assert 1e-5 <= result['suggested_lr'] <= 0.01
    lrs = result['lrs']
    assert len(lrs) == len(result['losses']) == result['steps_done'] > 1
    assert lrs[0] == pytest.approx(1e-5) and np.allclose(np.diff(np.log(lrs)), math.log(1000) / 11)
    assert result['global_batch'] == 32 and result['recipe_peak_lr'] == pytest.approx(0.002)
    png = (out / 'lr_find.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 2000
    assert f'suggested peak lr {result["suggested_lr"]:.3g} at global batch 32' in capsys.readouterr().out


def test_the_ramp_drives_real_optimizer_steps_across_epochs(write_recipe, tmp_path):
    run = build_run(recipes.load(str(write_recipe(SMALL))), distributed.init('cpu'), tmp_path / 'run')
    assert run.steps_per_epoch == 2
    result = find_lr(run, steps=10, min_lr=1e-6, max_lr=1e-3)
    assert result['steps_done'] == 10 and run.state.step == 10
    assert run.lr() == pytest.approx(1e-3)  # the last step ran at the top of the ramp, not at the schedule's LR
    assert run.scheduler is None


def test_suggestion_is_the_steepest_descent_below_the_loss_minimum():
    lrs = list(np.logspace(-6, 0, 61))
    log_lr = np.log10(lrs)
    loss = 2 - np.tanh(2 * (log_lr + 3)) + np.where(log_lr > -1, 20 * (log_lr + 1) ** 2, 0)
    result = suggest_lr(lrs, list(loss))
    assert result['suggested_lr'] == pytest.approx(1e-3)
    assert result['min_loss_lr'] == pytest.approx(lrs[int(np.argmin(loss))])
    assert result['min_loss_lr_div10'] == pytest.approx(result['min_loss_lr'] / 10)
    rising = suggest_lr(lrs, list(np.linspace(1, 5, 61)))
    assert rising['suggested_lr'] == lrs[0] and 'never fell' in rising['method']


@pytest.mark.parametrize('args, message', [
    (['--steps', '3'], 'error: --steps 3: the range test needs at least 10'),
    (['--min-lr', '0.1', '--max-lr', '0.01'], 'error: --min-lr 0.1 and --max-lr 0.01: need 0 < min-lr < max-lr'),
    (['--set', 'optim.lr=fast'], 'error: optim.lr: expected a number'),
])
def test_bad_input_is_one_line(write_recipe, args, message, capfd):
    """capfd, not capsys: what a library writes to fd 2 reaches the user too."""
    assert main(['--recipe', str(write_recipe()), *args]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_python_dash_m_lr_find_fails_in_one_line():
    result = subprocess.run([sys.executable, '-m', 'mnv_train.lr_find', '--recipe', 'no_such_recipe'],
                            capture_output=True, text=True, cwd=REPO)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: recipe 'no_such_recipe' not found")
