"""torchrun with 2 CPU processes (gloo), SLURM variables, world-size changes on resume."""
import json
import os
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from mnv_train import checkpoint, distributed, resume
from mnv_train.cli import train_main, validate_main
from mnv_train.errors import UserError

from conftest import REPO, wait_for


def torchrun_command(*args, nproc=2, restarts=0):
    """torchrun on CPU processes (gloo), pinned to the CPU so that a runner with a GPU runs the same test."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
            f'--max-restarts={restarts}', str(REPO / 'train.py'), '--device', 'cpu', *map(str, args)]


def torchrun(*args, nproc=2):
    return subprocess.run(torchrun_command(*args, nproc=nproc), capture_output=True, text=True, timeout=600)


def worker_pids(agent_pid: int) -> dict:
    """{rank: pid} of the training processes that a torchrun agent started (read from /proc)."""
    workers = {}
    for entry in Path('/proc').iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
            environ = (entry / 'environ').read_bytes().split(b'\0')
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid:
            rank = next((v.split(b'=', 1)[1] for v in environ if v.startswith(b'RANK=')), None)
            if rank is not None:
                workers[int(rank)] = int(entry.name)
    return workers


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


def start_torchrun(*args, restarts=0):
    return subprocess.Popen(torchrun_command(*args, restarts=restarts), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


LONG_EPOCH = {'data': {'synthetic_train_size': 1024}, 'schedule': {'epochs': 1, 'warmup_epochs': 0.1},
              'train': {'log_every': 1000, 'checkpoint_every_steps': 3}}  # 32 steps, no log point


def test_sigterm_to_one_rank_stops_every_rank_within_a_step_and_resume_is_exact(write_recipe, tmp_path):
    recipe = write_recipe(LONG_EPOCH)
    assert torchrun('--recipe', recipe, '--output', tmp_path / 'whole', '--quiet').returncode == 0
    out = tmp_path / 'preempted'
    process = start_torchrun('--recipe', recipe, '--output', out, '--quiet')
    wait_for(out / 'checkpoints' / 'step-00000003.pt.json', process)
    os.kill(worker_pids(process.pid)[1], signal.SIGTERM)  # rank 1 only, as a node-local preemption would
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert 'stop requested on rank 1' in stdout and '--resume auto' in stdout
    stopped = checkpoint.load(out / 'checkpoints' / 'last.pt')['state']['step']
    assert 3 <= stopped < 24, 'the stop waited for a log point or the epoch end'  # 32 steps an epoch
    assert torchrun('--recipe', recipe, '--output', out, '--quiet', '--resume', 'auto').returncode == 0
    whole, resumed = (checkpoint.load(d / 'checkpoints' / 'last.pt') for d in (tmp_path / 'whole', out))
    for key in whole['model']:
        assert torch.equal(whole['model'][key], resumed['model'][key]), key


@pytest.mark.parametrize('dist_bn', ['reduce', 'broadcast'])
def test_batchnorm_statistics_are_averaged_over_ranks_before_evaluation_and_saving(write_recipe, tmp_path,
                                                                                 dist_bn):
    recipe = write_recipe({'train': {'dist_bn': dist_bn}, 'schedule': {'epochs': 1}})
    out = tmp_path / dist_bn
    assert torchrun('--recipe', recipe, '--output', out, '--quiet').returncode == 0
    trained = checkpoint.load(out / 'checkpoints' / 'last.pt')['state']['history'][-1]  # evaluated on 2 ranks
    assert validate_main([str(out / 'checkpoints' / 'last.pt'), '--weights', 'raw', '--device', 'cpu',
                          '--json', str(tmp_path / 'eval.json')]) == 0  # the saved weights, on one process
    saved = json.loads((tmp_path / 'eval.json').read_text())
    if dist_bn == 'reduce':  # both ranks evaluated the statistics that were saved
        assert saved['loss'] == pytest.approx(trained['loss'], abs=1e-5)
    else:  # rank 1 evaluated its own statistics, rank 0's were saved
        assert abs(saved['loss'] - trained['loss']) > 1e-4


@pytest.mark.parametrize('environment, device, message', [
    ({'LOCAL_RANK': '1', 'LOCAL_WORLD_SIZE': '2'}, 'cuda', '2 processes on this node but 1 visible GPU(s)'),
    ({}, 'cuda:3', '--device cuda:3: this node has 1 visible GPU(s)'),
    ({'LOCAL_RANK': '0', 'LOCAL_WORLD_SIZE': '2'}, 'cuda:0', 'names one GPU, but this node runs 2 processes'),
    ({}, 'gpu', "--device 'gpu': expected auto, cpu, cuda or cuda:N"),
])
def test_more_processes_than_gpus_or_a_missing_gpu_is_named_before_nccl_starts(environment, device, message,
                                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda _device: pytest.fail('a GPU was chosen'))
    for key in ('LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'WORLD_SIZE', 'RANK'):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=re.escape(message)):
        distributed.init(device)


def test_device_cuda_n_picks_that_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    for key in ('LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'WORLD_SIZE', 'RANK'):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init('cuda:2').device == torch.device('cuda', 2) and chosen == [torch.device('cuda', 2)]


def test_a_checkpoint_with_more_cuda_generator_states_than_gpus_loads(monkeypatch):
    state = resume.rng_state()
    assert 'cuda' not in state  # reseeded every micro-step, so never saved
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda _states: pytest.fail('restored CUDA states'))
    resume.set_rng_state({**state, 'cuda': [torch.zeros(16, dtype=torch.uint8)] * 8})  # from an 8-GPU node


def test_each_torchrun_attempt_has_its_own_store_keys(monkeypatch):
    """A restarted rank must not read its peer's address from the previous attempt (torchrun keeps one store)."""
    host = torch.distributed.TCPStore('127.0.0.1', 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(host.port))
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'True')
    timeout = timedelta(seconds=5)
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    first = distributed.attempt_store(0, 1, timeout)
    first.set('rank_0_address', 'stale')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    second = distributed.attempt_store(0, 1, timeout)
    assert not second.check(['rank_0_address'])
    second.set('rank_0_address', 'fresh')
    assert first.get('rank_0_address') == b'stale'
