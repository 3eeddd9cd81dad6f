import contextlib
import gzip
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n: the workers share the cores, so each computes on one thread, as do the processes it starts
    # (torchrun's ranks already do); a test that needs more threads asks for them itself
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

TINY = {
    'model': {'name': 'mobilenetv4_conv_small'},
    'data': {'dataset': 'synthetic', 'img_size': 32, 'crop_pct': 1.0, 'num_workers': 0,
             'synthetic_train_size': 128, 'synthetic_val_size': 48, 'synthetic_classes': 4},
    'aug': {'scale': [0.5, 1.0]},
    'optim': {'name': 'adamw', 'lr': 0.002, 'weight_decay': 0.01},
    'schedule': {'epochs': 2, 'warmup_epochs': 0.5},
    'ema': {'enabled': True, 'decay': 0.9, 'warmup': True},
    'train': {'global_batch_size': 32, 'batch_size': 16, 'log_every': 2},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


ONE_EPOCH = {'schedule': {'epochs': 1, 'warmup_epochs': 0.25}}


def train_tiny(root: Path, changes: dict, name: str = 'tiny') -> tuple[Path, Path]:
    """Train the tiny recipe with these changes into root/run, as train.py would: (recipe path, run folder)."""
    from mnv_train.cli import train_main
    recipe = root / f'{name}.yaml'
    recipe.write_text(yaml.safe_dump(merge(TINY, changes)))
    assert train_main(['--recipe', str(recipe), '--output', str(root / 'run'), '--quiet']) == 0
    return recipe, root / 'run'


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe({'optim': {'lr': 0.1}}) -> path of the tiny recipe with those changes."""
    def write(changes=None, name='tiny'):
        path = tmp_path / f'{name}.yaml'
        path.write_text(yaml.safe_dump(merge(TINY, changes or {})))
        return path
    return write


@contextlib.contextmanager
def one_thread():
    """torch on one thread in this process and in the processes it starts (OMP_NUM_THREADS), as torchrun's ranks
    are; both restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv('OMP_NUM_THREADS', '1')
        yield
    torch.set_num_threads(threads)


RAMP = {'schedule': {'epochs': 3, 'train_size_ramp': {'start_size': 16, 'end_epoch': 2}}}  # 16, 24, 32 px


class FakeDeviceClock:
    """Seconds as a device would spend them, so that timing code can be checked on a CPU without timing the CPU: each
    forward of the module it is attached to costs LATENCY + PER_PIXEL x samples x px^2, and the first at a new input
    shape SET_UP more (on a GPU, cuDNN autotuning and kernel set-up). Nothing else takes time."""
    LATENCY, PER_PIXEL, SET_UP = 0.05, 1e-5, 10.0

    def __init__(self, module: torch.nn.Module):
        self.now, self.shapes = 0.0, set()
        module.register_forward_pre_hook(self.charge)

    def forward_seconds(self, samples: int, px: int) -> float:
        return self.LATENCY + self.PER_PIXEL * samples * px ** 2

    def charge(self, module, args):
        images = args[0]
        self.now += self.forward_seconds(len(images), images.shape[-1]) + (
            0 if images.shape in self.shapes else self.SET_UP)
        self.shapes.add(images.shape)


def run_cli(script: str, *args, cwd=None, timeout=600, env=None):
    """Run train.py / validate.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def write_idx(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray):
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(directory / f'{prefix}-images-idx3-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>IIII', 2051, len(images), *images.shape[1:]) + images.astype(np.uint8).tobytes())
    with gzip.open(directory / f'{prefix}-labels-idx1-ubyte.gz', 'wb') as f:
        f.write(struct.pack('>II', 2049, len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fmnist(tmp_path):
    """A Fashion-MNIST-format folder with 64 train / 32 test images whose class is their brightness."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'fmnist'
    for prefix, n in (('train', 64), ('t10k', 32)):
        labels = np.arange(n) % 10
        images = (labels[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8)
        write_idx(root, prefix, images, labels)
    return root


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device; skipped without one (benchmarks/gpu_check.sh runs '
                                       'them with pytest -m cuda)')


def wait_for(path: Path, process, timeout=300):
    """Until a file appears (a checkpoint's manifest, say), while the process that writes it still runs."""
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f'{path} never appeared'
        time.sleep(0.01)


TRAINING_STATE = ('model', 'ema', 'optimizer', 'scaler', 'rng', 'state')  # what an exact resume must reproduce


def _assert_same(a, b, where: str):
    """Bit-exact, recursive: tensors by dtype, shape and value; dicts key by key in both directions."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f'{where}: tensor vs {type(b).__name__}'
        assert a.dtype == b.dtype and a.shape == b.shape, f'{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} ' \
                                                          f'{tuple(b.shape)}'
        assert torch.equal(a, b), f'{where} differs'
    elif isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict), f'{where}: dict vs {type(b).__name__}'
        assert a.keys() == b.keys(), f'{where}: keys only in the first {sorted(map(str, a.keys() - b.keys()))}, ' \
                                     f'only in the second {sorted(map(str, b.keys() - a.keys()))}'
        for key in a:
            _assert_same(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        assert isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)), f'{where}: {type(a).__name__} vs ' \
                                                                              f'{type(b).__name__}'
        assert len(a) == len(b), f'{where}: length {len(a)} vs {len(b)}'
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{where}[{i}]')
    else:
        assert type(a) is type(b) and a == b, f'{where}: {a!r} vs {b!r}'


def assert_same_training_state(a, b, parts: tuple = TRAINING_STATE):
    """Two checkpoints (payload dicts, or paths for checkpoint.load) hold the same training state, bit for bit:
    model, EMA, optimizer state and param_groups, loss scaler, RNG and loop state (TrainState), with no key missing
    on either side. Every exact-resume test goes through this, so a resume that forgets any part of the state fails
    even when no training follows it. `parts` narrows it only where a test compares less on purpose (say so)."""
    from mnv_train import checkpoint
    a, b = (checkpoint.load(x) if isinstance(x, (str, Path)) else x for x in (a, b))
    for part in parts:
        assert part in a and part in b, f'{part} missing from {"the first" if part not in a else "the second"}'
        _assert_same(a[part], b[part], part)
