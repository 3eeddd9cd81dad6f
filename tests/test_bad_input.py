"""Bad input in every entry point: one line on stderr naming the culprit, exit 2, no traceback, nothing lost.

Each case builds one bad input and returns the call that must refuse it. Most run the tool's `main` in this
process (no torch import per case); the few that need what only a fresh process shows run through a subprocess.
All cases share one tiny training run. Unreadable images are not here: a run skips them (tests/test_faults.py).
"""
import ctypes
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mnv_train import average, bench, checkpoint, export, lr_find, preresize, report
from mnv_train.cli import train_main, validate_main

from conftest import ONE_EPOCH, REPO, TINY, merge, one_thread, run_cli, train_tiny

MNV3 = {'model': {'name': 'mobilenetv3_small_100'}}
SMALL_RUN = merge(ONE_EPOCH, {'data': {'synthetic_train_size': 64, 'synthetic_val_size': 16}})  # 2 steps
FOLDER = merge(ONE_EPOCH, {'data': {'dataset': 'folder'}, 'train': {'global_batch_size': 4, 'batch_size': 4}})
FRESH = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}  # this checkout; one thread (see single_thread)


@pytest.fixture(scope='module', autouse=True)
def single_thread():
    """Every case is tiny; on cores shared with other work, a second torch thread spins more than it helps."""
    with one_thread():
        yield


@pytest.fixture(scope='module')
def trained(tmp_path_factory, single_thread) -> Path:
    """The one tiny run (mobilenetv4_conv_small, 4 synthetic classes, one epoch of 2 steps) every case may read."""
    return train_tiny(tmp_path_factory.mktemp('bad-input'), SMALL_RUN)[1]


# ---------------------------------------------------------------------------------------------- harness

@dataclass
class Call:
    """A tool's main with its arguments, the substring its error line must hold, and checks to run afterwards."""
    main: Callable
    argv: list
    culprit: str | tuple  # every one of these substrings
    after: Optional[Callable[[], None]] = None
    unprivileged: bool = False  # run in a child that cannot bypass file permissions, even as root (CI)


@dataclass
class Ctx:
    tmp: Path
    run: Path  # the shared tiny run: never written to
    fmnist: Path

    def file(self, name: str, content) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        return path

    def recipe(self, changes: Optional[dict] = None, name: str = 'tiny') -> Path:
        return self.file(f'{name}.yaml', yaml.safe_dump(merge(TINY, changes or {})))

    def train(self, recipe: Path, *extra) -> list:
        return ['--recipe', recipe, '--output', self.tmp / 'out', '--quiet', *extra]

    def checkpoint(self, name: str = 'ckpt') -> Path:
        """A private copy of the run's last checkpoint and its manifest."""
        path = self.tmp / name / 'last.pt'
        path.parent.mkdir(parents=True, exist_ok=True)
        last = self.run / 'checkpoints' / 'last.pt'
        for source in (last, checkpoint.manifest_path(last)):
            shutil.copyfile(source, path.parent / source.name)
        return path

    def hostile(self, payload: dict, name: str = 'hostile') -> Path:
        """A torch file holding `payload` with a manifest that matches it, as an attacker would write one."""
        path = self.tmp / name / 'step-00000001.pt'
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
        data = path.read_bytes()
        checkpoint.manifest_path(path).write_text(json.dumps(
            {'format': checkpoint.FORMAT, 'step': 1, 'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}))
        return path

    def images(self, root: Path, split: str, classes: int, per_class: int = 4) -> Path:
        folder = root / split
        rng = np.random.default_rng(0)
        for c in range(classes):
            (folder / f'class{c}').mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f'class{c}' / f'{i}.png')
        return root

    def unreadable(self, path: Path) -> Path:
        """path with all permissions removed: only a Call with unprivileged=True is refused it, also as root."""
        path.chmod(0)
        return path


@pytest.fixture
def ctx(tmp_path, trained, tiny_fmnist):
    yield Ctx(tmp_path, trained, tiny_fmnist)
    for path in tmp_path.rglob('*'):  # give back what a case made unreadable, so the folder can be removed
        if not path.is_symlink():
            path.chmod(0o755)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def unchanged(folder: Path) -> Callable[[], None]:
    """A check that the files under folder are the ones there now, byte for byte."""
    before = snapshot(folder)

    def check():
        assert snapshot(folder) == before, f'files under {folder} changed'
    return check


def assert_one_line_error(code, err: str, culprit):
    assert 'Traceback' not in err, err
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), \
        f'exit {code}, stderr {len(lines)} line(s):\n{err}'
    for part in (culprit,) if isinstance(culprit, str) else culprit:
        assert part in lines[0], f'{part!r} not named in: {lines[0]}'


def without_permission_bypass():
    """In a child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so that root
    (CI runs as root) is refused what chmod forbids, as any user would be, while still owning the test's files."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP) failed')


def call_unprivileged(call: Call) -> tuple[int, str]:
    """(exit status, stderr) of call.main run in a child process without the power to bypass file permissions."""
    module, name = next((module, name) for module in sorted(sys.modules) if module.startswith('mnv_train.')
                        for name, value in vars(sys.modules[module]).items() if value is call.main)
    script = f'import sys; from {module} import {name} as main; sys.exit(main(sys.argv[1:]))'
    result = subprocess.run([sys.executable, '-c', script, *map(str, call.argv)], capture_output=True, text=True,
                            timeout=300, env=FRESH, preexec_fn=without_permission_bypass)
    return result.returncode, result.stderr


def expect_one_line_error(capfd, call: Call):
    """capfd, not capsys: a write to fd 2 (a library's C code, a subprocess) is output the user sees too. Any warning
    raised during the call is output as well, so one is a failure."""
    if call.unprivileged:
        code, err = call_unprivileged(call)
    else:
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            try:
                code = call.main([str(arg) for arg in call.argv])
            except SystemExit as e:  # argparse
                code = e.code
            except Exception as e:
                raise AssertionError(f'{type(e).__name__} escaped the tool\'s main: the user would see a '
                                     f'traceback') from e
        err = capfd.readouterr().err
        assert not caught, f'warnings besides the error line: {[str(w.message) for w in caught]}'
    assert_one_line_error(code, err, call.culprit)
    if call.after is not None:
        call.after()


def case(group: list, name: str):
    def register(build):
        group.append(pytest.param(build, id=name))
        return build
    return register


# ---------------------------------------------------------------------------------------------- recipe files

RECIPE_FILES = []


@case(RECIPE_FILES, 'binary garbage')
def _(c):
    path = c.file('garbage.yaml', random.Random(0).randbytes(300))
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'latin-1 bytes, not UTF-8')
def _(c):
    path = c.file('latin1.yaml', 'description: caf\xe9 au lait\n'.encode('latin-1'))
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'YAML syntax error')
def _(c):
    path = c.file('syntax.yaml', 'optim:\n  lr: [0.1\nschedule:\n  epochs: 3\n')
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'base chain cycle')
def _(c):
    c.file('b.yaml', 'base: a.yaml\n')
    path = c.file('a.yaml', 'base: b.yaml\n')
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'base that is not a name')
def _(c):
    path = c.file('listbase.yaml', 'base: [a, b]\n')
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'a directory')
def _(c):
    path = c.tmp / 'recipes.yaml'
    path.mkdir()
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'a YAML list')
def _(c):
    path = c.file('list.yaml', '- optim\n- schedule\n')
    return Call(train_main, c.train(path), str(path))


@case(RECIPE_FILES, 'unreadable file')
def _(c):
    path = c.unreadable(c.recipe())
    return Call(train_main, c.train(path), str(path), unprivileged=True)


@case(RECIPE_FILES, 'unknown recipe name')
def _(c):
    return Call(train_main, ['--recipe', 'mnv4_conv_smal_no_such', '--output', c.tmp / 'out'], 'mnv4_conv_smal_no_such')


@case(RECIPE_FILES, 'unknown key')
def _(c):
    return Call(train_main, c.train(c.recipe({'optim': {'lrr': 0.1}})), 'optim.lrr')


@case(RECIPE_FILES, 'wrong type')
def _(c):
    return Call(train_main, c.train(c.recipe({'schedule': {'epochs': 'ten'}})), 'schedule.epochs')


@case(RECIPE_FILES, 'out-of-range value')
def _(c):
    return Call(train_main, c.train(c.recipe({'optim': {'lr': -0.1}})), 'optim.lr')


@case(RECIPE_FILES, 'value outside a fixed set')
def _(c):
    return Call(train_main, c.train(c.recipe({'train': {'amp': 'fp32'}})), 'train.amp')


@case(RECIPE_FILES, 'a section that is a number')
def _(c):
    return Call(train_main, c.train(c.recipe({'optim': 0.1})), 'optim')


@case(RECIPE_FILES, 'unknown model name')
def _(c):
    return Call(train_main, c.train(c.recipe({'model': {'name': 'mobilenetv4_conv_smol'}})), 'mobilenetv4_conv_smol')


@case(RECIPE_FILES, 'model kwargs the model does not take')
def _(c):
    return Call(train_main, c.train(c.recipe({'model': {'kwargs': {'bogus_width': 2}}})), 'bogus_width')


@case(RECIPE_FILES, 'unknown optimizer')
def _(c):
    return Call(train_main, c.train(c.recipe({'optim': {'name': 'adamww'}})), 'adamww')


@case(RECIPE_FILES, 'unknown scheduler')
def _(c):
    return Call(train_main, c.train(c.recipe({'schedule': {'sched': 'cosinus'}})), 'cosinus')


@case(RECIPE_FILES, 'unknown dataset name')
def _(c):
    return Call(train_main, c.train(c.recipe({'data': {'dataset': 'synthetc'}})), 'synthetc')


@pytest.mark.parametrize('build', RECIPE_FILES)
def test_a_broken_recipe_is_refused_in_one_line_naming_the_file_key_or_value(build, ctx, capfd):
    expect_one_line_error(capfd, build(ctx))


# ---------------------------------------------------------------------------------------------- --set and flags

OVERRIDES = []


@case(OVERRIDES, 'no equals sign')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--set', 'optim.lr'), 'optim.lr')


@case(OVERRIDES, 'key under a value, not a section')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--set', 'optim.lr.peak=0.1'), 'optim.lr.peak')


@case(OVERRIDES, 'value of the wrong type')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--set', 'train.batch_size=big'), 'train.batch_size')


@case(OVERRIDES, 'unknown key')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--set', 'optim.lrr=0.1'), 'optim.lrr')


@case(OVERRIDES, 'empty value for a number')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--set', 'data.img_size='), 'data.img_size')


@case(OVERRIDES, 'flag value that is not a number')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--global-batch', 'ten'), '--global-batch')


@case(OVERRIDES, 'flag count below 1')
def _(c):
    return Call(train_main, c.train(c.recipe(), '--global-batch', '0'), ('--global-batch', '0 is below 1'))


@pytest.mark.parametrize('key, value', [
    ('data.interpolation', 'bicubix'), ('aug.train_interpolation', 'bilinearx'), ('aug.auto_augment', 'foo'),
    ('aug.cutmix_minmax', '[0.2]'), ('optim.betas', '[0.9, x]'), ('aug.ratio', '[0, 1]')])
def test_a_value_that_only_timm_would_have_refused_is_refused_at_load_in_one_line(key, value, ctx, capfd):
    """Each of these went through the schema and stopped the run with timm's traceback (or, aug.ratio, had every
    image skipped as unreadable)."""
    expect_one_line_error(capfd, Call(train_main, ctx.train(ctx.recipe(), '--set', f'{key}={value}'), key))


def test_fewer_model_classes_than_the_data_has_is_refused_before_training(ctx, capfd):
    expect_one_line_error(capfd, Call(train_main, ctx.train(ctx.recipe(), '--set', 'model.num_classes=3'),
                                      ('model.num_classes 3', '4 classes')))
    assert not (ctx.tmp / 'out' / 'checkpoints').exists()


@pytest.mark.parametrize('build', OVERRIDES)
def test_a_bad_override_is_refused_in_one_line_naming_it(build, ctx, capfd):
    expect_one_line_error(capfd, build(ctx))


# ---------------------------------------------------------------------------------------------- data

DATA = []


@case(DATA, 'image folder that does not exist')
def _(c):
    missing = c.tmp / 'no-such-data'
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', missing), str(missing))


@case(DATA, 'Fashion-MNIST folder that does not exist')
def _(c):
    missing = c.tmp / 'no-such-fmnist'
    return Call(train_main, c.train(c.recipe({'data': {'dataset': 'fashion_mnist'}}), '--data-dir', missing),
                str(missing))


@case(DATA, 'data dir that is a file')
def _(c):
    path = c.file('data.tar.gz.part', b'\x1f\x8b half a download')
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', path), str(path))


@case(DATA, 'empty folder')
def _(c):
    root = c.tmp / 'empty'
    root.mkdir()
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', root), str(root))


@case(DATA, 'no validation split folder')
def _(c):
    root = c.images(c.tmp / 'train-only', 'train', classes=2)
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', root), 'validation')


@case(DATA, 'split folder with no class folders')
def _(c):
    root = c.images(c.tmp / 'no-classes', 'validation', classes=2)
    (root / 'train').mkdir()
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', root), str(root / 'train'))


@case(DATA, 'class folders with no images')
def _(c):
    root = c.images(c.tmp / 'no-images', 'validation', classes=2)
    for name in ('cat', 'dog'):
        c.file(f'no-images/train/{name}/README.txt', 'images go here\n')
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', root), str(root / 'train'))


@case(DATA, 'unreadable split folder')
def _(c):
    root = c.images(c.images(c.tmp / 'locked', 'train', classes=2), 'validation', classes=2)
    c.unreadable(root / 'train')
    return Call(train_main, c.train(c.recipe(FOLDER), '--data-dir', root), str(root / 'train'), unprivileged=True)


@case(DATA, 'Fashion-MNIST files that are not idx files')
def _(c):
    root = c.tmp / 'fmnist-text'
    shutil.copytree(c.fmnist, root)
    bad = c.file('fmnist-text/train-images-idx3-ubyte.gz', 'this is not an idx file\n')
    return Call(train_main, c.train(c.recipe({'data': {'dataset': 'fashion_mnist'}}), '--data-dir', root), str(bad))


@case(DATA, 'Fashion-MNIST idx file cut short')
def _(c):
    import gzip
    root = c.tmp / 'fmnist-short'
    shutil.copytree(c.fmnist, root)
    bad = root / 'train-images-idx3-ubyte.gz'
    with gzip.open(bad, 'wb') as f:
        f.write(bytes.fromhex('00000803') + (64).to_bytes(4, 'big') + (28).to_bytes(4, 'big') * 2 + b'\0' * 100)
    return Call(train_main, c.train(c.recipe({'data': {'dataset': 'fashion_mnist'}}), '--data-dir', root), str(bad))


@pytest.mark.parametrize('build', DATA)
def test_missing_or_broken_data_is_refused_in_one_line_naming_the_path(build, ctx, capfd):
    expect_one_line_error(capfd, build(ctx))


# ---------------------------------------------------------------------------------------------- output folders

OUTPUTS = []


@case(OUTPUTS, 'train output that cannot be created')
def _(c):
    return Call(train_main, ['--recipe', c.recipe(), '--output', '/proc/mnv-run', '--quiet'], '/proc/mnv-run')


@case(OUTPUTS, 'train output under a regular file')
def _(c):
    blocker = c.file('somefile', 'not a folder\n')
    return Call(train_main, ['--recipe', c.recipe(), '--output', blocker / 'run', '--quiet'], str(blocker))


@case(OUTPUTS, 'train output that is read-only')
def _(c):
    folder = c.tmp / 'readonly'
    folder.mkdir()
    folder.chmod(0o555)
    return Call(train_main, ['--recipe', c.recipe(), '--output', folder / 'run', '--quiet'], str(folder),
                unprivileged=True)


@case(OUTPUTS, 'train output that already holds checkpoints, without --resume')
def _(c):
    out = c.tmp / 'previous'
    shutil.copytree(c.run, out)
    return Call(train_main, ['--recipe', c.recipe(), '--output', out, '--quiet'], str(out), after=unchanged(out))


@case(OUTPUTS, 'lr_find output under a regular file')
def _(c):
    blocker = c.file('somefile', 'not a folder\n')
    return Call(lr_find.main, ['--recipe', c.recipe(), '--output', blocker / 'lr', '--steps', '10'], str(blocker))


@case(OUTPUTS, 'validate --json under a regular file')
def _(c):
    blocker = c.file('somefile', 'not a folder\n')
    return Call(validate_main, [c.checkpoint(), '--json', blocker / 'eval.json'], str(blocker))


@case(OUTPUTS, 'export output under a regular file')
def _(c):
    blocker = c.file('somefile', 'not a folder\n')
    return Call(export.main, [c.checkpoint(), '--output', blocker / 'release'], str(blocker))


@case(OUTPUTS, 'preresize target under a regular file')
def _(c):
    source = c.images(c.tmp / 'src', 'train', classes=1, per_class=2)
    blocker = c.file('somefile', 'not a folder\n')
    return Call(preresize.main, [source, blocker / 'small', '--shorter-side', '16', '--workers', '1'], str(blocker))


@case(OUTPUTS, 'validate --json naming a folder')
def _(c):
    folder = c.tmp / 'results'
    folder.mkdir()
    return Call(validate_main, [c.checkpoint(), '--json', folder], ('--json', str(folder), 'is a folder'))


@pytest.mark.parametrize('build', OUTPUTS)
def test_an_output_that_cannot_be_written_is_refused_in_one_line_and_keeps_what_is_there(build, ctx, capfd):
    call = build(ctx)
    kept, shared_run_kept = unchanged(ctx.tmp), unchanged(ctx.run)  # every file each case set up, byte for byte
    expect_one_line_error(capfd, call)
    kept()
    shared_run_kept()


# ---------------------------------------------------------------------------------------------- checkpoints

CHECKPOINTS = []


class CodePayload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@case(CHECKPOINTS, 'validate given the current folder')
def _(c):
    return Call(validate_main, ['.'], '. is a folder')


def truncated(c) -> Path:
    path = c.checkpoint()
    path.write_bytes(path.read_bytes()[:2000])
    return path


def truncated_with_a_matching_manifest(c) -> Path:
    path = truncated(c)
    data = path.read_bytes()
    checkpoint.manifest_path(path).write_text(json.dumps(
        {'format': checkpoint.FORMAT, 'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}))
    return path


def code_payload(c) -> tuple[Path, Callable[[], None]]:
    marker = c.tmp / 'pwned'
    path = c.hostile({'format': checkpoint.FORMAT, 'model': CodePayload(marker), 'recipe': TINY})

    def nothing_ran():
        assert not marker.exists(), 'the pickled code ran'
    return path, nothing_ran


@case(CHECKPOINTS, 'resume: a text file')
def _(c):
    path = c.file('notes.pt', 'this is not a checkpoint\n')
    return Call(train_main, c.train(c.recipe(), '--resume', path), str(path))


@case(CHECKPOINTS, 'validate: a text file')
def _(c):
    path = c.file('notes.pt', 'this is not a checkpoint\n')
    return Call(validate_main, [path], str(path))


@case(CHECKPOINTS, 'validate --recipe: a text file')
def _(c):
    path = c.file('notes.pth', 'this is not a checkpoint\n')
    return Call(validate_main, [path, '--recipe', c.recipe()], str(path))


@case(CHECKPOINTS, 'resume: truncated')
def _(c):
    path = truncated(c)
    return Call(train_main, c.train(c.recipe(), '--resume', path), str(path), after=unchanged(path.parent))


@case(CHECKPOINTS, 'validate: truncated')
def _(c):
    path = truncated(c)
    return Call(validate_main, [path], str(path))


@case(CHECKPOINTS, 'resume: truncated, with a manifest that matches it')
def _(c):
    path = truncated_with_a_matching_manifest(c)
    return Call(train_main, c.train(c.recipe(), '--resume', path), str(path))


@case(CHECKPOINTS, 'validate: truncated, with a manifest that matches it')
def _(c):
    path = truncated_with_a_matching_manifest(c)
    return Call(validate_main, [path], str(path))


@case(CHECKPOINTS, 'resume: pickled code payload')
def _(c):
    path, nothing_ran = code_payload(c)
    return Call(train_main, c.train(c.recipe(), '--resume', path), str(path), after=nothing_ran)


@case(CHECKPOINTS, 'validate: pickled code payload')
def _(c):
    path, nothing_ran = code_payload(c)
    return Call(validate_main, [path], str(path), after=nothing_ran)


@case(CHECKPOINTS, 'export: pickled code payload')
def _(c):
    path, nothing_ran = code_payload(c)
    return Call(export.main, [path, '--output', c.tmp / 'release'], str(path), after=nothing_ran)


@case(CHECKPOINTS, 'resume: a checkpoint of another model')
def _(c):
    path = c.checkpoint()
    return Call(train_main, c.train(c.recipe(MNV3, name='mnv3'), '--resume', path), str(path))


@case(CHECKPOINTS, 'validate --recipe: a checkpoint of another model')
def _(c):
    path = c.checkpoint()
    return Call(validate_main, [path, '--recipe', c.recipe(MNV3, name='mnv3')], str(path))


@case(CHECKPOINTS, 'init-from: a checkpoint of another model')
def _(c):
    path = c.checkpoint()
    return Call(train_main, c.train(c.recipe(MNV3, name='mnv3'), '--init-from', path), str(path))


@case(CHECKPOINTS, 'resume: a missing file')
def _(c):
    path = c.tmp / 'checkpoints' / 'step-00000099.pt'
    return Call(train_main, c.train(c.recipe(), '--resume', path), str(path))


@case(CHECKPOINTS, 'resume: a manifest that is not JSON')
def _(c):
    path = c.checkpoint()
    checkpoint.manifest_path(path).write_text('{"bytes": 12, "sha256": ')
    return Call(train_main, c.train(c.recipe(), '--resume', path), str(path))


@case(CHECKPOINTS, 'validate: a manifest that is JSON but not an object')
def _(c):
    path = c.checkpoint()
    checkpoint.manifest_path(path).write_text('[1, 2, 3]\n')
    return Call(validate_main, [path], str(path))


@case(CHECKPOINTS, 'resume without --recipe: a checkpoint that carries no recipe')
def _(c):
    path = c.hostile({'format': checkpoint.FORMAT, 'model': {'w': torch.zeros(1)}})
    return Call(train_main, ['--resume', path, '--output', c.tmp / 'out', '--quiet'], str(path))


@case(CHECKPOINTS, 'validate: a checkpoint that carries no weights')
def _(c):
    path = c.hostile({'format': checkpoint.FORMAT, 'recipe': merge(TINY, {'name': 'tiny'})})
    return Call(validate_main, [path, '--weights', 'raw'], str(path))


@pytest.mark.parametrize('build', CHECKPOINTS)
def test_a_broken_or_hostile_checkpoint_is_refused_in_one_line_naming_it(build, ctx, capfd):
    expect_one_line_error(capfd, build(ctx))


# ---------------------------------------------------------------------------------------------- validation data

CLASS_COUNTS = []


@case(CLASS_COUNTS, 'synthetic data with 6 classes')
def _(c):
    path = c.checkpoint()
    return Call(validate_main, [path, '--set', 'data.synthetic_classes=6'], (str(path), '4 classes', '6 classes'),
                after=unchanged(path.parent))


@case(CLASS_COUNTS, 'image folder with 3 classes')
def _(c):
    path = c.checkpoint()
    root = c.images(c.tmp / 'three', 'validation', classes=3)
    return Call(validate_main, [path, '--set', 'data.dataset=folder', '--data-dir', root],
                (str(path), '4 classes', '3 classes'))


@case(CLASS_COUNTS, 'Fashion-MNIST with 10 classes')
def _(c):
    path = c.checkpoint()
    return Call(validate_main, [path, '--set', 'data.dataset=fashion_mnist', '--data-dir', c.fmnist],
                (str(path), '4 classes', '10 classes'))


@pytest.mark.parametrize('build', CLASS_COUNTS)
def test_validating_on_data_with_another_class_count_names_the_checkpoint_and_both_counts(build, ctx, capfd):
    expect_one_line_error(capfd, build(ctx))


# ---------------------------------------------------------------------------------------------- tools

TOOLS = []


@case(TOOLS, 'export over an earlier release without --force')
def _(c):
    path, out = c.checkpoint(), c.tmp / 'release'
    assert export.main([str(path), '--output', str(out)]) == 0
    return Call(export.main, [path, '--output', out], str(out), after=unchanged(out))


@case(TOOLS, 'export of a file without a manifest')
def _(c):
    path = c.checkpoint()
    checkpoint.manifest_path(path).unlink()
    return Call(export.main, [path, '--output', c.tmp / 'release'], str(path))


@case(TOOLS, 'average with --top-k above the evaluated checkpoints')
def _(c):
    return Call(average.main, [c.run, '--top-k', '5', '--output', c.tmp / 'avg.pt'], '--top-k 5')


@case(TOOLS, 'average of a folder that is no run')
def _(c):
    return Call(average.main, [c.tmp, '--top-k', '1'], str(c.tmp))


@case(TOOLS, 'report of a folder that is no run')
def _(c):
    return Call(report.main, [c.tmp], str(c.tmp))


@case(TOOLS, 'report of a run whose recipe.yaml is not UTF-8')
def _(c):
    run = c.tmp / 'run'
    run.mkdir()
    shutil.copyfile(c.run / 'metrics.csv', run / 'metrics.csv')
    bad = c.file('run/recipe.yaml', 'description: caf\xe9\n'.encode('latin-1'))
    return Call(report.main, [run], str(bad))


@case(TOOLS, 'lr_find with too few steps')
def _(c):
    return Call(lr_find.main, ['--recipe', c.recipe(), '--steps', '1', '--output', c.tmp / 'lr'], '--steps 1')


@case(TOOLS, 'bench with more steps than the data holds')
def _(c):
    return Call(bench.main, ['--recipe', c.recipe(), '--steps', '50'], '--steps')


@case(TOOLS, 'preresize of a source that is no folder')
def _(c):
    source = c.file('images.zip', b'PK\x03\x04')
    return Call(preresize.main, [source, c.tmp / 'small', '--shorter-side', '16'], str(source))


@pytest.mark.parametrize('build', TOOLS)
def test_a_tool_asked_for_what_it_cannot_do_refuses_in_one_line(build, ctx, capfd):
    expect_one_line_error(capfd, build(ctx))


# ---------------------------------------------------------------------------------------------- fresh processes



def test_train_py_with_a_non_utf8_recipe_under_the_c_locale_prints_one_line(ctx):
    """A fresh process: what the user sees, warnings from imports included, with the locale's own encoding."""
    path = ctx.file('latin1.yaml', 'description: caf\xe9\n'.encode('latin-1'))
    env = {**FRESH, 'LC_ALL': 'C', 'LANG': 'C'}
    result = run_cli('train.py', '--recipe', path, '--output', ctx.tmp / 'out', cwd=ctx.tmp, env=env)
    assert_one_line_error(result.returncode, result.stderr, str(path))


def test_python_m_export_over_an_earlier_release_exits_2_with_one_line(ctx):
    """A fresh process: the exit status of `python -m mnv_train.export` itself, not only of main()."""
    path, out = ctx.checkpoint(), ctx.tmp / 'release'
    assert export.main([str(path), '--output', str(out)]) == 0
    kept = unchanged(out)
    result = subprocess.run([sys.executable, '-m', 'mnv_train.export', str(path), '--output', str(out)],
                            capture_output=True, text=True, cwd=ctx.tmp, timeout=300,
                            env=FRESH)
    assert_one_line_error(result.returncode, result.stderr, str(out))
    kept()
