"""The benchmark tool and the pre-resize tool, on tiny data."""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mnv_train import bench, distributed, preresize
from mnv_train import recipe as recipes
from mnv_train.build import build_run, compile_telling_time

from conftest import ONE_EPOCH, RAMP, FakeDeviceClock, train_tiny


@pytest.fixture
def dynamo_off(monkeypatch):
    """Compiling conv_small takes minutes on a CPU: torch.compile's code path runs, with dynamo switched off."""
    monkeypatch.setattr(torch._dynamo.config, 'disable', True)


def test_bench_reports_three_rates_and_the_bound(write_recipe, tmp_path, capsys):
    recipe = write_recipe({'data': {'synthetic_train_size': 256}, 'train': {'batch_size': 8}})
    out = tmp_path / 'bench.json'
    assert bench.main(['--recipe', str(recipe), '--steps', '4', '--warmup', '1', '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(result[k] > 0 for k in ('model', 'input', 'train'))
    assert result['bound_by'] in ('model', 'input')
    assert result['train_vs_bound'] == result['train'] / min(result['model'], result['input'])
    assert result['per_device_batch'] == 8 and result['img_size'] == 32
    if result['device'] == 'cpu':
        shared = 1 / (1 / result['model'] + 1 / result['input'])  # CPU: workers and model share the cores
        assert result['shared_cores_bound'] == shared
        assert result['train_vs_shared_cores_bound'] == result['train'] / shared
    else:  # on a GPU the loader's cores do not slow the model
        assert 'shared_cores_bound' not in result
    printed = capsys.readouterr().out
    assert 'model only' in printed and 'input pipeline' in printed and 'end to end' in printed


def test_bench_measures_each_compile_mode_with_channels_last_on_and_off(write_recipe, tmp_path, capsys, dynamo_off):
    recipe = write_recipe({'train': {'batch_size': 8}})
    out = tmp_path / 'modes.json'
    assert bench.main(['--recipe', str(recipe), '--steps', '2', '--warmup', '1', '--json', str(out),
                       '--compile-modes', 'eager,max-autotune-no-cudagraphs']) == 0
    rows = json.loads(out.read_text())['compile_modes']
    assert [(row['compile'], row['channels_last']) for row in rows] == [
        ('eager', True), ('eager', False), ('max-autotune-no-cudagraphs', True), ('max-autotune-no-cudagraphs', False)]
    assert all(row['model'] > 0 and row['first_step_s'] > 0 and row['loss_vs_eager'] >= 0 for row in rows)
    assert rows[0]['loss_vs_eager'] == 0 == rows[1]['loss_vs_eager']
    printed = capsys.readouterr().out
    assert printed.count('train.compile (max-autotune-no-cudagraphs): the first forward took') == 2  # one per run
    assert 'loss vs eager' in printed


def test_the_first_step_loss_is_seeded_so_drop_path_draws_the_same_masks_whatever_ran_before(write_recipe, tmp_path):
    recipe = recipes.load(str(write_recipe({'model': {'drop_path_rate': 0.5, 'drop_rate': 0.5}})))
    losses = []
    for draws_before in (0, 1000):  # another row's steps have moved a generator that build_run does not reseed
        run = build_run(recipe, distributed.init('cpu'), tmp_path / str(draws_before), per_device_batch=8)
        torch.rand(draws_before)
        losses.append(bench.first_step(run)[1])
    assert losses[0] == losses[1]


def test_bench_refuses_an_unknown_compile_mode(write_recipe, capsys):
    assert bench.main(['--recipe', str(write_recipe()), '--compile-modes', 'fastest']) == 2
    assert capsys.readouterr().err.strip().endswith('fastest: choose from all, eager, default, '
                                                    'max-autotune-no-cudagraphs, reduce-overhead')


def test_a_compiled_run_prints_its_compile_time_once(tmp_path, capsys, dynamo_off):
    train_tiny(tmp_path, {**ONE_EPOCH, 'train': {'compile': True, 'compile_mode': 'reduce-overhead'}})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('train.compile')]
    assert len(lines) == 1 and 'train.compile (reduce-overhead): the first forward took' in lines[0]


def test_bench_ramp_measures_each_train_size_after_its_own_warm_up_and_the_epoch_time_ratio(write_recipe, tmp_path,
                                                                                            monkeypatch):
    run = build_run(recipes.load(str(write_recipe(RAMP))), distributed.init('cpu'), tmp_path / 'run',
                    per_device_batch=8)
    clock = FakeDeviceClock(run.model)  # the first step at each size costs 10 s more: warm-up must not count it
    monkeypatch.setattr(bench, 'time', SimpleNamespace(perf_counter=lambda: clock.now))
    result = bench.ramp_rates(run, steps=2, warmup=1)
    seconds = {px: clock.forward_seconds(8, px) for px in (16, 24, 32)}  # a step; the update runs no forward
    assert result['model'] == pytest.approx({str(px): 8 / step for px, step in seconds.items()})
    assert result['epochs'] == {'16': 1, '24': 1, '32': 1}
    assert result['epoch_time_ratio'] == pytest.approx(sum(seconds.values()) / (3 * seconds[32]))


def test_bench_ramp_prints_each_size_and_the_ratio_and_refuses_a_recipe_without_a_ramp(write_recipe, tmp_path,
                                                                                        capsys):
    out = tmp_path / 'ramp.json'
    assert bench.main(['--recipe', str(write_recipe(RAMP)), '--ramp', '--steps', '1', '--warmup', '1',
                       '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result['model']) == ['16', '24', '32'] and all(rate > 0 for rate in result['model'].values())
    printed = capsys.readouterr().out
    assert re.search(r'^ +24 +1 +[\d.]+$', printed, re.M), printed
    assert f'epoch time, ramped / every epoch at 32 px: {result["epoch_time_ratio"]:.3f}' in printed
    assert bench.main(['--recipe', str(write_recipe()), '--ramp']) == 2
    assert capsys.readouterr().err.strip() == ('error: --ramp: recipe tiny has no schedule.train_size_ramp; give a '
                                               'progressive-resolution recipe such as mnv4_hybrid_large_prog')


def test_bench_refuses_a_dataset_too_small_for_the_steps(write_recipe, capsys):
    assert bench.main(['--recipe', str(write_recipe()), '--steps', '50']) == 2
    assert 'the benchmark needs' in capsys.readouterr().err


def test_preresize_shrinks_the_shorter_side_and_keeps_the_tree(tmp_path, capsys):
    source = tmp_path / 'src'
    (source / 'train' / 'cat').mkdir(parents=True)
    Image.fromarray(np.zeros((300, 400, 3), np.uint8)).save(source / 'train' / 'cat' / 'big.jpg')
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(source / 'train' / 'cat' / 'small.png')
    (source / 'train' / 'cat' / 'broken.jpg').write_bytes(b'no image')
    target = tmp_path / 'dst'
    assert preresize.main([str(source), str(target), '--shorter-side', '100', '--workers', '1']) == 1
    assert Image.open(target / 'train' / 'cat' / 'big.jpg').size == (133, 100)
    assert Image.open(target / 'train' / 'cat' / 'small.jpg').size == (80, 50)  # never enlarged
    out = capsys.readouterr().out
    assert 'broken.jpg' in out and '2 written, 1 unreadable' in out
    assert preresize.main([str(source), str(target), '--shorter-side', '100', '--workers', '1']) == 1
    assert '0 written, 1 unreadable' in capsys.readouterr().out  # done files are skipped
    assert preresize.main([str(source), str(source), '--shorter-side', '100']) == 2


def test_a_three_size_ramp_compiles_one_static_graph_per_size(monkeypatch):
    """A counting backend stands in for inductor (minutes on this CPU); the model is a few layers."""
    graphs, compile_ = [], torch.compile

    def counting(graph, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph.forward

    monkeypatch.setattr(torch, 'compile', lambda model, mode, **kwargs: compile_(model, backend=counting, **kwargs))
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1))
    compiled = compile_telling_time(model, 'default', input_sizes=3)
    for size in (16, 24, 32, 16, 32):
        compiled(torch.randn(2, 3, size, size))
    torch._dynamo.reset()
    assert len(graphs) == 3 and all(isinstance(d, int) for shapes in graphs for shape in shapes for d in shape)
    assert sorted(shape[-1] for shapes in graphs for shape in shapes if shape[:2] == (2, 3)) == [16, 24, 32]
