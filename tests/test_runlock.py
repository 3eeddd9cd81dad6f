"""One writer per run folder: the lock, stale locks, and ranks that stop when their torchrun agent dies."""
import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest
import yaml

from mnv_train import checkpoint
from mnv_train.cli import train_main, validate_main
from mnv_train.errors import UserError
from mnv_train.runlock import LOCK_NAME, RunLock

from conftest import REPO, TINY, assert_same_training_state, merge, wait_for

LONGER = {'data': {'synthetic_train_size': 256}, 'train': {'checkpoint_every_steps': 2, 'log_every': 100}}


def start(recipe, out, *extra):
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), '--recipe', str(recipe), '--output', str(out),
                             '--quiet', '--device', 'cpu', *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def final(out):
    return checkpoint.load(out / 'checkpoints' / 'last.pt')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """(recipe, final checkpoint of an undisturbed run of it, its run folder), trained once for this module's
    tests; validate may add its result files to the folder, nothing else writes there."""
    root = tmp_path_factory.mktemp('reference')
    recipe = root / 'tiny.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, LONGER)))
    assert train_main(['--recipe', str(recipe), '--output', str(root / 'run'), '--quiet']) == 0
    return recipe, final(root / 'run'), root / 'run'


def write_lock(folder, host, pid, heartbeat_age):
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (folder / LOCK_NAME).write_text(json.dumps({'host': host, 'pid': pid, 'started': now - 3600,
                                                'heartbeat': now - heartbeat_age}))


def test_a_second_job_on_a_folder_in_use_is_refused_and_the_first_finishes_unharmed(reference, tmp_path, capsys):
    recipe, expected, _ = reference
    out = tmp_path / 'shared'
    first = start(recipe, out)
    wait_for(out / 'checkpoints' / 'step-00000002.pt.json', first)
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto', '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {out} is in use by pid {first.pid} on {socket.gethostname()} since ')
    assert 'heartbeat' in err and len(err.splitlines()) == 1
    assert first.wait(timeout=300) == 0, first.communicate()
    assert_same_training_state(final(out), expected)
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_after_a_kill_9_the_next_job_takes_over_the_stale_lock_and_resumes_exactly(reference, tmp_path, capsys):
    recipe, expected, _ = reference
    out = tmp_path / 'crashed'
    holder = start(recipe, out)
    wait_for(out / 'checkpoints' / 'step-00000004.pt.json', holder)
    holder.kill()
    holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())['pid'] == holder.pid  # left behind by the crash
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto', '--quiet']) == 0
    assert f'took over the stale lock of {out}, held by pid {holder.pid} on {socket.gethostname()}' in \
        capsys.readouterr().err
    assert_same_training_state(final(out), expected)


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_is(tmp_path):
    write_lock(tmp_path / 'run', 'node17', 4242, heartbeat_age=20)
    with pytest.raises(UserError, match=r'is in use by pid 4242 on node17 since \d\d:\d\d \(heartbeat 20 s ago\)'):
        RunLock(tmp_path / 'run', stale_minutes=10).acquire()
    write_lock(tmp_path / 'run', 'node17', 4242, heartbeat_age=11 * 60)
    lock = RunLock(tmp_path / 'run', stale_minutes=10)
    assert lock.acquire().startswith('took over the stale lock')
    assert json.loads((tmp_path / 'run' / LOCK_NAME).read_text())['pid'] == os.getpid()
    lock.release()
    assert not (tmp_path / 'run' / LOCK_NAME).exists()


def test_force_unlock_takes_over_a_live_lock_with_a_warning(write_recipe, tmp_path, capsys):
    out = tmp_path / 'run'
    write_lock(out, 'node17', 4242, heartbeat_age=1)
    recipe = write_recipe()
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 2
    assert '--force-unlock' in capsys.readouterr().err
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--force-unlock']) == 0
    assert 'took over the forced lock of' in capsys.readouterr().err


def test_a_job_whose_lock_was_taken_over_stops_at_its_next_heartbeat_without_writing_it(tmp_path):
    first = RunLock(tmp_path / 'run', stale_minutes=10)
    first.acquire()
    assert RunLock(tmp_path / 'run', stale_minutes=10).acquire(force=True).startswith('took over the forced lock')
    write_lock(tmp_path / 'run', 'node17', 4242, heartbeat_age=1)  # the new holder, as another host would write it
    first.last_beat = 0  # its heartbeat is due
    with pytest.raises(UserError, match=r'lost its lock, now held by pid 4242 on node17'):
        first.heartbeat()
    assert json.loads((tmp_path / 'run' / LOCK_NAME).read_text())['pid'] == 4242  # left as the new holder wrote it
    first.release()
    assert (tmp_path / 'run' / LOCK_NAME).exists()


def test_the_lock_is_held_while_the_report_is_written(write_recipe, tmp_path, monkeypatch):
    from mnv_train import cli
    held = []

    def write_report(run_dir):
        held.append((run_dir / LOCK_NAME).exists())
        return original(run_dir)
    original = cli.write_report
    monkeypatch.setattr(cli, 'write_report', write_report)
    assert train_main(['--recipe', str(write_recipe()), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    assert held == [True] and not (tmp_path / 'run' / LOCK_NAME).exists()


def test_validate_reads_a_checkpoint_of_a_locked_run_folder(reference):
    out = reference[2]
    lock = RunLock(out, stale_minutes=10)
    lock.acquire()  # as a job still training there would hold it
    try:
        assert validate_main([str(out / 'checkpoints' / 'last.pt')]) == 0
    finally:
        lock.release()


def wait_for_exit(pids: list[int], timeout: float = 300):
    """Until every process in pids has ended (zombies included), woken by the kernel rather than a poll loop;
    the timeout only keeps a hung test from hanging the suite."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            assert select.select([fd], [], [], timeout)[0], f'pid {pid} outlived its agent by {timeout} s'
        finally:
            os.close(fd)


def newest_step(folder) -> int:
    return max(int(p.name[5:13]) for p in folder.glob('step-*.pt.json'))


def test_ranks_stop_within_two_steps_when_their_torchrun_agent_is_killed(write_recipe, tmp_path):
    recipe = write_recipe({'data': {'synthetic_train_size': 2048}, 'schedule': {'epochs': 4},
                           'train': {'checkpoint_every_steps': 1, 'log_every': 1000}})
    out = tmp_path / 'orphans'
    agent = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                              str(REPO / 'train.py'), '--recipe', str(recipe), '--output', str(out), '--quiet',
                              '--device', 'cpu'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / 'checkpoints' / 'step-00000002.pt.json', agent)
    ranks = [int(p) for p in open(f'/proc/{agent.pid}/task/{agent.pid}/children').read().split()]
    assert len(ranks) == 2
    seen = newest_step(out / 'checkpoints')  # a checkpoint every step: where the run stands at the kill
    agent.kill()
    agent.wait()
    wait_for_exit(ranks)
    # the step in flight, plus the one begun if rank 0 was still saving `seen + 1` when the agent died
    stopped = newest_step(out / 'checkpoints')
    assert seen < stopped <= seen + 2, (seen, stopped)
    # the checkpoint written after the agent's death is complete: it loads, and last.pt is it
    assert_same_training_state(checkpoint.load(out / 'checkpoints' / f'step-{stopped:08d}.pt',
                                               needs=checkpoint.RUN_PARTS), final(out))
    assert not (out / LOCK_NAME).exists()
