"""A run is a function of its recipe and seed, not of its world size: the same optimizer steps on 1 process with
accumulation 4, 2 with 2 and 4 with 1, and across a resume that changes the world size."""
import errno
import functools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from mnv_train import bench, checkpoint, data, engine, optim, resume
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.cli import check_shared_folder, train_main
from mnv_train.distributed import World

from conftest import REPO, TINY, assert_same_training_state, merge, wait_for

# a model with BatchNorm, dropout and drop-path; RandAugment per sample; Mixup+CutMix and erasing per micro-batch.
# SGD at a small LR, and BatchNorm over 8 images of at least 2 x 2: the runs differ in the order of floating-point
# sums only, and a badly conditioned run would grow that into more than 1e-5 within 20 steps (measured: at 32 px,
# 4 images a device and LR 0.005, one process with 1 thread against 2 threads, 9e-2 after 7 steps). AdamW moves a
# weight whose gradient is zero but for rounding (a BatchNorm bias the next BatchNorm cancels) by +-lr on that
# rounding alone, so it is not used here.
INVARIANT = merge(TINY, {
    'model': {'name': 'test_efficientnet', 'drop_rate': 0.1, 'drop_path_rate': 0.2},
    'data': {'img_size': 64, 'synthetic_train_size': 256, 'synthetic_val_size': 8},
    'aug': {'auto_augment': 'rand-m9-mstd0.5', 'mixup': 0.8, 'cutmix': 1.0, 'reprob': 0.25},
    'optim': {'name': 'sgd', 'lr': 0.002},
    'schedule': {'epochs': 3, 'warmup_epochs': 0.5},
    'train': {'global_batch_size': 32, 'batch_size': 8, 'log_every': 5},
})  # 8 steps an epoch: 20 steps cross two epoch ends


def torchrun_command(nproc: int, *args, nodes: str = '--standalone', restarts: int = 0) -> list[str]:
    return [sys.executable, '-m', 'torch.distributed.run', *nodes.split(), f'--nproc_per_node={nproc}',
            f'--max-restarts={restarts}', str(REPO / 'train.py'), '--device', 'cpu', '--quiet', *map(str, args)]


def torchrun(nproc: int, *args):
    result = subprocess.run(torchrun_command(nproc, *args), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def last(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / 'checkpoints' / 'last.pt')


def is_batchnorm_statistic(key: str) -> bool:
    return key.endswith(('running_mean', 'running_var', 'num_batches_tracked'))


def largest_difference(a: dict, b: dict, statistics: bool) -> float:
    """Max |a - b| over the weights (statistics=False) or over the BatchNorm running statistics."""
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if is_batchnorm_statistic(k) == statistics and a[k].is_floating_point())


@pytest.fixture(scope='module')
def runs(tmp_path_factory) -> dict:
    """20 optimizer steps of 32 samples, 8 per device: {(processes, accumulation): final checkpoint}, the 1-process
    run's checkpoint at step 16, and 'root': the folder with the recipe and each run folder ('2x2' keeps its
    mid-epoch step-10 checkpoint, which the world-size-change resume starts from)."""
    root = tmp_path_factory.mktemp('invariance')
    recipe = root / 'invariant.yaml'
    recipe.write_text(yaml.safe_dump(merge(INVARIANT, {'train': {'checkpoint_every_steps': 10,
                                                                 'keep_checkpoints': 3}})))  # steps 10, 16, 20
    assert train_main(['--recipe', str(recipe), '--output', str(root / '1x4'), '--max-steps', '20', '--quiet']) == 0
    for nproc, accum in ((2, 2), (4, 1)):
        torchrun(nproc, '--recipe', recipe, '--output', root / f'{nproc}x{accum}', '--max-steps', 20)
    return {(1, 4): last(root / '1x4'), (2, 2): last(root / '2x2'), (4, 1): last(root / '4x1'),
            'step 16': checkpoint.load(root / '1x4' / 'checkpoints' / 'step-00000016.pt'), 'root': root}


@pytest.mark.parametrize('world', [(2, 2), (4, 1)])
def test_any_world_size_at_the_same_per_device_batch_trains_the_same_weights(runs, world):
    reference, other = runs[(1, 4)], runs[world]
    assert other['plan'] == {'world_size': world[0], 'per_device': 8, 'accum_steps': world[1], 'global_batch': 32}
    assert other['state']['step'] == reference['state']['step'] == 20
    weights = largest_difference(reference['model'], other['model'], statistics=False)
    ema = largest_difference(reference['ema'], other['ema'], statistics=False)
    statistics = largest_difference(reference['model'], other['model'], statistics=True)
    print(f'{world[0]} processes x accumulation {world[1]}: max |weight difference| {weights:.2e} (EMA {ema:.2e}), '
          f'BatchNorm running statistics {statistics:.2e}')
    assert weights < 1e-5 and ema < 1e-5
    moved = largest_difference(runs['step 16']['model'], reference['model'], statistics=False)
    assert moved > 1e-3, 'the last 4 steps hardly moved the weights: the tolerance tells nothing'


def test_the_job_sees_the_same_micro_batches_whatever_its_world_size():
    """Every (step, place in the step) micro-batch holds the same samples with the same augmentation seeds."""
    def micro_batches(world_size: int, accum: int) -> dict:
        found = {}
        for rank in range(world_size):
            sampler = data.EpochSampler(100, rank, world_size, seed=5, micro_batch=3, accum=accum)
            sampler.set_position(epoch=1, start=12)
            items = list(sampler)
            for i in range(0, len(items), 3):
                step, micro_step = divmod(i // 3, accum)
                found[(step, sampler.micro_batch_index(micro_step))] = items[i:i + 3]
        return found
    one = micro_batches(1, 4)
    assert len(one) == (100 // 12 - 1) * 4 and len({index for batch in one.values() for index, _ in batch}) == 84
    assert micro_batches(2, 2) == micro_batches(4, 1) == one


def test_resume_on_another_world_size_at_a_step_boundary_continues_the_same_trajectory(runs, tmp_path):
    """The 2-process run as it stood at step 10 (mid epoch 2) resumes on 1 process x accumulation 4 and ends where
    the 1-process run does."""
    root, moved = runs['root'], tmp_path / 'moved'
    shutil.copytree(root / '2x2', moved)
    for path in (moved / 'checkpoints').glob('step-*'):
        if int(path.name[5:13]) > 10:
            path.unlink()
    stopped = checkpoint.Checkpointer(moved / 'checkpoints', 3, True).latest_valid()[1]
    assert stopped['plan']['world_size'] == 2 and stopped['state']['step'] == 10
    assert stopped['state']['samples_in_epoch'] > 0  # mid epoch: the position within it must carry over
    assert train_main(['--recipe', str(root / 'invariant.yaml'), '--output', str(moved), '--resume', 'auto',
                       '--max-steps', '20', '--quiet']) == 0
    reference, resumed = runs[(1, 4)], last(moved)
    assert resumed['plan'] == {'world_size': 1, 'per_device': 8, 'accum_steps': 4, 'global_batch': 32}
    weights = largest_difference(reference['model'], resumed['model'], statistics=False)
    print(f'2 processes for 10 steps, then 1 process x accumulation 4: max |weight difference| {weights:.2e}')
    assert resumed['state']['step'] == 20 and weights < 1e-5


# ---------------------------------------------------------------------------------------------- nodes that agree

HANG_GUARD_S = 600  # far beyond a run's few seconds: only a rank left waiting in a collective gets there


def two_ranks(tmp_path: Path, target, *args) -> list[str]:
    """target(world, rank, *args) on 2 new gloo processes: each rank's result, or its error, as text. A rank still
    running after the hang guard fails the test. They fork from multiprocessing's forkserver, a process that has
    imported what this module needs once and run nothing: as fresh as spawned processes, without each importing
    torch, timm and mnv_train again (about 10 s a rank on 2 shared cores)."""
    # before the server's first start; not this module itself: Python 3.11's forkserver lacks tests/ on its path
    multiprocessing.get_context('forkserver').set_forkserver_preload(['pytest', 'mnv_train.bench', 'mnv_train.cli'])
    ranks = torch.multiprocessing.start_processes(rank_main, args=(tmp_path, target, args), nprocs=2, join=False,
                                                  start_method='forkserver')
    for process in ranks.processes:
        process.join(timeout=HANG_GUARD_S)
    hung = [rank for rank, process in enumerate(ranks.processes) if process.is_alive()]
    for rank in hung:
        ranks.processes[rank].kill()
    assert not hung, f'rank(s) {hung} still waiting after {HANG_GUARD_S} s'
    return [(tmp_path / f'rank{rank}.out').read_text() for rank in range(2)]


def rank_main(rank: int, tmp_path: Path, target, args):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/rendezvous', rank=rank, world_size=2)
    try:
        out = repr(target(World(rank=rank, size=2, control=dist.group.WORLD), rank, *args))
    except Exception as e:
        out = f'{type(e).__name__}: {e}'
    finally:
        dist.destroy_process_group()
    (tmp_path / f'rank{rank}.out').write_text(out)


def probe_own_folder(world: World, rank: int, root: Path):
    """Each rank its own folder, as with disks local to each node."""
    check_shared_folder(root / f'node{rank}', world)


def probe_shared_folder(world: World, rank: int, root: Path):
    check_shared_folder(root, world)
    dist.barrier()  # rank 0 removes the probe after the ranks have looked: list the folder once it has
    return sorted(p.name for p in root.iterdir())


def test_a_run_folder_that_some_rank_cannot_see_is_refused_in_one_line(tmp_path):
    for rank in range(2):
        (tmp_path / f'node{rank}').mkdir()
    refusals = two_ranks(tmp_path, probe_own_folder, tmp_path)
    for refusal in refusals:  # on every rank, each naming its own view of the folder
        assert refusal.startswith('UserError: rank(s) 1 cannot see ')
        assert refusal.endswith('pass --output a folder on a filesystem every node mounts')
    shared = tmp_path / 'shared'
    shared.mkdir()
    (tmp_path / 'rendezvous').unlink(missing_ok=True)
    assert two_ranks(tmp_path, probe_shared_folder, shared) == ['[]', '[]']  # accepted, and the probe is gone


def test_a_rank_0_that_cannot_write_the_probe_stops_every_rank_in_one_line(tmp_path):
    (tmp_path / 'node0').write_text('a file where rank 0 expects its run folder')
    (tmp_path / 'node1').mkdir()
    said = two_ranks(tmp_path, probe_own_folder, tmp_path)
    assert said[0] == f'UserError: cannot write into the run folder {tmp_path / "node0"}: Not a directory'
    assert said[1] == f'UserError: rank 0 could not check that every rank sees the run folder: {said[0][11:]}'


def write_checkpoint(folder: Path, step: int, marker: float):
    """A checkpoint with every part a run resumes from (contents beside the point here)."""
    parts = {part: {'value': torch.tensor(marker)} for part in checkpoint.RUN_PARTS}
    checkpoint.write(folder / f'step-{step:08d}.pt', {**parts, 'state': {'step': step}}, {'step': step})


def resume_on_own_node(world: World, rank: int, root: Path):
    """The ranks run in their node's folder, and name the checkpoints folder relatively, as one path that each
    node resolves on its own disk."""
    os.chdir(root / f'node{rank}')
    found = resume.agreed_checkpoint(checkpoint.Checkpointer(Path('checkpoints'), 2, world.is_main), world)
    return str(found[0]), float(found[1]['model']['value'])


def test_rank_0_chooses_the_resume_checkpoint_and_ranks_that_loaded_another_stop(tmp_path):
    lagging, ahead = tmp_path / 'node0' / 'checkpoints', tmp_path / 'node1' / 'checkpoints'
    write_checkpoint(lagging, 4, 1.0)
    shutil.copytree(lagging, ahead)
    write_checkpoint(ahead, 6, 2.0)  # rank 1 alone lists a newer one: rank 0's choice wins
    assert two_ranks(tmp_path, resume_on_own_node, tmp_path) == [repr(('checkpoints/step-00000004.pt', 1.0))] * 2
    write_checkpoint(ahead, 4, 3.0)  # the same name, other contents: the ranks would resume from different states
    (tmp_path / 'rendezvous').unlink(missing_ok=True)
    refusals = two_ranks(tmp_path, resume_on_own_node, tmp_path)
    assert refusals[0] == refusals[1]
    assert refusals[0].startswith('UserError: rank 1 did not load the checkpoint rank 0 chose, '
                                  'checkpoints/step-00000004.pt (step 4, sha256 ')


def resume_from_a_stale_listing(world: World, rank: int, root: Path):
    """Rank 0's listing of the checkpoints fails with an error that is not a UserError, as on an NFS mount whose
    folder was replaced."""
    checkpointer = checkpoint.Checkpointer(root / 'checkpoints', 2, world.is_main)

    def stale_listing():
        raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
    checkpointer.latest_valid = stale_listing
    return resume.agreed_checkpoint(checkpointer, world)


def test_an_unexpected_error_while_rank_0_chooses_the_checkpoint_stops_every_rank(tmp_path):
    said = two_ranks(tmp_path, resume_from_a_stale_listing, tmp_path)
    assert said[0] == 'OSError: [Errno 116] Stale file handle'  # with its traceback, as any error not the user's
    assert said[1] == 'UserError: rank 0 could not choose the checkpoint to resume from: ' + said[0]


def compiled_and_eager_losses(world: World, rank: int, root: Path) -> dict:
    """The losses of 3 steps of the same DDP run, eager and under torch.compile. On this CPU inductor took about
    8 minutes to compile (without dropout and drop-path, 2 processes: 268 s for the first forward alone) and draws
    dropout from its own generator, so the graphs run through AOTAutograd with eager kernels: the same DDP graph
    splitting and compiled backward, without the C++ build."""
    torch.compile = functools.partial(torch.compile, backend='aot_eager')  # this rank's process only
    losses = {}
    for compiled in (False, True):
        recipe = recipes.from_dict(merge(INVARIANT, {'data': {'img_size': 32},
                                                     'train': {'compile': compiled, 'global_batch_size': 16}}))
        run = build_run(recipe, world, root / f'compile-{compiled}')
        losses[compiled] = []
        engine.train_steps(run, 3, after_step=lambda pending, seen=losses[compiled]: seen.extend(
            pending.read_back()[0]))
    losses['compiled'] = type(getattr(run.model, '_orig_mod', None)).__name__  # what torch.compile wrapped
    return losses


def test_compiled_ddp_trains_like_eager_ddp(tmp_path):
    """train.compile compiles the DDP-wrapped model (its all-reduce then overlaps the backward), on CPU too."""
    for result in two_ranks(tmp_path, compiled_and_eager_losses, tmp_path):
        losses = eval(result)
        assert losses['compiled'] == 'DistributedDataParallel'
        assert len(losses[True]) == len(losses[False]) == 3
        assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


NODES = merge(INVARIANT, {'data': {'img_size': 32, 'synthetic_train_size': 256},  # 16 steps
                          'schedule': {'epochs': 1, 'warmup_epochs': 0.1},
                          'train': {'global_batch_size': 16, 'log_every': 1000, 'checkpoint_every_steps': 2}})


@pytest.fixture(scope='module')
def one_node(tmp_path_factory) -> tuple[Path, Path]:
    """(recipe, final checkpoint) of the NODES recipe on one torchrun node with two processes: the uninterrupted run
    that both two-node tests must reproduce bit for bit."""
    root = tmp_path_factory.mktemp('one-node')
    recipe = root / 'nodes.yaml'
    recipe.write_text(yaml.safe_dump(NODES))
    torchrun(2, '--recipe', recipe, '--output', root / 'run')
    return recipe, root / 'run' / 'checkpoints' / 'last.pt'


def test_two_torchrun_nodes_train_bit_identically_to_one_node_with_two_processes(one_node, tmp_path):
    """Two agents rendezvous over c10d as two nodes would, each with one process, and agree on the run folder."""
    recipe, reference = one_node
    nodes, out = f'--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{free_port()}', tmp_path / 'two-nodes'
    # one thread a process, as torchrun sets for the 2-process agent but not for agents of 1: bit identity needs the
    # same thread count (a 2-thread process sums in another order)
    one_thread = {**os.environ, 'OMP_NUM_THREADS': '1'}
    agents = [subprocess.Popen(torchrun_command(1, '--recipe', recipe, '--output', out, nodes=nodes), env=one_thread,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for agent in agents:
        _, stderr = agent.communicate(timeout=600)
        assert agent.returncode == 0, stderr[-3000:]
    one, two = checkpoint.load(reference), last(out)
    assert two['state']['step'] == one['state']['step'] == 16
    for key in one['model']:
        assert torch.equal(one['model'][key], two['model'][key]), key


def worker_of(agent: subprocess.Popen) -> int:
    """The one training process a torchrun agent of one process runs (read from /proc)."""
    children = Path(f'/proc/{agent.pid}/task/{agent.pid}/children').read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_a_node_whose_worker_is_killed_rejoins_and_the_pair_ends_bit_identical(one_node, tmp_path):
    """kill -9 of one node's worker: both agents restart (--max-restarts 1), every rank resumes from the newest
    checkpoint, and the run ends as an uninterrupted one. Each attempt's rank 0 hosts its own store
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as README asks for restarts across nodes)."""
    recipe, reference = one_node
    nodes, out = f'--nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{free_port()}', tmp_path / 'killed'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'}
    agents = [subprocess.Popen(torchrun_command(1, '--recipe', recipe, '--output', out, nodes=nodes, restarts=1),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        wait_for(out / 'checkpoints' / 'step-00000004.pt.json', agents[1])
        os.kill(worker_of(agents[1]), signal.SIGKILL)
        logs = [agent.communicate(timeout=600)[0] for agent in agents]  # a hang guard only: this takes about 90 s
    finally:
        for agent in agents:  # after a hang, none left behind: on SIGTERM an agent stops its worker
            if agent.poll() is None:
                agent.terminate()
    for agent, log in zip(agents, logs):
        assert agent.returncode == 0, log[-3000:]
    assert 'failed (exitcode: -9)' in logs[1]  # the kill came before the end, and the run resumed (a fresh start
    # in a folder with checkpoints is refused)
    assert last(out)['state']['step'] == 16
    assert_same_training_state(out / 'checkpoints' / 'last.pt', reference)


def trajectory_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if 'trajectory' in line]


def test_a_run_whose_per_device_batch_leaves_the_recipe_or_the_saved_run_says_the_trajectory_will_differ(
        tmp_path, capsys):
    recipe = tmp_path / 'invariant.yaml'
    recipe.write_text(yaml.safe_dump(merge(INVARIANT, {'data': {'img_size': 32}})))
    out = str(tmp_path / 'run')
    assert train_main(['--recipe', str(recipe), '--output', out, '--max-steps', '1', '--quiet']) == 0
    assert trajectory_lines(capsys) == []  # the recipe's own 8 per device
    assert train_main(['--recipe', str(recipe), '--output', out, '--max-steps', '2', '--quiet', '--resume', 'auto',
                       '--batch-size', '4']) == 0
    said = trajectory_lines(capsys)  # against the saved run only, not a second time against the recipe
    assert len(said) == 1 and 'per-device batch changed 8 -> 4: the trajectory will differ' in said[0]
    assert last(Path(out))['plan']['accum_steps'] == 8  # the same global batch of 32
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'fresh'), '--max-steps', '1', '--quiet',
                       '--batch-size', '4']) == 0
    said = trajectory_lines(capsys)
    assert len(said) == 1 and said[0].startswith(
        'warning: per-device batch 4 (1 process(es) x accumulation 8), not the 8 that the global batch 32 gets on '
        'one device (train.batch_size 8): the trajectory will differ from the recipe\'s reference, since ')


def test_bench_shows_what_the_sampler_and_seeding_cost_a_step(tmp_path, capsys):
    recipe = tmp_path / 'bench.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, {'data': {'synthetic_train_size': 128}, 'train': {'batch_size': 8}})))
    assert bench.main(['--recipe', str(recipe), '--steps', '2', '--warmup', '1', '--json', str(tmp_path / 'b.json'),
                       '--device', 'cpu']) == 0
    result = json.loads((tmp_path / 'b.json').read_text())
    assert 0 < result['sampling_s_per_step'] and 0 < result['sampling_share'] < 1
    assert 'sampler and seeding' in capsys.readouterr().out


def test_only_a_world_size_that_cannot_keep_the_per_device_batch_leaves_the_recipe_trajectory():
    recipe = recipes.from_dict(INVARIANT)  # 32 a step, 8 per device
    assert [optim.trajectory_note(recipe, optim.plan_batch(recipe, world)) for world in (1, 2, 4)] == [None] * 3
    plan = optim.plan_batch(recipe, 3)  # 3 x 2 x 6 (even for Mixup): 36, the nearest split of 32
    assert optim.trajectory_note(recipe, plan).startswith(
        'per-device batch 6 (3 process(es) x accumulation 2), not the 8 that the global batch 32 gets on one device')
