"""torchrun with 2 CPU processes (gloo), SLURM variables, world-size changes on resume."""
import subprocess
import sys

import pytest

from mnv_train import checkpoint, distributed
from mnv_train.cli import train_main

from conftest import REPO


def torchrun(*args, nproc=2):
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               str(REPO / 'train.py'), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_two_process_ddp_run_keeps_the_global_batch_and_counts_every_eval_sample(write_recipe, tmp_path):
    recipe = write_recipe({'train': {'global_batch_size': 32, 'batch_size': 16}, 'data': {'num_workers': 1}})
    out = tmp_path / 'ddp'
    result = torchrun('--recipe', recipe, '--output', out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('epoch 2/2') == 1  # rank 0 alone reports
    assert '2 process(es) x 16 per device x 1 accumulation = 32' in result.stdout
    payload = checkpoint.load(out / 'checkpoints' / 'last.pt')
    assert payload['plan'] == {'world_size': 2, 'per_device': 16, 'accum_steps': 1, 'global_batch': 32}
    assert payload['state']['step'] == 8 and payload['state']['samples_seen'] == 256
    # 48 validation images over 2 ranks: top-1 is a whole number of images out of 48
    top1 = payload['state']['history'][-1]['top1']
    assert round(top1 * 48 / 100, 6) == round(top1 * 48 / 100)


def test_resume_on_fewer_processes_keeps_global_batch_and_schedule_position(write_recipe, tmp_path):
    recipe = write_recipe({'train': {'global_batch_size': 32, 'batch_size': 16}})
    out = tmp_path / 'shrink'
    result = torchrun('--recipe', recipe, '--output', out, '--max-steps', 6)
    assert result.returncode == 0, result.stderr
    stopped = checkpoint.load(out / 'checkpoints' / 'last.pt')
    assert stopped['state']['step'] == 6 and stopped['plan']['world_size'] == 2
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto']) == 0
    final = checkpoint.load(out / 'checkpoints' / 'last.pt')
    assert final['plan'] == {'world_size': 1, 'per_device': 16, 'accum_steps': 2, 'global_batch': 32}
    assert final['state']['step'] == 8 and final['state']['samples_seen'] == 256
    assert [row['epoch'] for row in final['state']['history']] == [0, 1]


def test_resume_with_another_global_batch_follows_samples_seen(write_recipe, tmp_path, capsys):
    recipe = write_recipe()
    out = tmp_path / 'rebatch'
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--max-steps', '2', '--quiet']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto',
                       '--global-batch', '64', '--batch-size', '32']) == 0
    captured = capsys.readouterr()
    assert 'global batch changed 32 -> 64: resuming at step 1 by samples seen (64)' in captured.err
    final = checkpoint.load(out / 'checkpoints' / 'last.pt')
    assert final['state']['samples_seen'] == 256 and final['state']['step'] == 4


def test_slurm_variables_become_torchrun_ones(monkeypatch):
    env = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1', 'SLURM_JOB_ID': '4242',
           'SLURM_JOB_NODELIST': 'gpu[07-08,10],login1'}
    assert distributed._env_from_slurm(env) == {'RANK': '5', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1',
                                                'MASTER_ADDR': 'gpu07', 'MASTER_PORT': str(20000 + 4242)}
    assert distributed.expand_slurm_nodelist('gpu[07-08,10],login1') == ['gpu07', 'gpu08', 'gpu10', 'login1']
    assert distributed._env_from_slurm({**env, 'RANK': '0'}) == {}  # torchrun already set things up
    assert distributed._env_from_slurm({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}) == {}


@pytest.mark.parametrize('device', ['cuda'])
def test_asking_for_cuda_without_one_is_a_user_error(device):
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(Exception, match='no CUDA device'):
        distributed.init(device)
