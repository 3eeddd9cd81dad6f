"""The DALI training input on DALI's CPU backend: order, resume, shapes and ranges, unreadable files."""
from __future__ import annotations

import io
import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

pytest.importorskip('nvidia.dali')

from mnv_train import checkpoint, dali_pipeline, data  # noqa: E402
from mnv_train import recipe as recipes  # noqa: E402
from mnv_train.cli import train_main  # noqa: E402
from mnv_train.errors import UserError  # noqa: E402
from mnv_train.recipe import AugConfig, DataConfig  # noqa: E402

from conftest import REPO  # noqa: E402

BATCH = 4
RAND_AUGMENT = 'rand-m9-n2-mstd0-p0.5'


def jpeg(seed: int, width: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((40, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


class JpegFiles:
    """A folder-like source whose label is the sample index; `broken` indices hold bytes no decoder reads."""

    def __init__(self, count: int, broken=()):
        self.files = [b'not an image' if i in broken else jpeg(i, 40 + i % 5 * 8) for i in range(count)]

    def __len__(self):
        return len(self.files)

    def read_bytes(self, index):
        return self.files[index], index

    def describe(self, index):
        return f'file{index}.jpg'


class RecordedReads(JpegFiles):
    """JpegFiles that notes the id of the process reading, at every read."""

    def __init__(self, count: int, log):
        super().__init__(count)
        self.log = log

    def read_bytes(self, index):
        with open(self.log, 'a') as log:
            log.write(f'{os.getpid()}\n')
        return super().read_bytes(index)


NORM = data.Normalization((0.5,) * 3, (0.5,) * 3)


def loader(source, auto_augment=RAND_AUGMENT, seed=0, workers=1, rank=0, world_size=1, batch=BATCH,
           img_size=24, hflip=0.5) -> dali_pipeline.DaliLoader:
    sampler = data.EpochSampler(len(source), rank=rank, world_size=world_size, seed=seed, micro_batch=batch)
    return dali_pipeline.DaliLoader(source, sampler, batch, DataConfig(img_size=img_size, num_workers=workers),
                                    AugConfig(auto_augment=auto_augment, train_interpolation='bicubic', hflip=hflip),
                                    NORM, torch.device('cpu'))


def epoch(dali: dali_pipeline.DaliLoader, number: int, start: int = 0) -> list:
    dali.sampler.set_position(number, start)
    return list(dali)


def by_label(batches) -> dict:
    """Each image of the batches under its label (the sample index: each is taken once an epoch)."""
    return {int(label): image for images, labels, _ in batches for image, label in zip(images, labels)}


@pytest.fixture(scope='module')
def two_epochs():
    """A loader over 16 files, two epochs of 4 batches."""
    dali = loader(JpegFiles(16))
    return dali, epoch(dali, 0), epoch(dali, 1)


def test_dali_batches_hold_the_host_samplers_indices_in_its_order(two_epochs):
    dali, first, second = two_epochs
    for number, batches in enumerate((first, second)):
        host = data.EpochSampler(16, rank=0, world_size=1, seed=0, micro_batch=BATCH)
        host.set_position(number)
        assert torch.cat([labels for _, labels, _ in batches]).tolist() == [index for index, _ in host]


def test_dalis_python_workers_read_the_files_not_the_training_process(tmp_path):
    log = tmp_path / 'reads'
    labels = [label for _, batch, _ in epoch(loader(RecordedReads(8, log), auto_augment=None, workers=2), 0)
              for label in batch.tolist()]
    readers = set(log.read_text().split())
    assert sorted(labels) == list(range(8)) and readers and str(os.getpid()) not in readers


@pytest.mark.parametrize('workers', [0, 2])
def test_the_batches_are_the_same_whatever_the_number_of_workers(two_epochs, workers):
    _, first, _ = two_epochs  # read by one worker
    for (a, la, _), (b, lb, _) in zip(first, epoch(loader(JpegFiles(16), workers=workers), 0), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_dali_batches_are_uint8_chw_at_img_size_with_labels_and_no_skips(two_epochs):
    _, first, _ = two_epochs
    images, labels, skipped = first[0]
    assert images.dtype == torch.uint8 and images.shape == (BATCH, 3, 24, 24)
    assert labels.dtype == torch.int64 and labels.shape == (BATCH,) and skipped == 0
    assert images.float().std() > 20  # random photos, not a blank canvas
    assert not torch.equal(images[0], images[1])


def test_a_loader_started_mid_epoch_gives_the_uninterrupted_batches_and_next_epoch(two_epochs):
    """What a resume does: a new loader (no DALI state saved) at the checkpoint's place in the epoch."""
    _, first, second = two_epochs
    resumed = loader(JpegFiles(16))
    for (a, la, _), (b, lb, _) in zip(first[2:], epoch(resumed, 0, start=2 * BATCH), strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    for (a, _, _), (b, _, _) in zip(second, epoch(resumed, 1), strict=True):
        assert torch.equal(a, b)


def test_each_sample_is_augmented_the_same_on_two_ranks_as_on_one(two_epochs):
    """The epoch's samples on 2 ranks of 2 batches each step (4 samples per step, 2 per rank) against 1 rank of
    4: the same samples in each step, identically augmented, whichever rank takes them."""
    _, first, second = two_epochs
    for number, whole in enumerate((first, second)):
        ranks = [epoch(loader(JpegFiles(16), rank=rank, world_size=2, batch=BATCH // 2), number) for rank in (0, 1)]
        shared = {**by_label(ranks[0]), **by_label(ranks[1])}
        assert shared.keys() == by_label(whole).keys()
        assert all(torch.equal(shared[label], image) for label, image in by_label(whole).items())
        for step, (_, labels, _) in enumerate(whole):  # each step's samples are split between the ranks
            split = torch.cat([ranks[0][step][1], ranks[1][step][1]])
            assert sorted(split.tolist()) == sorted(labels.tolist())


def test_a_loader_from_the_same_seed_gives_the_same_batches_and_another_seed_others(two_epochs):
    _, first, _ = two_epochs
    again, other = loader(JpegFiles(16)), loader(JpegFiles(16), seed=1)
    assert torch.equal(epoch(again, 0)[0][0], first[0][0])
    assert not torch.equal(epoch(other, 0)[0][0], first[0][0])


class SmoothPhotos(JpegFiles):
    """Blurred JPEGs of several sizes (noise would make the two resizers' small differences large)."""

    def __init__(self, count: int):
        self.files = []
        for i in range(count):
            coarse = (np.random.default_rng(i).random((6 + i % 3, 8 + i % 4, 3)) * 255).astype(np.uint8)
            photo = Image.fromarray(coarse).resize((64 + 8 * (i % 4), 48 + 8 * (i % 3)), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            photo.filter(ImageFilter.GaussianBlur(2)).save(buffer, 'JPEG', quality=95)
            self.files.append(buffer.getvalue())

    def load(self, index):
        return Image.open(io.BytesIO(self.files[index])).convert('RGB'), index


def host_and_dali(auto_augment, count=32, size=32, hflip=0.5) -> tuple[dict, dict, dict]:
    """One epoch's images by label, from the host path (timm's transforms in TransformedDataset) and from DALI,
    and the names of the RandAugment ops timm ran for each on the host path, noted as they ran (an op's level
    function is called only when it runs)."""
    from timm.data.auto_augment import RandAugment
    source = SmoothPhotos(count)
    dali = loader(source, auto_augment=auto_augment, workers=0, batch=8, img_size=size, hflip=hflip)
    transform = data.train_transform(dali.cfg, dali.aug, NORM)
    ran: dict[int, list] = {}
    for op in next((t.ops for t in transform.transforms if isinstance(t, RandAugment)), []):
        def noted(magnitude, hparams, op=op, level=op.level_fn):
            ran[label].append(op.name)
            return level(magnitude, hparams) if level else ()
        op.level_fn = noted
    host, dataset = {}, data.TransformedDataset(source, transform)
    dali.sampler.set_position(0)
    for index, seed in dali.sampler:
        label, ran[index] = index, []
        image, _, _ = dataset[(index, seed)]
        host[label] = torch.as_tensor(np.asarray(image))
    return host, by_label(epoch(dali, 0)), ran


def gaps(host: dict, dali: dict) -> dict:
    """Mean absolute difference (of 255) between the two pipelines' images of each sample."""
    return {label: (dali[label].float() - image.float()).abs().mean().item() for label, image in host.items()}


@pytest.mark.parametrize('hflip', [0.5, 0.0])  # at 0 timm's transform has no flip at all
def test_dali_crops_and_flips_each_sample_as_the_host_path_does(hflip):
    """timm's crop and flip, run here on the host path, are the reference: with the same draws, only the decoders
    and resizers differ (under 0.5 of 255 on every sample), while two different samples differ by ~50."""
    host, dali, _ = host_and_dali(auto_augment=None, hflip=hflip)
    same = gaps(host, dali)
    assert max(same.values()) < 0.5, same
    shifted = {label: host[(label + 1) % len(host)] for label in host}
    assert min(gaps(shifted, dali).values()) > 20


@pytest.mark.parametrize('auto_augment', [RAND_AUGMENT, 'rand-m9-n3-mstd0-inc1'])
def test_dali_runs_the_randaugment_ops_and_signs_timm_drew_for_each_sample(auto_augment):
    """timm's RandAugment on the host path is the reference. DALI runs the same ops with the same signs: every
    sample whose ops exclude Equalize (DALI's histogram equalisation is not PIL's) is within 6 of 255 of the host's
    image (a shear, translate or rotate of the wrong sign is ~45 away)."""
    host, dali, ran = host_and_dali(auto_augment)
    assert sum(len(names) for names in ran.values()) > len(host)  # ops ran: p 0.5, 2-3 layers
    assert any(name.startswith(('Shear', 'Translate', 'Rotate')) for names in ran.values() for name in names)
    same = gaps(host, dali)
    assert all(gap < 6 for label, gap in same.items() if 'Equalize' not in ran[label]), (same, ran)
    assert sorted(same.values())[len(same) // 2] < 1.5


def test_a_file_no_decoder_reads_is_named_in_one_line_and_replaced_by_the_next(capfd):
    dali = loader(JpegFiles(8, broken={5}), auto_augment=None)
    labels, skipped = [], 0
    for _, batch_labels, batch_skipped in epoch(dali, 0):
        labels += batch_labels.tolist()
        skipped += batch_skipped
    warning = [line for line in capfd.readouterr().err.splitlines() if 'file5.jpg' in line]  # a worker warned
    assert len(warning) == 1 and 'sample 6 takes its place' in warning[0]
    assert skipped == 1 and 5 not in labels and labels.count(6) == 2


@pytest.mark.parametrize('aug, culprit', [
    ({'auto_augment': 'rand-m9-n2-mstd0.5'}, 'mstd'),
    ({'auto_augment': 'rand-m15-mmax15-n2-mstd0'}, 'magnitude 15'),
    ({'auto_augment': 'augmix-m5'}, 'rand-'),
    ({'color_jitter': 0.4}, 'color_jitter'),
    ({'train_interpolation': 'random'}, 'train_interpolation'),
])
def test_what_dali_does_not_run_is_a_one_line_error_naming_the_key(aug, culprit):
    with pytest.raises(UserError, match=culprit) as error:
        dali_pipeline.check_recipe(DataConfig(), AugConfig(**{'train_interpolation': 'bilinear', **aug}))
    assert '\n' not in str(error.value)


def test_a_file_that_stops_short_stops_the_run_with_one_line_naming_it():
    source = JpegFiles(8)
    source.files[5] = source.files[5][:len(source.files[5]) // 3]  # the header reads, the picture does not
    with pytest.raises(UserError, match=r'^DALI cannot decode file5\.jpg: check the data') as error:
        epoch(loader(source, auto_augment=None), 0)
    assert '\n' not in str(error.value)


def test_of_the_files_dali_may_have_failed_on_only_those_the_host_decode_fails_on_are_named():
    source = JpegFiles(12)
    source.files[5] = source.files[5][:len(source.files[5]) // 3]
    dali = loader(source, auto_augment=None)
    dali.files = dali_pipeline.EpochFiles(source, np.arange(12), np.arange(12), seed=0, epoch=0, batch_size=BATCH,
                                          draws=dali.draws)
    assert dali.files.in_flight(1, sample=1) == [5, 9]  # batch 1 next out, batch 2 read ahead
    assert dali.culprit('Failed to decode sample #1', batch=0) == dali.culprit('Error in thread 0', 1) == 'file5.jpg'


def test_a_run_of_unreadable_files_in_a_worker_stops_the_run_with_its_one_line():
    with pytest.raises(UserError, match=f'^{data.MAX_CONSECUTIVE_BAD} unreadable images in a row') as error:
        epoch(loader(JpegFiles(16, broken=range(16)), auto_augment=None), 0)
    assert '\n' not in str(error.value)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    for split, count in (('train', 32), ('validation', 8)):
        for label in range(2):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(count // 2):
                (folder / f'{i}.jpg').write_bytes(jpeg(i + 100 * label, 40 + 8 * label))
    return root


def dali_recipe(write_recipe, image_folder, **train):
    return write_recipe({'data': {'dataset': 'folder', 'data_dir': str(image_folder), 'pipeline': 'dali'},
                         'aug': {'auto_augment': RAND_AUGMENT, 'train_interpolation': 'bilinear'},
                         'train': {'global_batch_size': 8, 'batch_size': 8, **train}, 'schedule': {'epochs': 2}})


def test_spawned_workers_as_on_cuda_read_an_image_folder_in_the_samplers_order_and_augment_as_in_process(
        image_folder, monkeypatch):
    """Spawned workers get the draws' recording RandAugment by pickle: it must still note the ops it runs (into
    its own list), or DALI would silently run none."""
    source = data.TimmImages('folder', str(image_folder), 'train', training=True)

    def batches(workers: int) -> list:
        dali = dali_pipeline.DaliLoader(source, data.EpochSampler(len(source), rank=0, world_size=1, seed=0,
                                                                  micro_batch=8), 8,
                                        DataConfig(img_size=24, num_workers=workers),
                                        AugConfig(auto_augment=RAND_AUGMENT, train_interpolation='bilinear'), NORM,
                                        torch.device('cpu'))
        return epoch(dali, 0)
    in_process = batches(0)
    monkeypatch.setattr(dali_pipeline, 'start_method', lambda device: 'spawn')  # the source must pickle
    spawned = batches(1)
    labels = torch.cat([batch for _, batch, _ in spawned]).tolist()
    sampler = data.EpochSampler(len(source), rank=0, world_size=1, seed=0, micro_batch=8)
    assert labels == [source.read_bytes(index)[1] for index, _ in sampler]
    assert all(torch.equal(a, b) for (a, _, _), (b, _, _) in zip(in_process, spawned, strict=True))


def test_a_dali_run_stopped_mid_epoch_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, write_recipe,
                                                                                       image_folder):
    recipe = dali_recipe(write_recipe, image_folder)
    out = {name: tmp_path / name for name in ('whole', 'sliced')}
    assert train_main(['--recipe', str(recipe), '--output', str(out['whole']), '--quiet']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(out['sliced']), '--quiet', '--max-steps', '3']) == 0
    assert train_main(['--recipe', str(recipe), '--output', str(out['sliced']), '--quiet', '--resume', 'auto']) == 0
    whole, sliced = (checkpoint.load(out[name] / 'checkpoints' / 'last.pt') for name in ('whole', 'sliced'))
    assert whole['state']['step'] == 8 and 'input' not in whole  # no DALI state: it draws nothing itself
    assert all(torch.equal(whole['model'][key], sliced['model'][key]) for key in whole['model'])


def test_precise_bn_borrows_the_dali_loader_without_moving_trainings_augmentations(tmp_path, write_recipe,
                                                                                   image_folder):
    """Precise BN takes batches from the start of the epoch through the training loader; with DALI drawing nothing
    itself, training then sees the batches it would have seen: every weight as without it, BN statistics not."""
    runs = {}
    for batches in (0, 2):
        out = tmp_path / str(batches)
        recipe = dali_recipe(write_recipe, image_folder, precise_bn_batches=batches)
        assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 0
        runs[batches] = checkpoint.load(out / 'checkpoints' / 'last.pt')['model']
    statistics = [key for key in runs[0] if key.endswith(('running_mean', 'running_var'))]
    weights = [key for key in runs[0] if key not in statistics and not key.endswith('num_batches_tracked')]
    assert all(torch.equal(runs[0][key], runs[2][key]) for key in weights)
    assert not all(torch.equal(runs[0][key], runs[2][key]) for key in statistics)


def test_data_pipeline_takes_host_or_dali_and_defaults_to_host():
    assert DataConfig().pipeline == 'host'
    with pytest.raises(UserError, match='data.pipeline'):
        recipes.load('mnv4_conv_small', ['data.pipeline=gpu'])


# ---------------------------------------------------------------------------------------------- the GPU check

def bench_row(model: float, input_rate: float, train: float) -> dict:
    return {'model': model, 'input': input_rate, 'train': train, 'bound_by': 'input' if input_rate < model else 'model',
            'train_vs_bound': train / min(model, input_rate), 'per_device_batch': 256, 'workers': 16}


def test_the_gpu_summary_checks_the_dali_targets_and_says_which_bound_each_row_is_under(tmp_path):
    sys.path.insert(0, str(REPO / 'benchmarks'))
    import gpu_summary  # a script folder, not a package
    (tmp_path / 'bench').mkdir()
    rows = {'conv_small_224_host': bench_row(16926, 4900, 4840), 'conv_small_224_dali': bench_row(16926, 30000, 14000),
            'hybrid_large_384_dali': bench_row(1600, 9000, 1500)}
    for name, row in rows.items():
        (tmp_path / 'bench' / f'{name}.json').write_text(json.dumps(row))
    assert gpu_summary.main(['summarize', str(tmp_path)]) == 0
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    dali = {t['name'].split(':')[0]: t for t in report['targets'] if t['name'].startswith('DALI')}
    assert dali['DALI end to end >= 2.5 x the host pipeline\'s']['value'] == pytest.approx(14000 / 4840)
    assert dali['DALI end to end >= 80% of model only']['value'] == pytest.approx(14000 / 16926)
    assert dali['DALI end to end >= 1700 img/s per device']['met'] is False
    summary = (tmp_path / 'summary.md').read_text().splitlines()
    for name, bound in (('conv_small_224_host', 'input (4900.0 img/s)'), ('conv_small_224_dali', 'model (16926.0'),
                        ('hybrid_large_384_dali', 'model (1600.0')):
        label = {**gpu_summary.BENCH_LABELS, **gpu_summary.DALI_LABELS}[name]
        assert any(line.startswith(f'| {label} |') and bound in line.split('|')[-2] for line in summary), name


def test_the_gpu_checks_dry_run_runs_the_dali_rows_when_asked(tmp_path):
    from test_gpu_check import run_check
    skipped = ('pytest_cuda bench_conv_small_224_host bench_hybrid_large_384_eager fmnist '
               'bench_hybrid_large_384_compiled bench_hybrid_large_384_dali')
    result = run_check('--tiny', timeout=600, GPU_CHECK_OUT=str(tmp_path / 'out'), SKIP=skipped, DALI_ROWS='1')
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    steps = {step['name']: step for step in report['steps']}
    assert steps['bench_conv_small_224_dali']['status'] == 'ok'
    assert '--set data.pipeline=dali' in steps['bench_hybrid_large_384_dali']['command']
    row = report['bench']['conv_small_224_dali']
    assert row['train'] > 0 and row['bound_by'] in ('model', 'input')


# ---------------------------------------------------------------------------------------------- RandAugment vs timm

def dali_op_outputs(image: np.ndarray, increasing: bool, magnitude: int) -> list:
    """Each op of the DALI suite alone at `magnitude` on 8 copies of `image`, in one pipeline."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.auto_aug import rand_augment
    suite = dali_pipeline.timm_op_list(increasing)

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=3, enable_conditionals=True)
    def each_op():
        x = fn.external_source(source=lambda: [image] * 8, batch=True, layout='HWC')
        outputs = []
        for op in suite:
            kwargs = {'fill_value': dali_pipeline.FILL} if op.name.startswith(('rotate', 'shear', 'translate')) else {}
            kwargs.update({'shape': list(image.shape[:2])} if op.name.startswith('translate') else {})
            outputs.append(rand_augment.apply_rand_augment([op], x, n=1, m=magnitude,
                                                           num_magnitude_bins=dali_pipeline.MAGNITUDE_BINS, **kwargs))
        return tuple(outputs)

    pipe = each_op()
    pipe.build()
    return [[np.asarray(sample, dtype=float) for sample in batch] for batch in pipe.run()]


@pytest.mark.parametrize('increasing', [False, True], ids=['rand', 'rand-inc1'])
def test_each_dali_randaugment_op_gives_timms_image_at_magnitude_9(increasing):
    """timm's own ops, run here, are the reference; each DALI op's output is compared with timm's for both signs
    of its magnitude. Equalize differs most (DALI's histogram equalisation is not PIL's), within 6 levels of 255."""
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, AugmentOp
    photo = Image.open(io.BytesIO(jpeg(7, 96))).resize((96, 96))
    smooth = np.asarray(photo.filter(ImageFilter.GaussianBlur(3)))
    names = _RAND_INCREASING_TRANSFORMS if increasing else _RAND_TRANSFORMS
    outputs = dali_op_outputs(smooth, increasing, magnitude=9)
    assert len(outputs) == len(names) == 15
    for name, batch in zip(names, outputs):
        reference = []
        for sign_seed in range(4):  # timm draws each op's sign with random.random()
            random.seed(sign_seed)
            op = AugmentOp(name, prob=1.0, magnitude=9, hparams={'img_mean': (dali_pipeline.FILL,) * 3})
            reference.append(np.asarray(op(Image.fromarray(smooth)), dtype=float))
        gap = max(min(np.abs(sample - ref).mean() for ref in reference) for sample in batch)
        assert gap < (6 if name == 'Equalize' else 1.5), (name, gap)


def test_a_dry_run_times_a_dali_batch_and_previews_it_from_one_pipeline(tmp_path, write_recipe, image_folder, capsys,
                                                                       monkeypatch):
    recipe, built = dali_recipe(write_recipe, image_folder), []
    define = dali_pipeline.define_pipeline
    monkeypatch.setattr(dali_pipeline, 'define_pipeline', lambda *args: built.append(args) or define(*args))
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--dry-run']) == 0
    assert len(built) == 1  # the probes of several sizes and the preview share one batch
    assert 'forward + backward' in capsys.readouterr().out  # the probe batch came from DALI
    plots = tmp_path / 'run' / 'plots'  # the preview shows DALI's batch, and its table the recipe's ops
    assert (plots / 'augment_preview.png').stat().st_size > 0
    assert '| TranslateXRel | 9 |' in (plots / 'augment_preview.md').read_text()


def test_an_error_other_than_a_failed_decode_keeps_its_traceback(monkeypatch):
    class FailingPipeline:
        def run(self):
            raise RuntimeError('Critical error in pipeline: out of memory')
    monkeypatch.setattr(dali_pipeline, 'define_pipeline', lambda *args: FailingPipeline())
    with pytest.raises(RuntimeError, match='out of memory'):  # not reported as a bad image
        epoch(loader(JpegFiles(8), auto_augment=None), 0)
