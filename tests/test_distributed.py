"""torchrun with 2 CPU processes (gloo), SLURM variables, world-size changes on resume."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mnv_train import checkpoint, distributed, resume
from mnv_train.cli import train_main, validate_main
from mnv_train.errors import UserError

from conftest import REPO, TINY, assert_same_training_state, merge, wait_for


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


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    """One 2-process run of the tiny recipe (8 steps, a checkpoint every 2, dist_bn reduce, a loader worker per
    rank) that several tests read: (recipe, run folder, torchrun's CompletedProcess). Never written to."""
    root = tmp_path_factory.mktemp('ddp')
    recipe = root / 'tiny.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, {'train': {'global_batch_size': 32, 'batch_size': 16,
                                                            'checkpoint_every_steps': 2, 'dist_bn': 'reduce'},
                                                  'data': {'num_workers': 1}})))
    result = torchrun('--recipe', recipe, '--output', root / 'run')
    assert result.returncode == 0, result.stderr
    return recipe, root / 'run', result


def validate_alone(last: Path, json_path: Path) -> dict:
    """validate.py's result for the raw weights of `last` on one process."""
    assert validate_main([str(last), '--weights', 'raw', '--device', 'cpu', '--json', str(json_path)]) == 0
    return json.loads(json_path.read_text())


def test_two_process_ddp_run_keeps_the_global_batch_and_counts_every_eval_sample(ddp_run, tmp_path):
    _, out, result = ddp_run
    assert result.stdout.count('epoch 2/2') == 1  # rank 0 alone reports
    assert '2 process(es) x 16 per device x 1 accumulation = 32' in result.stdout
    payload = checkpoint.load(out / 'checkpoints' / 'last.pt')
    assert payload['plan'] == {'world_size': 2, 'per_device': 16, 'accum_steps': 1, 'global_batch': 32}
    assert payload['state']['step'] == 8 and payload['state']['samples_seen'] == 256
    # the 2-rank evaluation (the same statistics on both ranks: dist_bn reduce) gives what one process counts over
    # all 48 images; half of them would give another loss and, almost surely, another top-1
    trained = payload['state']['history'][-1]
    alone = validate_alone(out / 'checkpoints' / 'last.pt', tmp_path / 'eval.json')
    assert alone['top1'] == trained['top1'] and alone['loss'] == pytest.approx(trained['loss'], abs=1e-5)


def test_resume_on_fewer_processes_keeps_global_batch_and_schedule_position(ddp_run, tmp_path):
    recipe, shared, _ = ddp_run
    out = tmp_path / 'shrink'
    shutil.copytree(shared, out)
    for path in (out / 'checkpoints').glob('step-00000008.pt*'):  # the run as it stood at step 6, on 2 ranks
        path.unlink()
    stopped = checkpoint.Checkpointer(out / 'checkpoints', 2, True).latest_valid()[1]
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
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(UserError, match='no CUDA device'):
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
    rank_1 = worker_pids(process.pid)[1]
    seen = max(int(p.name[5:13]) for p in (out / 'checkpoints').glob('step-*.pt.json'))  # done before the signal
    os.kill(rank_1, signal.SIGTERM)  # rank 1 only, as a node-local preemption would
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert 'stop requested on rank 1' in stdout and '--resume auto' in stdout
    stopped = checkpoint.load(out / 'checkpoints' / 'last.pt')['state']['step']
    # the step in flight when the signal came, or the next one if the vote after it had already begun; no log
    # point (log_every 1000) or epoch end (step 32) in between to wait for
    assert seen < stopped <= seen + 2, (seen, stopped)
    assert torchrun('--recipe', recipe, '--output', out, '--quiet', '--resume', 'auto').returncode == 0
    assert_same_training_state(tmp_path / 'whole' / 'checkpoints' / 'last.pt', out / 'checkpoints' / 'last.pt')


@pytest.mark.parametrize('dist_bn', ['reduce', 'broadcast'])
def test_batchnorm_statistics_are_averaged_over_ranks_before_evaluation_and_saving(ddp_run, write_recipe, tmp_path,
                                                                                 dist_bn):
    out = ddp_run[1]  # dist_bn reduce
    if dist_bn == 'broadcast':
        out = tmp_path / dist_bn
        recipe = write_recipe({'train': {'dist_bn': dist_bn}, 'schedule': {'epochs': 1}})
        assert torchrun('--recipe', recipe, '--output', out, '--quiet').returncode == 0
    trained = checkpoint.load(out / 'checkpoints' / 'last.pt')['state']['history'][-1]  # evaluated on 2 ranks
    saved = validate_alone(out / 'checkpoints' / 'last.pt', tmp_path / 'eval.json')  # the saved weights, 1 process
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


def draws() -> tuple:
    return random.random(), np.random.random(), torch.rand(3).tolist()


def test_a_checkpoint_with_more_cuda_generator_states_than_gpus_loads(monkeypatch):
    state = resume.rng_state()
    assert 'cuda' not in state  # reseeded every micro-step, so never saved
    expected = draws()
    assert draws() != expected  # the generators moved on
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda _states: pytest.fail('restored CUDA states'))
    resume.set_rng_state({**state, 'cuda': [torch.zeros(16, dtype=torch.uint8)] * 8})  # from an 8-GPU node
    assert draws() == expected  # Python, NumPy and torch generators are back where the checkpoint left them


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


def test_a_store_new_to_each_attempt_gets_no_prefix_so_differently_counted_nodes_meet(monkeypatch):
    """TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 of each attempt hosts a new store, and an agent that restarted
    its workers for a peer's rejoin has not counted a restart: the ranks must meet whatever their counts."""
    host = torch.distributed.TCPStore('127.0.0.1', 0, 1, is_master=True, wait_for_workers=False)
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(host.port))
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'False')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    uncounted = distributed.attempt_store(1, 2, timedelta(seconds=5))  # rank 1: a client of the host above
    uncounted.set('rank_1_address', 'here')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    assert distributed.attempt_store(1, 2, timedelta(seconds=5)).get('rank_1_address') == b'here'


def test_restarts_across_nodes_on_the_shared_store_are_named():
    shared = {'TORCHELASTIC_USE_AGENT_STORE': 'True', 'GROUP_WORLD_SIZE': '2', 'TORCHELASTIC_MAX_RESTARTS': '1'}
    assert distributed.restarts_share_a_store(shared)
    for safe in ({'TORCHELASTIC_USE_AGENT_STORE': 'False'}, {'GROUP_WORLD_SIZE': '1'},
                 {'TORCHELASTIC_MAX_RESTARTS': '0'}):
        assert not distributed.restarts_share_a_store({**shared, **safe})
