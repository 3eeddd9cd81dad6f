"""Checkpoint averaging: keep-top-k pruning, the average of the best k, its evaluation, refusals."""
import json
import subprocess
import sys

import pytest
import torch

from mnv_train import average, checkpoint
from mnv_train.cli import validate_main

from conftest import REPO, train_tiny

THREE_EPOCHS = {'data': {'synthetic_train_size': 64}, 'schedule': {'epochs': 3, 'warmup_epochs': 0.5},
                'train': {'keep_checkpoints': 10}}


def save_step(checkpointer, step, evaluated_at=None, **metrics):
    metrics = {'step': step if evaluated_at is None else evaluated_at, **metrics}
    checkpointer.save({'model': {'w': torch.tensor(float(step))}}, {'step': step, 'metrics': metrics}, False)


def kept_steps(directory):
    return sorted(int(p.stem.split('-')[1]) for p in directory.glob('step-*.pt'))


def test_pruning_keeps_the_best_evaluated_checkpoints_by_raw_and_ema_top1(tmp_path):
    checkpointer = checkpoint.Checkpointer(tmp_path, keep=1, is_writer=True, keep_best=2)
    for step, top1, ema_top1 in [(1, 50, 10), (2, 80, 20), (3, 60, 95), (4, 90, 30), (5, 40, 40)]:
        save_step(checkpointer, step, top1=top1, ema_top1=ema_top1)
    save_step(checkpointer, 6, evaluated_at=5, top1=40, ema_top1=40)  # mid-epoch: the metrics are not its own
    save_step(checkpointer, 7)  # an epoch without evaluation
    assert kept_steps(tmp_path) == [2, 3, 4, 5, 7]  # top1: 4, 2; ema_top1: 3, 5; newest: 7
    assert [path.name for _, path in checkpointer.ranked('top1')] == [f'step-0000000{s}.pt' for s in (4, 2, 3, 5)]

    plain = checkpoint.Checkpointer(tmp_path / 'plain', keep=2, is_writer=True)
    for step in range(1, 5):
        save_step(plain, step, top1=100 - step)
    assert kept_steps(tmp_path / 'plain') == [3, 4]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A tiny run with EMA and a checkpoint with eval metrics at each of its 3 epochs."""
    return train_tiny(tmp_path_factory.mktemp('average'), THREE_EPOCHS, name='three')[1]


def test_average_of_the_top_k_is_evaluated_and_saved(run_dir, capsys):
    ranked = checkpoint.Checkpointer(run_dir / 'checkpoints', 1, False).ranked('ema_top1')
    assert len(ranked) == 3
    output = run_dir / 'avg.pt'
    result = subprocess.run([sys.executable, '-m', 'mnv_train.average', str(run_dir), '--top-k', '2', '--output',
                             str(output)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    steps = [checkpoint.read_manifest(path)['step'] for _, path in ranked[:2]]
    assert f'averaged 2 checkpoint(s) by ema_top1: step {steps[0]} ({ranked[0][0]:.2f}), step {steps[1]}' \
        in result.stdout

    saved, manifest = checkpoint.load(output), checkpoint.read_manifest(output)
    first, second = (checkpoint.load(path)['ema'] for _, path in ranked[:2])
    for key, value in saved['model'].items():
        if value.is_floating_point():
            assert torch.allclose(value.double(), (first[key].double() + second[key].double()) / 2), key
        else:  # BatchNorm batch counters
            assert torch.equal(value, first[key]), key
    assert saved['ema'] is None and saved['recipe']['name'] == 'three'
    assert [s['step'] for s in manifest['averaged']['checkpoints']] == steps
    capsys.readouterr()
    assert validate_main([str(output), '--json', str(run_dir / 'avg-eval.json')]) == 0
    evaluated = json.loads((run_dir / 'avg-eval.json').read_text())
    assert evaluated['top1'] == pytest.approx(manifest['metrics']['top1'])
    assert evaluated['weights'] == 'ema'  # an average of EMA weights is called so, where it is read back
    assert validate_main([str(output), '--weights', 'raw']) == 2
    assert f'checkpoint {output} holds no raw weights (an average of EMA weights)' in capsys.readouterr().err


def test_raw_weights_are_ranked_by_raw_top1(run_dir, capsys):
    assert average.main([str(run_dir), '--top-k', '1', '--weights', 'raw', '--output', str(run_dir / 'raw.pt')]) == 0
    best_score, best_path = checkpoint.Checkpointer(run_dir / 'checkpoints', 1, False).ranked('top1')[0]
    saved, best = checkpoint.load(run_dir / 'raw.pt')['model'], checkpoint.load(best_path)['model']
    assert all(torch.equal(value, best[key]) for key, value in saved.items())
    assert checkpoint.read_manifest(run_dir / 'raw.pt')['metrics']['top1'] == pytest.approx(best_score)
    assert validate_main([str(run_dir / 'raw.pt'), '--json', str(run_dir / 'raw-eval.json')]) == 0
    assert json.loads((run_dir / 'raw-eval.json').read_text())['weights'] == 'raw'


def test_refusals_are_one_line_and_lose_nothing(run_dir, tmp_path, capsys):
    existing = run_dir / 'taken.pt'
    existing.write_bytes(b'keep me')
    for argv, message in [
        ([str(run_dir), '--top-k', '5'], 'holds 3 checkpoint(s) evaluated for ema_top1, fewer than --top-k 5; set '
                                         'train.keep_best_checkpoints to at least 5'),
        ([str(run_dir), '--top-k', '2', '--output', str(existing)], f'{existing} already exists; pass --force'),
        ([str(tmp_path), '--top-k', '2'], f'{tmp_path} is not a run folder'),
    ]:
        assert average.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and err.count('\n') == 1, err
    assert existing.read_bytes() == b'keep me'
