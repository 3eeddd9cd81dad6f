"""End to end through train.py / validate.py on tiny synthetic data."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mnv_train import checkpoint
from mnv_train.cli import train_main, validate_main

from conftest import REPO, run_cli, train_tiny


def final_weights(run_dir):
    return checkpoint.load(run_dir / 'checkpoints' / 'last.pt')


def test_training_writes_a_complete_run_folder_and_validate_reproduces_the_eval(write_recipe, tmp_path, capsys):
    out = tmp_path / 'run'
    assert train_main(['--recipe', str(write_recipe({'train': {'amp': 'bf16'}})), '--output', str(out)]) == 0
    files = {p.name for p in (out / 'checkpoints').iterdir()}
    assert {'last.pt', 'best.pt', 'last.pt.json', 'best.pt.json'} <= files
    assert any(p.name.startswith('events.out.tfevents') for p in (out / 'tensorboard').iterdir())
    assert (out / 'recipe.yaml').read_text().startswith('name: tiny')
    rows = list(csv.DictReader(open(out / 'metrics.csv')))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert {'top1', 'top5', 'ema_top1', 'ema_top5', 'train_loss', 'lr', 'wild_logits', 'ema_wild_logits',
            'wild_loss'} <= set(rows[0])

    payload = final_weights(out)
    assert payload['state']['step'] == 8 and payload['state']['epoch'] == 2
    assert {'model', 'ema', 'optimizer', 'scaler', 'rng', 'recipe', 'plan'} <= set(payload)
    capsys.readouterr()
    for weights, column in (('ema', 'ema_top1'), ('raw', 'top1')):
        assert validate_main([str(out / 'checkpoints' / 'last.pt'), '--weights', weights]) == 0
        result = json.loads((out / 'checkpoints' / f'last.eval-{weights}-32-1.json').read_text())
        assert result['top1'] == pytest.approx(float(rows[-1][column]), abs=1e-9)
        assert result['count'] == 48
    assert 'top-1' in capsys.readouterr().out


def test_the_tiny_model_learns(write_recipe, tmp_path):
    recipe = write_recipe({'schedule': {'epochs': 6, 'warmup_epochs': 1}, 'optim': {'lr': 0.004},
                           'data': {'synthetic_train_size': 256}, 'ema': {'enabled': False}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    rows = list(csv.DictReader(open(tmp_path / 'run' / 'metrics.csv')))
    assert float(rows[-1]['top1']) >= 75  # 4 classes: chance is 25 %
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])


def test_seeded_runs_are_bit_identical(write_recipe, tmp_path):
    recipe = write_recipe({'aug': {'auto_augment': 'rand-m9-mstd0.5-inc1', 'reprob': 0.25, 'mixup': 0.8,
                                   'cutmix': 1.0}, 'model': {'drop_rate': 0.2, 'drop_path_rate': 0.1}})
    for name in ('a', 'b'):
        assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / name), '--quiet']) == 0
    a, b = final_weights(tmp_path / 'a'), final_weights(tmp_path / 'b')
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    changed = train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'c'), '--quiet',
                          '--set', 'train.seed=7'])
    assert changed == 0
    c = final_weights(tmp_path / 'c')
    assert not all(torch.equal(a['model'][k], c['model'][k]) for k in a['model'])


def test_gradient_accumulation_takes_one_step_per_global_batch(write_recipe, tmp_path):
    recipe = write_recipe({'train': {'global_batch_size': 64, 'batch_size': 16}})
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    payload = final_weights(tmp_path / 'run')
    assert payload['plan'] == {'world_size': 1, 'per_device': 16, 'accum_steps': 4, 'global_batch': 64}
    assert payload['state']['step'] == 2 * (128 // 64)
    assert payload['state']['samples_seen'] == 2 * 128


def test_print_and_list_recipes(write_recipe, capsys):
    assert train_main(['--recipe', str(write_recipe()), '--print-recipe', '--set', 'optim.lr=0.01']) == 0
    out = capsys.readouterr().out
    assert 'lr: 0.01' in out and '# batch plan' in out
    assert train_main(['--list-recipes']) == 0
    assert 'fmnist_mnv4_conv_small' in capsys.readouterr().out


def test_a_reader_that_closed_the_pipe_ends_the_listing_without_a_traceback():
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `train.py --list-recipes | head -1` once head has exited
    result = subprocess.run([sys.executable, str(REPO / 'train.py'), '--list-recipes'], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(write_end)
    assert result.returncode == 1 and result.stderr == ''


@pytest.mark.parametrize('args, message', [
    (['--recipe', 'no_such_recipe'], "error: recipe 'no_such_recipe' not found"),
    (['--recipe', 'fmnist_mnv4_conv_small', '--set', 'optim.lr=fast'], 'error: optim.lr: expected a number'),
    (['--recipe', 'fmnist_mnv4_conv_small', '--data-dir', '/nonexistent'], 'error: Fashion-MNIST file'),
    (['--resume', '/nonexistent/step-1.pt'], 'error: checkpoint /nonexistent/step-1.pt not found'),
])
def test_bad_input_is_one_line_on_stderr_without_traceback(args, message, tmp_path):
    result = run_cli('train.py', *args, '--output', tmp_path / 'out')
    assert result.returncode == 2
    assert result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith(message), result.stderr
    assert 'Traceback' not in result.stderr


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """The folder of one finished run of the tiny recipe, for the tests that only read a run (never written to)."""
    return train_tiny(tmp_path_factory.mktemp('tiny'), {})[1]


def test_an_existing_run_is_never_overwritten(tiny_run, write_recipe, tmp_path, capsys):
    out = tmp_path / 'run'
    shutil.copytree(tiny_run, out)  # this test's own copy: a broken build would overwrite it
    before = (out / 'checkpoints' / 'last.pt').read_bytes()
    assert train_main(['--recipe', str(write_recipe()), '--output', str(out)]) == 2
    assert 'already holds checkpoints' in capsys.readouterr().err
    assert (out / 'checkpoints' / 'last.pt').read_bytes() == before


def test_validate_at_another_resolution_and_crop(tiny_run, tmp_path, capsys):
    target = tmp_path / 'eval.json'
    assert validate_main([str(tiny_run / 'checkpoints' / 'best.pt'), '--img-size', '40', '--crop-pct', '0.9',
                          '--json', str(target)]) == 0
    result = json.loads(target.read_text())
    assert (result['img_size'], result['crop_pct'], result['weights']) == (40, 0.9, 'ema')
    assert 0 <= result['top1'] <= 100


def test_validate_reads_plain_state_dicts_with_a_recipe(write_recipe, tmp_path, capsys):
    out = tmp_path / 'run'
    recipe = write_recipe({'ema': {'enabled': False}})
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet']) == 0
    plain = tmp_path / 'weights.pth'
    torch.save({'state_dict': final_weights(out)['model']}, plain)
    assert validate_main([str(plain), '--recipe', str(recipe)]) == 0
    assert validate_main([str(plain)]) == 2
    assert 'carries no recipe' in capsys.readouterr().err
    other = write_recipe({'model': {'name': 'mobilenetv3_small_100'}}, name='other')
    assert validate_main([str(plain), '--recipe', str(other)]) == 2
    err = capsys.readouterr().err
    assert f'{plain} does not fit mobilenetv3_small_100 with 4 classes: Missing key(s) in state_dict' in err
    assert err.count('\n') == 1


def test_validate_evaluates_the_weights_a_file_holds_and_names_them_truly(tiny_run, tmp_path, capsys):
    """timm's checkpoint layout (state_dict, state_dict_ema) is evaluated on its EMA weights by default; --weights ema
    on a file of raw weights only is refused instead of answered with the raw ones; our checkpoint copied without its
    manifest keeps its own recipe and says that nothing checked it."""
    ours, recipe = tiny_run / 'checkpoints' / 'last.pt', str(tiny_run / 'recipe.yaml')
    payload = checkpoint.load(ours)

    def evaluated(*args) -> dict:
        target = tmp_path / 'result.json'
        assert validate_main([*map(str, args), '--json', str(target)]) == 0, capsys.readouterr().err
        result = json.loads(target.read_text())
        return {key: result[key] for key in ('weights', 'top1', 'loss')}

    expected = {weights: evaluated(ours, '--weights', weights) for weights in ('ema', 'raw')}
    assert expected['ema']['loss'] != expected['raw']['loss']  # the two sets of weights tell apart
    timm_file, raw_only = tmp_path / 'model.pth.tar', tmp_path / 'raw.pth'
    torch.save({'state_dict': payload['model'], 'state_dict_ema': payload['ema']}, timm_file)
    torch.save({'state_dict': payload['model']}, raw_only)
    assert evaluated(timm_file, '--recipe', recipe) == expected['ema']
    assert evaluated(timm_file, '--recipe', recipe, '--weights', 'raw') == expected['raw']
    assert evaluated(raw_only, '--recipe', recipe) == expected['raw']
    capsys.readouterr()
    assert validate_main([str(raw_only), '--recipe', recipe, '--weights', 'ema']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: checkpoint {raw_only} holds no EMA weights') and err.count('\n') == 1

    copied = tmp_path / 'copied' / 'last.pt'
    copied.parent.mkdir()
    shutil.copy(ours, copied)  # without last.pt.json
    assert evaluated(copied) == expected['ema']
    assert f'{copied} has no manifest last.pt.json beside it: read without checking its checksum' in \
        capsys.readouterr().err


def test_another_split_gets_its_own_result_file_and_no_published_comparison(tiny_run, capsys):
    ours = tiny_run / 'checkpoints' / 'last.pt'
    published = ['--set', 'provenance.expected_top1=50']
    assert validate_main([str(ours), *published]) == 0
    assert validate_main([str(ours), *published, '--split', 'train']) == 0
    printed = capsys.readouterr().out.splitlines()
    val, train = (json.loads(ours.with_name(name).read_text())
                  for name in ('last.eval-ema-32-1.json', 'last.eval-ema-32-1-train.json'))
    assert (val['split'], val['count'], val['expected_top1']) == ('validation', 48, 50)
    assert (train['split'], train['count']) == ('train', 128) and 'expected_top1' not in train
    assert 'expected 50.000' in printed[1] and 'expected' not in printed[-2]


@pytest.mark.parametrize('tool, argv, said', [
    ('validate', ['x.pt', '--batch-size', '0'], 'validate.py: argument --batch-size: 0 is below 1'),
    ('validate', ['x.pt', '--precise-bn', '-2'], 'validate.py: argument --precise-bn: -2 is below 0'),
    ('validate', ['x.pt', '--img-size', '-5'], 'validate.py: argument --img-size: -5 is below 1'),
    ('validate', ['x.pt', '--crop-pct', '0'], 'validate.py: argument --crop-pct: 0 is not in (0, 1]'),
    ('average', ['run', '--top-k', '1', '--precise-bn', '-1'], 'argument --precise-bn: -1 is below 0'),
    ('train', ['--recipe', 'tiny', '--global-batch', '0'], 'train.py: argument --global-batch: 0 is below 1'),
    ('bench', ['--recipe', 'tiny', '--steps', 'ten'], "argument --steps: invalid whole_number value: 'ten'"),
])
def test_a_count_or_size_out_of_range_is_one_line_naming_the_flag(tool, argv, said, capsys):
    from mnv_train import average, bench
    main = {'validate': validate_main, 'average': average.main, 'train': train_main, 'bench': bench.main}[tool]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith('error: ') and error.rstrip().endswith(said) and error.count('\n') == 1


@pytest.fixture(scope='module')
def hybrid_large_checkpoint(tmp_path_factory):
    """An untrained mnv4_hybrid_large checkpoint whose recipe reads 2 synthetic validation images."""
    from mnv_train import model as models
    from mnv_train import recipe as recipes
    recipe = recipes.load('mnv4_hybrid_large', ['data.dataset=synthetic', 'data.synthetic_val_size=2',
                                                'data.synthetic_classes=3', 'data.num_workers=0', 'train.amp=none'])
    path = tmp_path_factory.mktemp('hybrid') / 'step-00000001.pt'
    checkpoint.write(path, {'model': models.create(recipe.model, 3).state_dict(), 'ema': None,
                            'recipe': recipe.to_dict()}, {'step': 1})
    return path


def test_validate_at_the_published_eval_size_uses_the_published_crop(hybrid_large_checkpoint, capsys):
    assert validate_main([str(hybrid_large_checkpoint), '--img-size', '448']) == 0
    out = capsys.readouterr().out
    assert 'evaluating at 448 px, crop 1 (provenance.eval_crop_pct, the published setting at 448 px)' in out
    assert 'expected 84.352' in out
    result = json.loads(hybrid_large_checkpoint.with_name('step-00000001.eval-raw-448-1.json').read_text())
    assert (result['img_size'], result['crop_pct'], result['expected_top1']) == (448, 1.0, 84.352)


def test_validate_compares_with_a_published_figure_only_at_its_size_and_crop(hybrid_large_checkpoint, capsys):
    assert validate_main([str(hybrid_large_checkpoint), '--img-size', '448', '--crop-pct', '0.95']) == 0
    out = capsys.readouterr().out
    assert 'crop 0.95 (--crop-pct)' in out and 'expected' not in out
    assert validate_main([str(hybrid_large_checkpoint), '--img-size', '384']) == 0
    out = capsys.readouterr().out
    assert 'crop 0.95 (the recipe\'s data.crop_pct)' in out and 'expected 83.996' in out
