"""MDS shards (python -m mnv_train.shard) and data.dataset streaming: the same bytes, tensors and training as the
image folder they came from, read locally or from an S3 server on 127.0.0.1, with exact resume on any world size."""
import contextlib
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_invariance import largest_difference, torchrun_command

from mnv_train import bench, checkpoint, cli, data, errors, shard
from mnv_train import recipe as recipes
from mnv_train.cli import train_main
from mnv_train.distributed import World
from mnv_train.errors import UserError
from mnv_train.recipe import AugConfig, DataConfig

from conftest import REPO, TINY, assert_same_training_state, merge, one_thread, wait_for

# SGD at a small LR, per-sample RandAugment, Mixup+CutMix and erasing: as test_invariance's recipe, whose comment
# explains why the world sizes then differ by float sums only. 72 images, 16 a step: 4 steps an epoch, 8 in all.
# StreamingDataset's order on 2 canonical nodes, a shard's samples spread over 16 (the shards hold ~20 images each).
STREAMED = merge(TINY, {
    'model': {'name': 'test_efficientnet', 'drop_rate': 0.1, 'drop_path_rate': 0.2},
    'data': {'img_size': 32, 'num_canonical_nodes': 2, 'shuffle_block_size': 16},
    'aug': {'auto_augment': 'rand-m9-mstd0.5', 'mixup': 0.8, 'cutmix': 1.0, 'reprob': 0.25},
    'optim': {'name': 'sgd', 'lr': 0.002},
    'train': {'global_batch_size': 16, 'batch_size': 8, 'log_every': 4, 'checkpoint_every_steps': 1},
})


def jpeg(rng, size=24) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(encoded, 'JPEG', quality=90)
    return encoded.getvalue()


def write_folder(root, per_class: dict):
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for c in range(3):
            (root / split / f'class{c}').mkdir(parents=True)
            for n in range(count):
                (root / split / f'class{c}' / f'{n}.jpg').write_bytes(jpeg(rng))
    return root


@pytest.fixture(scope='module', autouse=True)
def single_thread():
    """Every run here on one thread, as torchrun's ranks are (OMP_NUM_THREADS=1): a CPU's sums depend on the thread
    count, and the resumes below compare runs that crossed from torchrun's ranks to this process (seen: 1.7e-5)."""
    with one_thread():
        yield


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('folder'), {'train': 24, 'validation': 4})


@pytest.fixture(scope='module')
def shards(folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp('shards') / 'mds'  # in the folder's order: the tests below compare by index
    assert shard.main([str(folder), str(dest), '--shard-size', '16kb', '--order', 'source']) == 0
    assert len(list((dest / 'train').glob('*.mds'))) > 3  # several shards, so that reads cross them
    return dest


def recipe_file(path, **data_cfg):
    path.write_text(yaml.safe_dump(merge(STREAMED, {'data': data_cfg})))
    return path


def streamed_recipe(tmp_path, remote, name='streamed', **data_cfg):
    return recipe_file(tmp_path / f'{name}.yaml', dataset='streaming', remote=str(remote), local=str(tmp_path / name),
                       **data_cfg)


def train(recipe, out, *extra):
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', *extra]) == 0
    return checkpoint.load(out / 'checkpoints' / 'last.pt')


@pytest.fixture(scope='module')
def reference(folder, shards, tmp_path_factory):
    """The folder run; the same run from the local shards in its order (data.stream_order samples), which the test
    below compares with it; and the run in StreamingDataset's order (shards, the default), for the resumes."""
    root = tmp_path_factory.mktemp('reference')
    from_folder = train(recipe_file(root / 'folder.yaml', dataset='folder', data_dir=str(folder)), root / 'folder')
    return (from_folder, train(streamed_recipe(root, shards, 'sampled', stream_order='samples'), root / 'sampled'),
            train(streamed_recipe(root, shards), root / 'streamed'))


# ---------------------------------------------------------------------------------------------- the shard tool

def read_all(source) -> list[tuple[bytes, int]]:
    return [source.read_bytes(i) for i in range(len(source))]


def test_shards_hold_the_folder_bytes_and_labels_shuffled_out_of_class_order_and_list_unreadable_images(tmp_path):
    root = write_folder(tmp_path / 'images', {'train': 3})
    (root / 'train' / 'class1' / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    assert shard.main([str(root), str(tmp_path / 'mds'), '--splits', 'train']) == 1
    manifest = json.loads((tmp_path / 'mds' / 'manifest.json').read_text())
    assert [name.rsplit('/', 2)[1:] for name, _ in manifest['splits']['train']['unreadable']] == [
        ['class1', 'broken.jpg']]
    assert manifest['splits']['train']['per_class'] == {'0': 3, '1': 3, '2': 3} and manifest['num_classes'] == 3
    assert (manifest['order'], manifest['seed']) == ('shuffled', 0)
    (root / 'train' / 'class1' / 'broken.jpg').unlink()
    folder = read_all(data.TimmImages('folder', str(root), 'train', training=True))
    streamed = read_all(data.StreamedImages(str(tmp_path / 'mds'), str(tmp_path / 'cache'), 'train'))
    assert [label for _, label in folder] == sorted(label for _, label in folder)  # the folder: class by class
    assert [label for _, label in streamed] != sorted(label for _, label in streamed)
    assert sorted(streamed) == sorted(folder) and len(folder) == 9  # each image once, with its own label
    assert manifest['splits']['train']['bytes'] == sum(len(encoded) for encoded, _ in folder)


def written(dest) -> dict:
    return {str(path.relative_to(dest)): path.read_bytes() for path in sorted(dest.rglob('*')) if path.is_file()}


def test_the_same_seed_writes_byte_identical_shards_another_seed_another_order_and_source_order_the_folders(
        folder, tmp_path):
    def write(name, *extra):
        assert shard.main([str(folder), str(tmp_path / name), '--shard-size', '16kb', *extra]) == 0
        return tmp_path / name
    first, again, other = write('first'), write('again', '--seed', '0'), write('other', '--seed', '7')
    assert len(written(first)) > 8 and written(first) == written(again)  # shards, index.json, manifest.json
    assert json.loads((other / 'manifest.json').read_text())['seed'] == 7
    in_order = {name: read_all(data.StreamedImages(str(dest), str(tmp_path / f'cache-{name}'), 'train'))
                for name, dest in (('first', first), ('other', other), ('source', write('source', '--order',
                                                                                        'source')))}
    assert in_order['first'] != in_order['other'] and sorted(in_order['first']) == sorted(in_order['other'])
    assert in_order['source'] == read_all(data.TimmImages('folder', str(folder), 'train', training=True))
    assert json.loads((tmp_path / 'source' / 'manifest.json').read_text())['seed'] is None


def test_timm_tars_and_fashion_mnist_shard_to_their_own_samples(tmp_path, tiny_fmnist):
    rng, tars = np.random.default_rng(1), tmp_path / 'wds'
    tars.mkdir()
    images = {f'n{i:03d}': (jpeg(rng), i % 4) for i in range(6)}
    with tarfile.open(tars / 'imagenet1k-train-0000.tar', 'w') as tar:
        for key, (encoded, label) in images.items():
            for suffix, payload in (('jpg', encoded), ('cls', str(label).encode()), ('json', b'{}')):
                info = tarfile.TarInfo(f'{key}.{suffix}')
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    assert shard.main([str(tars), str(tmp_path / 'from-tars'), '--splits', 'train']) == 0
    from_tars = data.StreamedImages(str(tmp_path / 'from-tars'), str(tmp_path / 'cache-tars'), 'train')
    assert sorted(read_all(from_tars)) == sorted(images.values())

    assert shard.main([str(tiny_fmnist), str(tmp_path / 'from-idx')]) == 0
    original = data.FashionMNIST(str(tiny_fmnist), 'test')
    streamed = data.StreamedImages(str(tmp_path / 'from-idx'), str(tmp_path / 'cache-idx'), 'validation')
    assert len(streamed) == len(original) == 32 and streamed.num_classes == 10
    def pixels_and_labels(source):
        return sorted((np.asarray(image).tobytes(), label) for image, label in map(source.load, range(len(source))))
    assert pixels_and_labels(streamed) == pixels_and_labels(original)  # each image once, its pixels exact


def test_a_tar_label_that_is_no_number_and_a_bad_shard_size_are_one_line(tmp_path, capfd):
    tars = tmp_path / 'wds'
    tars.mkdir()
    with tarfile.open(tars / 'imagenet1k-train-0000.tar', 'w') as tar:
        for suffix, payload in (('jpg', jpeg(np.random.default_rng(2))), ('cls', b'tabby')):
            info = tarfile.TarInfo(f'n042.{suffix}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    for extra, culprit in (([], "sample n042 has a .cls that is not a whole number: b'tabby'"),
                           (['--shard-size', 'sixty'], "expected a size such as 64mb, got 'sixty'")):
        assert shard.main([str(tars), str(tmp_path / f'out{len(extra)}'), '--splits', 'train', *extra]) == 2
        lines = [line for line in capfd.readouterr().err.strip().splitlines() if not line.startswith('train: ')]
        assert len(lines) == 1 and culprit in lines[0], lines  # the progress bar aside, one line


def test_a_data_unavailable_error_re_raised_from_a_loader_worker_is_its_own_one_line():
    error = data.DataUnavailable('Caught DataUnavailable in DataLoader worker process 0.\nOriginal Traceback (most '
                                 'recent call last):\n  File "x.py", line 1, in f\nmnv_train.data.DataUnavailable: '
                                 'cannot read shard s3://bucket/train/shard.00000.mds')
    assert errors.one_line(error) == 'cannot read shard s3://bucket/train/shard.00000.mds'


# ---------------------------------------------------------------------------------------------- reading and training

@pytest.mark.parametrize('workers', [0, 2])
def test_a_sample_gives_the_same_augmented_tensor_from_shards_and_from_the_folder(folder, shards, tmp_path, workers):
    cfg = DataConfig(img_size=32)
    transform = data.train_transform(cfg, AugConfig(auto_augment='rand-m9-mstd0.5'), data.Normalization((0.5,) * 3,
                                                                                                       (0.5,) * 3))
    sources = (data.TimmImages('folder', str(folder), 'train', training=True),
               data.StreamedImages(str(shards), str(tmp_path / 'cache'), 'train'))
    batches = []
    for source in sources:
        sampler = data.EpochSampler(len(source), rank=0, world_size=1, seed=3, micro_batch=8)
        loader = data.make_loader(data.TransformedDataset(source, transform), sampler, 8, workers, drop_last=True,
                                  pin_memory=False)
        batches.append(list(loader))
    assert len(batches[0]) == 9
    for (images_a, labels_a, _), (images_b, labels_b, _) in zip(*batches):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_a_run_from_shards_in_sample_order_trains_and_evaluates_as_the_folder_run(reference):
    from_folder, streamed, _ = reference
    assert streamed['state']['step'] == 8 and streamed['state']['history'][-1]['top1'] is not None
    assert_same_training_state(from_folder, streamed)


def test_shards_not_written_shuffled_warn_once_when_read_in_shard_order(folder, shards, tmp_path, capfd):
    shuffle = data.stream_shuffle(recipes.from_dict(STREAMED).data, seed=3)
    data.StreamedImages(str(shards), str(tmp_path / 'a'), 'train', shuffle)  # written with --order source
    data.StreamedImages(str(shards), str(tmp_path / 'b'), 'train')  # read by index: the order does not matter
    warned = [line for line in capfd.readouterr().err.splitlines() if 'not written in a shuffled order' in line]
    assert len(warned) == 1 and 'manifest order source' in warned[0] and 'data.stream_order samples' in warned[0]
    assert shard.main([str(folder), str(tmp_path / 'shuffled'), '--shard-size', '16kb']) == 0
    data.StreamedImages(str(tmp_path / 'shuffled'), str(tmp_path / 'c'), 'train', shuffle)
    assert 'shuffled order' not in capfd.readouterr().err


def test_precise_bn_recalibrates_a_streamed_run_on_its_own_first_batches_in_shard_order(shards, tmp_path):
    from mnv_train import precise_bn
    from mnv_train.build import build_run
    from mnv_train.distributed import World
    recipe = recipes.load(str(streamed_recipe(tmp_path, shards)), overrides=['train.global_batch_size=8'])
    run = build_run(recipe, World(), tmp_path / 'run')  # one micro-batch a step: its places are the epoch's first
    batch = run.plan.per_device
    ours = next(precise_bn.loader_batches(run.train_loader, run.train_sampler, run.train_input, epoch=0))
    norm = data.resolve_normalization(recipe.data, run.module)
    tools = next(precise_bn.recipe_batches(recipe, norm, World(), batch))
    assert torch.equal(ours, tools)


def shards_read(source, indices) -> int:
    return len({source.dataset.spanner[i][0] for i in indices})


def test_the_shards_order_is_streaming_datasets_own_iteration_dealt_to_ranks_as_its_partition_deals(shards, tmp_path):
    cfg = recipes.from_dict(STREAMED).data
    source = data.StreamedImages(str(shards), str(tmp_path / 'cache'), 'train', data.stream_shuffle(cfg, seed=3))
    orders = [source.shard_order(epoch) for epoch in range(2)]
    assert [sorted(order) for order in orders] == [list(range(72))] * 2 and orders[0].tolist() != orders[1].tolist()
    iterated = [sample['image'] for sample in source.dataset]  # the library's own iteration: epoch 0, one process
    assert iterated == [source.read_bytes(i)[0] for i in orders[0]]
    # its partition at 2 ranks of one node, 4 samples a batch, against our sampler's micro-batches at world size 2
    from streaming.base.batching import generate_work
    from streaming.base.world import World as Layout
    ours = []
    for rank in range(2):
        sampler = data.EpochSampler(72, rank, 2, seed=3, micro_batch=4, epoch_order=source.shard_order)
        sampler.set_position(epoch=1)
        ours.append([index for index, _ in sampler])
    source.dataset.batch_size = 4
    work = generate_work('random', source.dataset, Layout(1, 2, 1, 0), 1, 0)
    assert [len(indices) for indices in ours] == [36, 36]
    assert ours == [work[0, rank, 0].flatten().tolist() for rank in range(2)]
    # the point of it: a step's 16 samples come from fewer shards than in a uniform permutation
    sampled = data.EpochSampler(72, 0, 1, seed=3, micro_batch=16)
    print(f'shards read by the first step: {shards_read(source, orders[0][:16])} in the shards order, '
          f'{shards_read(source, [i for i, _ in sampled][:16])} of {len(source.dataset.shards)} in a permutation')
    assert shards_read(source, orders[0][:16]) < shards_read(source, [i for i, _ in sampled][:16])


def start(command):
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    found = [int(child) for task in glob.glob(f'/proc/{pid}/task/*/children') for child in open(task).read().split()]
    return found + [grandchild for child in found for grandchild in descendants(child)]


def gone(pid: int) -> bool:
    """Reaped, not merely dead: the run folder's lock counts a zombie (os.kill(pid, 0) reaches it) as its holder."""
    return not os.path.exists(f'/proc/{pid}')


def kill_9_after_step(process, out, step: int):
    """kill -9 on every process of the job; returns once they are all reaped: a rank not yet reaped would hold the
    run folder's lock against the resume (seen: 'in use by pid ...')."""
    wait_for(out / 'checkpoints' / f'step-{step:08d}.pt.json', process)
    tree = descendants(process.pid)
    for pid in [process.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 300
    while not all(map(gone, tree)):  # orphaned ranks are reaped by init, a moment later
        assert time.time() < deadline, f'killed ranks {[pid for pid in tree if not gone(pid)]} never went'
        time.sleep(0.01)
    # the resume runs in this process, which cleaned StreamingDataset's stale shared memory once already; a new
    # process would clean it at start. Without that, the killed run's registry of a data.local whose file locks it
    # had not yet made (say, the validation split's, before its first evaluation) stops the resume: 'Reused local
    # directory' (seen once in five runs before this line)
    data.clean_stale_shared_memory_once.cache_clear()


def test_kill_9_then_resume_on_the_same_world_size_is_bit_identical(reference, shards, tmp_path, capsys):
    recipe, out = streamed_recipe(tmp_path, shards), tmp_path / 'run'
    kill_9_after_step(start([sys.executable, str(REPO / 'train.py'), '--recipe', str(recipe), '--output', str(out),
                             '--quiet']), out, 6)
    moved = streamed_recipe(tmp_path, shutil.copytree(shards, tmp_path / 'copy'), name='moved')
    assert train_main(['--recipe', str(moved), '--output', str(out), '--resume', 'auto', '--quiet']) == 2
    assert 'data.remote' in capsys.readouterr().err  # another shard set is another order: refused
    for n, change in enumerate(('data.num_canonical_nodes=4', 'data.shuffle_algo=py1s', 'data.stream_order=samples')):
        assert train_main(['--recipe', str(recipe), '--output', str(out), '--resume', 'auto', '--quiet', '--set',
                           change, '--set', f'data.local={tmp_path / f"refused{n}"}']) == 2  # a cache of its own
        refusal = capsys.readouterr().err.strip().splitlines()[-1]
        key, value = change.split('=')
        assert f'{key} ' in refusal and f"-> {value if key.endswith('nodes') else repr(value)})" in refusal, refusal
    assert_same_training_state(train(recipe, out, '--resume', 'auto'), reference[2])


def test_two_ranks_killed_then_resumed_on_one_continue_the_same_trajectory(reference, shards, tmp_path):
    recipe, out = streamed_recipe(tmp_path, shards), tmp_path / 'run'
    kill_9_after_step(start(torchrun_command(2, '--recipe', recipe, '--output', out)), out, 3)
    killed = checkpoint.load(out / 'checkpoints' / 'step-00000003.pt')
    assert killed['plan']['world_size'] == 2
    assert {key: killed['recipe']['data'][key] for key in ('stream_order', 'num_canonical_nodes', 'shuffle_algo',
                                                           'shuffle_block_size')} == {
        'stream_order': 'shards', 'num_canonical_nodes': 2, 'shuffle_algo': 'py1e', 'shuffle_block_size': 16}
    resumed, whole = train(recipe, out, '--resume', 'auto'), reference[2]
    assert resumed['plan']['world_size'] == 1
    assert resumed['state']['samples_seen'] == whole['state']['samples_seen'] == 8 * 16
    # the weights, not BatchNorm's running statistics, which each rank keeps from its own micro-batches
    weights = largest_difference(whole['model'], resumed['model'], statistics=False)
    ema = largest_difference(whole['ema'], resumed['ema'], statistics=False)
    print(f'2 ranks for 3+ steps, killed, then 1 process: max |weight difference| {weights:.2e} (EMA {ema:.2e})')
    assert weights < 1e-5 and ema < 1e-5
    assert largest_difference(killed['model'], whole['model'], statistics=False) > 1e-3, 'the 5 steps after the ' \
                                                                                      'kill hardly moved the weights'


def test_bench_compares_the_input_rate_of_the_shards_with_the_folder_round_by_round(folder, shards, tmp_path):
    recipe, out = recipe_file(tmp_path / 'folder.yaml', dataset='folder', data_dir=str(folder)), tmp_path / 'b.json'
    assert bench.main(['--recipe', str(recipe), '--compare-shards', str(shards), '--rounds', '2', '--steps', '2',
                       '--warmup', '1', '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result['input_folder']) == len(result['input_streaming']) == 2
    assert result['streaming_vs_folder'] == [s / f for s, f in zip(result['input_streaming'], result['input_folder'])]
    assert all(rate > 0 for rate in result['input_folder'] + result['input_streaming'])


def test_bench_refuses_in_one_line_what_a_streaming_recipe_refuses(folder, shards, tmp_path, capfd):
    recipe = recipe_file(tmp_path / 'folder.yaml', dataset='folder', data_dir=str(folder))
    assert bench.main(['--recipe', str(recipe), '--compare-shards', str(shards), '--set', 'aug.aug_repeats=3']) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'aug.aug_repeats needs data.stream_order samples' in err[0], err


# ---------------------------------------------------------------------------------------------- remote and bad input

@pytest.fixture
def s3(monkeypatch, shards):
    """An S3 server on 127.0.0.1 (moto, in this process) holding the shards in s3://data/mds; stopped after."""
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in (('S3_ENDPOINT_URL', f'http://{host}:{port}'), ('AWS_ACCESS_KEY_ID', 'test'),
                       ('AWS_SECRET_ACCESS_KEY', 'test'), ('AWS_DEFAULT_REGION', 'us-east-1')):
        monkeypatch.setenv(key, value)
    client = boto3.client('s3', endpoint_url=f'http://{host}:{port}')
    client.create_bucket(Bucket='data')
    for path in shards.rglob('*'):
        if path.is_file():
            client.upload_file(str(path), 'data', f'mds/{path.relative_to(shards)}')
    yield client
    server.stop()


def test_a_run_streamed_from_s3_equals_the_local_run(reference, s3, tmp_path):
    assert_same_training_state(train(streamed_recipe(tmp_path, 's3://data/mds'), tmp_path / 'run'), reference[2])


def test_bad_credentials_and_a_missing_shard_on_s3_are_one_line_naming_them(s3, tmp_path, monkeypatch):
    s3.delete_object(Bucket='data', Key='mds/train/shard.00001.mds')
    source = data.StreamedImages('s3://data/mds', str(tmp_path / 'cache'), 'train')
    missing = next(i for i in range(len(source)) if source.dataset.spanner[i][0] == 1)
    with pytest.raises(data.DataUnavailable, match=r'shard shard\.00001\.mds of s3://data/mds/train'):
        data.replacing_unreadable(source, missing, source.load)  # not skipped as an unreadable image
    from moto import settings
    monkeypatch.setattr(settings, 'INITIAL_NO_AUTH_ACTION_COUNT', 0)  # moto now checks the keys: 'test' is unknown
    with pytest.raises(UserError, match=r"'validation' at data.remote s3://data/mds: access denied .*credentials"):
        data.StreamedImages('s3://data/mds', str(tmp_path / 'cache'), 'validation')


def test_a_streaming_recipe_without_remote_or_local_or_with_repeats_in_shard_order_is_refused_at_load(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text(yaml.safe_dump(merge(STREAMED, {'data': {'dataset': 'streaming', 'remote': 's3://b/mds'}})))
    with pytest.raises(UserError, match='data.dataset streaming needs data.remote .* and data.local'):
        recipes.load(str(path))
    path.write_text(yaml.safe_dump(merge(STREAMED, {'data': {'dataset': 'streaming', 'remote': 's3://b/mds',
                                                             'local': str(tmp_path)}, 'aug': {'aug_repeats': 3}})))
    with pytest.raises(UserError, match='aug.aug_repeats needs data.stream_order samples'):
        recipes.load(str(path))


def test_a_streamed_checkpoint_from_before_the_shard_order_is_refused_in_shard_order_and_resumes_in_sample_order():
    streamed = merge(STREAMED, {'data': {'dataset': 'streaming', 'remote': 's3://b/mds', 'local': '/tmp/cache'}})
    saved = recipes.from_dict(streamed).to_dict()
    del saved['data']['stream_order']  # as a checkpoint saved before the key existed: it read a uniform permutation
    current = recipes.from_dict(streamed)
    with pytest.raises(UserError, match="data.stream_order 'samples' -> 'shards'"):
        cli.check_recipe_changes(saved, current, 'last.pt', allowed=False)
    cli.check_recipe_changes(saved, recipes.from_dict(merge(streamed, {'data': {'stream_order': 'samples'}})),
                             'last.pt', allowed=False)


def test_an_unreachable_endpoint_and_an_unusable_cache_are_one_line(monkeypatch, shards, tmp_path):
    monkeypatch.setenv('S3_ENDPOINT_URL', 'http://127.0.0.1:9')  # the discard port: nothing listens
    monkeypatch.setenv('AWS_MAX_ATTEMPTS', '1')
    for key in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'):
        monkeypatch.setenv(key, 'test')
    with pytest.raises(UserError, match=r'data.remote s3://data/mds: .*127\.0\.0\.1:9'):
        data.StreamedImages('s3://data/mds', str(tmp_path / 'cache'), 'train')
    (tmp_path / 'a-file').write_text('')
    with pytest.raises(UserError, match=r'cannot create data.local .*a-file/cache: Not a directory'):
        data.StreamedImages(str(shards), str(tmp_path / 'a-file' / 'cache'), 'train')



class ThreadRank(World):
    """A rank as a thread of this process: gather meets the other threads at a barrier, as ranks meet in the
    process group's all-gather (without the 30 s of starting two processes)."""
    barrier, said = None, None

    def gather(self, value) -> list:
        self.said[self.rank] = value
        self.barrier.wait()
        told = list(self.said)
        self.barrier.wait()
        return told


def test_a_data_local_that_one_rank_cannot_create_stops_every_rank_with_the_same_line(tmp_path):
    (tmp_path / 'node0').mkdir()
    (tmp_path / 'node1').write_text('a file where rank 1 expects a folder')
    ThreadRank.barrier, ThreadRank.said, errors = threading.Barrier(2, timeout=60), [None, None], [None, None]

    def rank_main(rank: int):  # each rank its own data.local, as on disks local to each node
        with pytest.raises(UserError) as raised:
            data.make_shard_cache(str(tmp_path / f'node{rank}' / 'cache'), ThreadRank(rank=rank, size=2))
        errors[rank] = str(raised.value)
    ranks = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert errors[0] == errors[1] == (f'rank 1 could not prepare its shard cache: cannot create data.local '
                                      f'{tmp_path / "node1" / "cache"}: Not a directory')
