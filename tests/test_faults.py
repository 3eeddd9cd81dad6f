"""Faults of long runs: recipe changes on resume, unreadable images, a full disk, a dead loader worker, a dead rank
under torchrun's elastic restarts."""
import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import torch
from PIL import Image

from mnv_train import checkpoint
from mnv_train.cli import train_main
from mnv_train.data import MAX_CONSECUTIVE_BAD

from conftest import REPO, assert_same_training_state, merge, wait_for

STEPS_OF_8 = {'data': {'synthetic_train_size': 128}, 'train': {'global_batch_size': 16, 'batch_size': 16,
                                                                'checkpoint_every_steps': 2, 'log_every': 2}}


def last(run_dir, name='last.pt'):
    return checkpoint.load(run_dir / 'checkpoints' / name)


def same_weights(a, b):
    return all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


class Output:
    """A process's output lines as they arrive, with the time each arrived, so a test can wait for one."""

    def __init__(self, stream):
        self.lines, self.changed = [], threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.reader.start()

    def _read(self, stream):
        for line in stream:
            with self.changed:
                self.lines.append((time.monotonic(), line.rstrip('\n')))
                self.changed.notify_all()

    def wait_for(self, text, timeout=300, after=0):
        """(arrival time, line) of the first line from index `after` on that holds text."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for arrived, line in self.lines[after:]:
                    if text in line:
                        return arrived, line
                assert time.monotonic() < deadline, f'{text!r} never appeared in:\n' + '\n'.join(
                    line for _, line in self.lines)
                self.changed.wait(1)


# ---------------------------------------------------------------------------------------------- recipe changes

def test_resuming_reports_changes_that_only_extend_the_run_and_refuses_others_in_one_line(write_recipe, tmp_path,
                                                                                         capsys):
    recipe, out = write_recipe(), tmp_path / 'run'
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--max-steps', '2']) == 0
    capsys.readouterr()
    resume = ['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']
    assert train_main(resume + ['--set', 'optim.lr=0.5', '--set', 'schedule.epochs=3']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'optim.lr 0.002 -> 0.5' in err and 'schedule.epochs' not in err
    assert '--allow-recipe-change' in err and last(out)['state']['step'] == 2  # nothing was written
    assert train_main(resume + ['--max-steps', '3', '--set', 'schedule.epochs=3', '--set', 'train.log_every=1']) == 0
    err = capsys.readouterr().err
    assert 'the recipe changed since the checkpoint: schedule.epochs 2 -> 3' in err
    assert 'the recipe changed since the checkpoint: train.log_every 2 -> 1' in err
    assert train_main(resume + ['--allow-recipe-change', '--set', 'optim.lr=0.0005', '--set', 'schedule.epochs=3',
                                '--max-steps', '4']) == 0
    assert 'optim.lr 0.002 -> 0.0005' in capsys.readouterr().err
    assert last(out)['recipe']['optim']['lr'] == 0.0005


# ---------------------------------------------------------------------------------------------- unreadable images

def image_folder(root, bad=()):
    """train/ and validation/ with 2 classes of 16 tiny PNGs; `bad` maps file names in train/class0 to contents."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 16), ('validation', 4)):
        for label in range(2):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.full((24, 24, 3), 60 + 120 * label, np.uint8) + rng.integers(0, 30, (24, 24, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f'{i:02d}.png')
    for name, content in dict(bad).items():
        (root / 'train' / 'class0' / name).write_bytes(content)
    return root


def truncated_jpeg() -> bytes:
    """A JPEG whose header reads but whose data stops halfway, as an interrupted copy leaves one."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()[:len(buffer.getvalue()) // 2]


BAD_FILES = {'05_truncated.jpg': truncated_jpeg(), '06_notes.png': b'these are notes, not an image\n'}


def test_unreadable_images_are_replaced_deterministically_named_and_counted(write_recipe, tmp_path, capfd):
    root = image_folder(tmp_path / 'data', BAD_FILES)
    changes = {'data': {'dataset': 'folder', 'data_dir': str(root), 'img_size': 24, 'max_bad_fraction': 0.1},
               'train': {'global_batch_size': 8, 'batch_size': 8}}
    runs = {}
    for workers in (0, 2):
        recipe = write_recipe(merge(changes, {'data': {'num_workers': workers}}), name=f'w{workers}')
        out = tmp_path / f'run{workers}'
        assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 0
        runs[workers] = last(out)
        err = capfd.readouterr().err  # file descriptors: loader workers print too
        for name in BAD_FILES:
            assert f'cannot read image {root / "train" / "class0" / name}' in err
    assert [row['skipped_images'] for row in runs[0]['state']['history']] == [2, 2]  # each epoch
    assert (tmp_path / 'run0' / 'metrics.csv').read_text().splitlines()[0].split(',')[4] == 'skipped_images'
    assert same_weights(runs[0], runs[2])  # the same replacement, whichever process read the file


def test_too_many_unreadable_images_stop_the_run_in_one_line(write_recipe, tmp_path, capsys):
    root = image_folder(tmp_path / 'data', BAD_FILES)
    recipe = write_recipe({'data': {'dataset': 'folder', 'data_dir': str(root), 'img_size': 24},
                           'train': {'global_batch_size': 8, 'batch_size': 8}})  # default: 0.1 % may fail
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith('error: 2 unreadable training images in epoch 1, more than data.max_bad_fraction')
    assert 'python -m mnv_train.check_data' in lines[-1] and all(line.startswith('warning: ') for line in lines[:-1])


def test_a_run_of_unreadable_images_means_the_data_is_broken(write_recipe, tmp_path, capsys):
    bad = {f'z{i:02d}_bad.png': b'not an image' for i in range(MAX_CONSECUTIVE_BAD + 4)}  # after the good ones
    root = image_folder(tmp_path / 'data', bad)
    recipe = write_recipe({'data': {'dataset': 'folder', 'data_dir': str(root), 'img_size': 24,
                                    'max_bad_fraction': 1.0}, 'train': {'global_batch_size': 8, 'batch_size': 8}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f'error: {MAX_CONSECUTIVE_BAD} unreadable images in a row from ')


# ---------------------------------------------------------------------------------------------- disk full

def test_a_full_disk_keeps_the_earlier_checkpoints_leaves_no_temp_file_and_says_how_to_resume(
        write_recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    recipe = write_recipe(STEPS_OF_8)
    real_fsync = os.fsync

    def fsync_fills_the_disk(fd):  # the disk fills up while the step-6 checkpoint is written
        if 'step-00000006.pt' in os.readlink(f'/proc/self/fd/{fd}'):
            raise OSError(errno.ENOSPC, 'No space left on device')
        real_fsync(fd)

    monkeypatch.setattr(os, 'fsync', fsync_fills_the_disk)
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: the disk is full: saving ')
    assert 'step-00000006.pt failed, the earlier checkpoints beside it are intact' in err and '--resume auto' in err
    files = sorted(p.name for p in (out / 'checkpoints').iterdir())
    assert not [name for name in files if '.tmp-' in name]
    assert 'step-00000006.pt' not in files
    monkeypatch.setattr(os, 'fsync', real_fsync)
    assert checkpoint.load(out / 'checkpoints' / 'step-00000004.pt')['state']['step'] == 4
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']) == 0


# ---------------------------------------------------------------------------------------------- loader workers

def children(pid):
    return [int(p) for p in (open(f'/proc/{pid}/task/{pid}/children').read().split())]


def test_a_killed_loader_worker_is_named_and_the_last_step_saved(write_recipe, tmp_path):
    recipe = write_recipe(merge(STEPS_OF_8, {'data': {'num_workers': 2}, 'schedule': {'epochs': 20}}))
    out = tmp_path / 'run'
    process = subprocess.Popen([sys.executable, str(REPO / 'train.py'), '--recipe', str(recipe), '--output', str(out),
                                '--quiet'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / 'checkpoints' / 'step-00000002.pt.json', process)
    worker = children(process.pid)[0]
    os.kill(worker, signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f'error: data loader worker pid {worker} died (') and 'out of memory' in line
    assert f'--resume auto --output {out}' in line
    saved = int(line.split('step ')[1].split(' ')[0])
    assert saved >= 2 and last(out)['state']['step'] == saved


class WorkerDiesMidHandover:
    """The run's real loader, as torch's iterator behaves when kill -9 hits a worker while it hands batch `at`
    (counted over the run) over: the fd transfer fails with ConnectionResetError, and the next request raises the
    loader's own report naming the worker."""

    def __init__(self, loader, at: int):
        self.loader, self.at, self.fetched, self.batches = loader, at, 0, None

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.batches = iter(self.loader)
        return self

    def __next__(self):
        self.fetched += 1
        if self.fetched == self.at:
            raise ConnectionResetError(104, 'Connection reset by peer')
        if self.fetched > self.at:
            raise RuntimeError('DataLoader worker (pid 4242) is killed by signal: Killed. ')
        return next(self.batches)


def test_a_worker_killed_while_handing_over_a_batch_stops_the_run_in_one_line_with_the_last_step_saved(
        write_recipe, tmp_path, capfd, monkeypatch):
    from mnv_train import cli

    def build_run(*args, **kwargs):  # the real run, whose loader's worker dies handing over the 4th batch
        run = real_build_run(*args, **kwargs)
        run.train_loader = WorkerDiesMidHandover(run.train_loader, at=4)
        return run
    real_build_run = cli.build_run
    monkeypatch.setattr(cli, 'build_run', build_run)
    out = tmp_path / 'run'
    capfd.readouterr()
    assert train_main(['--recipe', str(write_recipe(STEPS_OF_8)), '--output', str(out), '--quiet']) == 2
    lines = capfd.readouterr().err.splitlines()  # never a ConnectionResetError traceback
    assert len(lines) == 1 and lines[0].startswith('error: data loader worker ') and ' died (' in lines[0], lines
    assert '4242' in lines[0], lines  # the loader asked once more names the worker
    assert lines[0].endswith(f'step 3 was saved; continue with --resume auto --output {out}'), lines
    assert last(out)['state']['step'] == 3


# ---------------------------------------------------------------------------------------------- elastic restarts

def torchrun(*args, restarts=0, nproc=2):
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                             f'--nproc_per_node={nproc}', f'--max-restarts={restarts}', str(REPO / 'train.py'),
                             '--device', 'cpu', *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_pid(agent_pid, rank):
    for pid in children(agent_pid):
        environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
        if f'RANK={rank}'.encode() in environ:
            return pid
    raise AssertionError(f'no rank {rank} under {agent_pid}')


def test_torchrun_max_restarts_survives_a_killed_rank_and_ends_bit_identical(write_recipe, tmp_path):
    recipe = write_recipe({'train': {'checkpoint_every_steps': 2}, 'data': {'synthetic_train_size': 256},
                           'schedule': {'epochs': 2}})  # 8 steps an epoch over 2 ranks
    whole = torchrun('--recipe', recipe, '--output', tmp_path / 'whole', '--quiet')
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    out = tmp_path / 'restarted'
    agent = torchrun('--recipe', recipe, '--output', out, restarts=2)
    output = Output(agent.stdout)
    output.wait_for('step 4/16')  # a log point after the step-4 checkpoint
    os.kill(rank_pid(agent.pid, 1), signal.SIGKILL)
    output.wait_for('resumed from')
    code = agent.wait(timeout=300)
    output.reader.join()  # every line, to the end: a second restart would come after the first resume
    log = '\n'.join(text for _, text in output.lines)
    assert code == 0, log
    restarts = [text for _, text in output.lines if 'torchrun restarted the workers' in text]
    assert len(restarts) == 1 and 'restart 1)' in restarts[0], log  # one restart, and it resumed the run
    assert_same_training_state(last(out), last(tmp_path / 'whole'))
    assert last(out)['state']['step'] == 16
