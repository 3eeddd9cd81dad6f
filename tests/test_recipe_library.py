"""Every shipped recipe: loads, builds, trains a step, and agrees with the reference tables it cites."""
import re
from pathlib import Path

import pytest
import torch

from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.distributed import World
from mnv_train.engine import StopFlag, Watch, train_one_epoch

REFERENCE = Path(__file__).resolve().parent.parent / 'docs' / 'recipes-reference.md'
ALL = sorted(p.stem for p in recipes.RECIPES_DIR.glob('*.yaml'))
GOOGLE = {'Conv-S': 'mnv4_conv_small_tf', 'Conv-M': 'mnv4_conv_medium_tf', 'Conv-L': 'mnv4_conv_large_tf',
          'Hybrid-M': 'mnv4_hybrid_medium_tf', 'Hybrid-L': 'mnv4_hybrid_large_tf'}
TIMM = {'mnv4_conv_small': 'mobilenetv4_conv_small.e2400_r224_in1k',
        'mnv4_conv_medium': 'mobilenetv4_conv_medium.e500_r256_in1k',
        'mnv4_conv_large': 'mobilenetv4_conv_large.e600_r384_in1k',
        'mnv4_hybrid_medium': 'mobilenetv4_hybrid_medium.ix_e550_r256_in1k',
        'mnv4_hybrid_large': 'mobilenetv4_hybrid_large.e600_r384_in1k',
        'mobilenetv1_100_ra4': 'mobilenetv1_100.ra4_e3600_r224_in1k',
        'efficientnet_b0_ra4': 'efficientnet_b0.ra4_e3600_r224_in1k',
        'mobilenetv3_large_100_ra4': 'mobilenetv3_large_100.ra4_e3600_r224_in1k'}
NUMBER = r'[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?'


def numbers(cell: str) -> list[float]:
    return [float(n) for n in re.findall(NUMBER, cell)]


def markdown_table(heading: str) -> list[list[str]]:
    """Rows (as cell lists) of the first table after the heading that starts with `heading`."""
    lines = REFERENCE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith('|'):
            rows.append([cell.strip() for cell in line.strip('|').split('|')])
        elif rows:
            break
    return [row for row in rows if not set(row[0]) <= set('-: ')]


def google_table() -> dict:
    """{'Conv-S': {'lr (absolute, at that batch)': '0.002', ...}, ...} from reference section 4.6."""
    header, *rows = markdown_table('### 4.6')
    return {model: {row[0]: row[i] for row in rows} for i, model in enumerate(header) if i > 0}


def test_every_recipe_names_its_source():
    for name in ALL:
        recipe = recipes.load(name)
        assert recipe.provenance.source, f'{name} has no provenance.source'
        assert recipe.description, f'{name} has no description'


@pytest.mark.parametrize('column', sorted(GOOGLE))
def test_google_recipes_match_the_reference_table(column):
    row = google_table()[column]
    r = recipes.load(GOOGLE[column])
    assert r.data.img_size == numbers(row['img_size'])[0]
    assert r.train.global_batch_size == numbers(row['global batch'])[0]
    assert r.schedule.epochs == numbers(row['epochs (exact from steps)'])[-1]
    assert r.optim.name == row['opt']
    assert r.optim.betas == numbers(row['opt_betas'])
    assert r.optim.eps == numbers(row['opt_eps'])[0]
    assert r.optim.lr == numbers(row['lr (absolute, at that batch)'])[0]
    assert r.optim.weight_decay == numbers(row['weight_decay (decoupled, torch-AdamW semantics; BN excluded)'])[0]
    sched, min_lr = row['sched / min_lr'].split(' / ')
    assert (r.schedule.sched, r.schedule.min_lr) == (sched, float(min_lr))
    steps, warmup_epochs, warmup_lr = numbers(row['warmup (steps → epochs), warmup_lr'])
    assert (r.schedule.warmup_epochs, r.schedule.warmup_lr) == (warmup_epochs, warmup_lr)
    assert r.optim.clip_grad is None and row['clip_grad'] == 'none'
    ema = row['EMA']
    assert r.ema.enabled == (ema != 'none')
    if r.ema.enabled:
        decay, start = numbers(ema)
        assert (r.ema.decay, r.ema.start_step, r.ema.warmup) == (decay, start, 'no dynamic decay' not in ema)
    assert r.model.drop_rate == numbers(row['drop (classifier)'])[0]
    assert r.model.drop_path_rate == numbers(row['drop_path (max) / schedule'])[0]
    assert r.loss.smoothing == numbers(row['smoothing'])[0]
    mix = row['mixup/cutmix/prob/switch']
    if mix == 'none':
        assert r.aug.mixup == r.aug.cutmix == 0
    else:
        assert [r.aug.mixup, r.aug.cutmix, r.aug.mixup_prob, r.aug.mixup_switch_prob] == numbers(mix)
    assert r.aug.reprob == 0 and row['random erasing'] == 'none'
    assert r.aug.scale == [0.08, 1.0] and r.aug.hflip == 0.5
    assert [r.model.bn_momentum, r.model.bn_eps] == numbers(row['BN momentum(torch)/eps'])
    assert {'fp32': 'none', 'bf16': 'bf16'}[row['precision']] == r.train.amp
    assert r.provenance.expected_top1 == numbers(row['reported top-1 (yaml comment)'])[0]
    assert r.optim.weight_decay_exclude == 'bn'  # "BN excluded": biases and layer scales decay
    randaug = r.aug.tf_randaugment  # Google's own RandAugment, not a timm string
    assert r.aug.auto_augment is None and randaug is not None
    layers, magnitude, prob, mstd = row['RandAugment (TF: layers/mag/prob/mstd)'].split(',')[0].split('/')
    assert (randaug.num_layers, randaug.magnitude, randaug.magnitude_std) == (int(layers), float(magnitude),
                                                                              float(mstd))
    assert randaug.prob_to_apply == (None if prob == 'None' else float(prob))
    translate = re.search(r'translate (\d+)', row['RandAugment (TF: layers/mag/prob/mstd)'])
    assert randaug.translate_const == (float(translate.group(1)) if translate else 10.0)
    assert randaug.exclude_ops == ['Cutout']
    assert r.data.interpolation == r.aug.train_interpolation == 'bilinear'


def timm_table() -> dict:
    header, *rows = markdown_table('## 7.')
    return {row[0].strip('`'): dict(zip(header, row)) for row in rows}


@pytest.mark.parametrize('name', sorted(TIMM))
def test_timm_weight_recipes_match_the_published_eval_configs(name):
    row = timm_table()[TIMM[name]]
    r = recipes.load(name)
    assert r.data.img_size == numbers(row['input_size'])[-1]
    assert r.data.crop_pct == float(row['crop_pct'])
    assert r.schedule.epochs == int(re.search(r'[._]e(\d+)_', TIMM[name]).group(1))
    eval_size, eval_crop = numbers(row['test_input_size'])[-1], float(row['test_crop_pct'])
    assert (r.provenance.eval_img_size, r.provenance.eval_crop_pct) == (eval_size, eval_crop)
    assert r.data.extra_evals == [[eval_size, eval_crop]]
    accuracy = numbers(row[next(k for k in row if k.startswith('ImageNet-1k val top-1'))])
    assert (r.provenance.expected_top1, r.provenance.expected_top1_eval) == (accuracy[0], accuracy[3])
    mean = tuple(numbers(row['mean']))
    if mean == (0.5, 0.5, 0.5):
        assert r.data.mean == r.data.std == [0.5, 0.5, 0.5]
    else:
        assert r.data.mean is None  # the model's default, which is ImageNet's
    assert r.model.name == TIMM[name].split('.')[0]
    assert r.data.interpolation == row['interpolation']
    assert r.optim.weight_decay_exclude == '1d'  # timm's train.py


@pytest.mark.parametrize('name', ALL)
def test_every_recipe_states_whether_the_ema_warms_up(name):
    assert 'warmup' in recipes.load_raw(name).get('ema', {}), f'{name} leaves ema.warmup to the default'


@pytest.mark.parametrize('name', ALL)
def test_every_recipe_builds_and_trains_one_step_on_cpu(name, tmp_path):
    recipe = recipes.load(name, ['data.dataset=synthetic', 'data.img_size=64', 'data.synthetic_train_size=8',
                                 'data.synthetic_val_size=4', 'data.num_workers=0', 'train.global_batch_size=4',
                                 'train.batch_size=4', 'data.extra_evals=[]',
                                 'model.pretrained_path=null',  # fine-tuning recipes: tests/test_finetune.py
                                 "distill.teacher=''"])  # distillation recipes: tests/test_distill.py
    run = build_run(recipe, World(), tmp_path)
    assert run.steps_per_epoch == 2  # the first step runs at warmup_lr 0
    before = [p.detach().clone() for p in run.module.parameters()]
    train_one_epoch(run, 0, Watch(run, StopFlag()))
    assert run.state.step == 2
    changed = sum(not torch.equal(a, b) for a, b in zip(before, run.module.parameters()))
    assert changed > 0.5 * len(before)
    assert all(torch.isfinite(p).all() for p in run.module.parameters())


def test_print_recipe_shows_values_after_batch_scaling(capsys, monkeypatch):
    from mnv_train.cli import train_main
    monkeypatch.setenv('WORLD_SIZE', '3')
    assert train_main(['--recipe', 'mnv4_hybrid_large', '--print-recipe']) == 0
    out = capsys.readouterr().out
    assert 'lr: 0.01' in out
    assert '#   this run              3 process(es) x 124 per device x 44 accumulation = 16368' in out
    assert '#   lr                    0.01 -> 0.00999512 (sqrt rule' in out
    assert 'Mixup/CutMix pair images within a device batch, so it must be even: 124 per device' in out
    assert '16384 does not split over 3 process(es); using the nearest, 16368' in out


MIXING = [name for name in ALL if recipes.load(name).aug.mixup or recipes.load(name).aug.cutmix]


@pytest.mark.parametrize('name', MIXING)
@pytest.mark.parametrize('world_size', [3, 5, 6, 7, 9, 12, 24])
def test_mixup_recipes_get_an_even_per_device_batch_on_any_gpu_count(name, world_size):
    from mnv_train.optim import plan_batch
    recipe = recipes.load(name)
    plan = plan_batch(recipe, world_size)
    assert plan.per_device % 2 == 0 and plan.per_device <= recipe.train.batch_size
    # the nearest even split: within half of the even grid's spacing (2 x processes x accumulation)
    assert abs(plan.global_batch - recipe.train.global_batch_size) <= world_size * plan.accum_steps
    assert (plan.global_batch == recipe.train.global_batch_size) == (not any('nearest' in n for n in plan.notes))
