"""Every shipped recipe: loads, builds, trains a step, and agrees with the reference tables it cites."""
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml

from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.distributed import World
from mnv_train.engine import StopFlag, Watch, train_one_epoch
from mnv_train.recipe import flatten

REFERENCE = Path(__file__).resolve().parent.parent / 'docs' / 'recipes-reference.md'
ALL = sorted(p.stem for p in recipes.RECIPES_DIR.glob('*.yaml'))
GOOGLE = {'Conv-S': 'mnv4_conv_small_tf', 'Conv-M': 'mnv4_conv_medium_tf', 'Conv-L': 'mnv4_conv_large_tf',
          'Hybrid-M': 'mnv4_hybrid_medium_tf', 'Hybrid-L': 'mnv4_hybrid_large_tf'}
TIMM = {'mnv4_conv_small': 'mobilenetv4_conv_small.e2400_r224_in1k',
        'mnv4_conv_medium': 'mobilenetv4_conv_medium.e500_r256_in1k',
        'mnv4_conv_large': 'mobilenetv4_conv_large.e600_r384_in1k',
        'mnv4_hybrid_medium': 'mobilenetv4_hybrid_medium.ix_e550_r256_in1k',
        'mnv4_hybrid_large': 'mobilenetv4_hybrid_large.ix_e600_r384_in1k',  # the init timm 1.0.31 builds
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


IMAGENET_TRAIN = 1281167  # IMAGENET_TRAIN_EXAMPLES in TF Model Garden: what Google's steps count
# TF Model Garden defaults for keys a config leaves out (docs/recipes-reference.md section 4, "TF semantics";
# norm_epsilon: NormActivation in official/vision/configs/common.py)
TF_DEFAULTS = {'beta_1': 0.9, 'beta_2': 0.999, 'epsilon': 1e-7, 'alpha': 0.0, 'warmup_learning_rate': 0.0,
               'dynamic_decay': True, 'num_layers': 2, 'magnitude': 10, 'cutout_const': 40, 'translate_const': 10,
               'magnitude_std': 0.0, 'prob_to_apply': None, 'exclude_ops': [], 'mixup_alpha': 0.8,
               'cutmix_alpha': 1.0, 'prob': 1.0, 'switch_prob': 0.5, 'norm_epsilon': 0.001,
               'stochastic_depth_drop_rate': 0.0, 'label_smoothing': 0.0}


def google_config(column: str) -> tuple[dict, float]:
    """Google's config for Conv-S, Hybrid-L, ... as quoted verbatim in section 4 (yaml.safe_load), and the top-1
    its first comment line reports."""
    text = REFERENCE.read_text()
    block = re.search(rf'^### 4\.\d MNv4-{re.escape(column)} .*?\n```yaml\n(.*?)^```', text, re.S | re.M).group(1)
    return yaml.safe_load(block), float(re.match(r'# Top-1 Acc: ([\d.]+)%', block).group(1))


def tf(section: dict, key: str):
    return section.get(key, TF_DEFAULTS[key])


@pytest.mark.parametrize('column', sorted(GOOGLE))
def test_google_recipes_match_googles_verbatim_configs(column):
    config, top1 = google_config(column)
    r = recipes.load(GOOGLE[column])
    task, trainer = config['task'], config['trainer']
    model, train_data, optimization = task['model'], task['train_data'], trainer['optimizer_config']
    batch = train_data['global_batch_size']
    assert r.data.img_size == model['input_size'][0] == model['input_size'][1]
    assert r.train.global_batch_size == batch
    # epochs: Google's steps over ImageNet at that batch (9598.8 -> 9600 and 498.75 -> 500, as the paper states them)
    exact_epochs = trainer['train_steps'] * batch / IMAGENET_TRAIN
    assert abs(r.schedule.epochs - exact_epochs) <= 0.003 * exact_epochs, exact_epochs
    assert optimization['learning_rate']['cosine']['decay_steps'] == trainer['train_steps']  # cosine over the run
    warmup = optimization['warmup']['linear']
    assert r.schedule.warmup_epochs == round(warmup['warmup_steps'] * batch / IMAGENET_TRAIN, 2)
    assert r.schedule.warmup_lr == tf(warmup, 'warmup_learning_rate')
    cosine = optimization['learning_rate']['cosine']
    assert r.schedule.sched == optimization['learning_rate']['type'] == 'cosine'
    assert r.optim.lr == cosine['initial_learning_rate']
    assert r.schedule.min_lr == pytest.approx(tf(cosine, 'alpha') * cosine['initial_learning_rate'], rel=1e-12)
    adamw = optimization['optimizer']['adamw']
    assert r.optim.name == optimization['optimizer']['type'] == 'adamw'
    assert r.optim.betas == [tf(adamw, 'beta_1'), tf(adamw, 'beta_2')] and r.optim.eps == tf(adamw, 'epsilon')
    assert r.optim.weight_decay == adamw['weight_decay_rate']
    assert adamw['exclude_from_weight_decay'] == ['batch_normalization'] and r.optim.weight_decay_exclude == 'bn'
    assert adamw['gradient_clip_norm'] == 0.0 and r.optim.clip_grad is None
    ema = optimization.get('ema')
    assert r.ema.enabled == (ema is not None)
    if ema is not None:
        assert (r.ema.decay, r.ema.start_step, r.ema.warmup) == (ema['average_decay'], ema['start_step'],
                                                                 tf(ema, 'dynamic_decay'))
    backbone = model['backbone']['mobilenet']
    assert r.model.drop_rate == model['dropout_rate']
    assert r.model.drop_path_rate == tf(backbone, 'stochastic_depth_drop_rate')  # flat vs linear: noted in recipe
    norm = model['norm_activation']
    assert r.model.bn_momentum == pytest.approx(1 - norm['norm_momentum'], abs=1e-12)
    assert r.model.bn_eps == tf(norm, 'norm_epsilon')
    assert r.loss.smoothing == tf(task['losses'], 'label_smoothing')
    mix = train_data.get('mixup_and_cutmix')
    if mix is None:
        assert r.aug.mixup == r.aug.cutmix == 0
    else:
        assert [r.aug.mixup, r.aug.cutmix, r.aug.mixup_prob, r.aug.mixup_switch_prob] == [
            tf(mix, 'mixup_alpha'), tf(mix, 'cutmix_alpha'), tf(mix, 'prob'), tf(mix, 'switch_prob')]
    assert r.aug.reprob == 0 and 'random_erasing' not in train_data
    assert r.aug.scale == [0.08, 1.0] and r.aug.hflip == 0.5  # DataConfig defaults: no key overrides them
    assert not {'aug_crop', 'crop_area_range', 'aug_rand_hflip', 'color_jitter'} & train_data.keys()
    assert r.train.amp == {'float32': 'none', 'bfloat16': 'bf16'}[config['runtime']['mixed_precision_dtype']]
    assert r.provenance.expected_top1 == top1
    assert train_data['aug_type']['type'] == 'randaug' and r.aug.auto_augment is None  # Google's, not timm's
    randaug, ours = train_data['aug_type']['randaug'], r.aug.tf_randaugment
    assert (ours.num_layers, ours.magnitude, ours.magnitude_std, ours.prob_to_apply, ours.translate_const,
            ours.cutout_const, ours.exclude_ops) == tuple(tf(randaug, key) for key in (
                'num_layers', 'magnitude', 'magnitude_std', 'prob_to_apply', 'translate_const', 'cutout_const',
                'exclude_ops'))
    assert r.data.interpolation == r.aug.train_interpolation == 'bilinear'  # tf_resize_method default


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
    assert_eval_settings_are_timms(r, TIMM[name])


def assert_eval_settings_are_timms(r, tag: str):
    """The recipe evaluates as the installed timm's pretrained cfg for `tag` says the weights were evaluated."""
    cfg = timm.models.get_pretrained_cfg(tag)
    assert r.model.name == tag.split('.')[0]
    assert (r.data.img_size, r.data.crop_pct, r.data.interpolation) == (cfg.input_size[-1], cfg.crop_pct,
                                                                        cfg.interpolation)
    if cfg.test_input_size is not None:
        assert (r.provenance.eval_img_size, r.provenance.eval_crop_pct) == (cfg.test_input_size[-1],
                                                                            cfg.test_crop_pct or cfg.crop_pct)
    if tuple(cfg.mean) == (0.5, 0.5, 0.5):
        assert (r.data.mean, r.data.std) == (list(cfg.mean), list(cfg.std))


def departures(name: str, base: str) -> dict:
    """{flattened key: (base's value, name's value)} where the two resolved recipes differ."""
    a, b = (flatten(recipes.load(n).to_dict()) for n in (base, name))
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}


LABELS = {'name', 'description', 'provenance.source', 'provenance.notes'}


def test_the_lamb_recipe_holds_the_guides_values_and_the_timm_weights_eval_settings():
    claim = re.search(r'^Claim: "(.*)"', REFERENCE.read_text(), re.M).group(1)  # section 6, as the guide states it
    r = recipes.load('mnv4_hybrid_large_lamb')

    def stated(pattern):
        return float(re.search(pattern, claim).group(1))
    assert r.schedule.epochs == stated(r'(\d+) epochs') and r.data.img_size == stated(r'(\d+)px')
    assert r.schedule.warmup_epochs == stated(r'(\d+) warmup epochs') and r.optim.lr == stated(r'lr ([\d.]+)')
    assert r.train.global_batch_size == stated(r'batch (\d+)') and r.optim.name == 'lamb' and 'LAMB' in claim
    assert r.optim.weight_decay == stated(r'weight decay ([\d.]+)')
    assert r.loss.smoothing == stated(r'label smoothing ([\d.]+)') and r.schedule.sched == 'cosine'
    assert r.train.amp != 'none' and 'AMP' in claim
    assert (r.optim.betas, r.optim.eps) == (None, None)  # not stated: timm's Lamb defaults
    # what the guide leaves out is mnv4_hybrid_large's, and the eval settings are the weights' own
    assert set(departures('mnv4_hybrid_large_lamb', 'mnv4_hybrid_large')) - LABELS == {
        'optim.name', 'optim.lr', 'optim.weight_decay', 'optim.betas', 'optim.eps', 'schedule.warmup_epochs',
        'train.global_batch_size'}
    assert_eval_settings_are_timms(r, TIMM['mnv4_hybrid_large'])
    accuracy = numbers(next(v for k, v in timm_table()[TIMM['mnv4_hybrid_large']].items()
                            if k.startswith('ImageNet-1k val top-1')))
    assert (r.provenance.expected_top1, r.provenance.expected_top1_eval) == (accuracy[0], accuracy[3])


@pytest.mark.parametrize('name, tag', [('mobilenetv2_100_ra4', 'mobilenetv2_100'),
                                       ('mobilenetv3_small_100_ra4', 'mobilenetv3_small_100.lamb_in1k')])
def test_ra4_baselines_without_timm_weights_train_as_conv_s_and_evaluate_as_timm(name, tag):
    """No ra4 weights exist for these two: every training value is MNV4-Conv-S's (Google's 4.1), the epochs the ra4
    MobileNet baselines' (e3600 tags), the eval settings timm's pretrained cfg, and no top-1 is claimed."""
    r = recipes.load(name)
    assert set(departures(name, 'mnv4_conv_small_tf')) - LABELS == {
        'model.name', 'data.interpolation', 'data.mean', 'data.std', 'schedule.epochs', 'optim.weight_decay_exclude',
        'aug.train_interpolation', 'aug.auto_augment', 'provenance.expected_top1'} | {
        f'aug.tf_randaugment.{key}' for key in ('num_layers', 'magnitude', 'magnitude_std', 'prob_to_apply',
                                                'translate_const', 'cutout_const', 'exclude_ops')}
    assert r.schedule.epochs == recipes.load('mobilenetv1_100_ra4').schedule.epochs == 3600
    assert r.optim.weight_decay_exclude == recipes.load('mobilenetv1_100_ra4').optim.weight_decay_exclude
    assert r.provenance.expected_top1 is None
    assert_eval_settings_are_timms(r, tag)


def test_kd_recipes_are_their_base_recipe_plus_distillation_from_the_teacher_they_name():
    kd = recipes.load('mnv4_conv_small_kd')
    assert set(departures('mnv4_conv_small_kd', 'mnv4_conv_small')) - LABELS == {
        'distill.teacher', 'distill.teacher_path', 'distill.img_size', 'distill.task_loss_weight',
        'provenance.expected_top1', 'provenance.expected_top1_eval', 'provenance.eval_img_size',
        'provenance.eval_crop_pct'}  # no published figure for a distilled student
    teacher_tag = 'mobilenetv4_hybrid_large.e600_r384_in1k'  # the published weights, a teacher as good as any
    teacher = timm.models.get_pretrained_cfg(teacher_tag)
    assert kd.distill.teacher == teacher_tag.split('.')[0]
    assert teacher_tag in kd.distill.teacher_path and kd.distill.img_size == teacher.input_size[-1]
    assert (kd.distill.task_loss_weight, kd.distill.distill_loss_weight) == (0.0, 1.0)  # teacher's labels alone

    fmnist = recipes.load('fmnist_mnv4_conv_small_kd')
    assert set(departures('fmnist_mnv4_conv_small_kd', 'fmnist_mnv4_conv_small')) - LABELS == {
        'distill.teacher', 'distill.teacher_path', 'distill.temperature', 'distill.task_loss_weight',
        'distill.distill_loss_weight', 'provenance.expected_top1'}
    assert fmnist.distill.teacher == recipes.load('fmnist_mnv4_conv_small_long').model.name
    assert fmnist.distill.teacher_path == 'runs/fmnist_mnv4_conv_small_long/checkpoints/best.pt'
    assert fmnist.distill.task_loss_weight + fmnist.distill.distill_loss_weight == 1.0


def readme_result(recipe: str) -> float:
    """The top-1 README's Results table measured for a Fashion-MNIST recipe."""
    row = next(line for line in (REFERENCE.parent.parent / 'README.md').read_text().splitlines()
               if line.startswith(f'| `{recipe}` |'))
    return numbers(row.split('|')[2])[0]


def test_fashion_mnist_recipes_claim_what_the_readme_measured_and_change_only_what_they_say():
    for name in ('fmnist_mnv4_conv_small', 'fmnist_mnv4_conv_small_long'):
        assert recipes.load(name).provenance.expected_top1 == readme_result(name)
    assert recipes.load('fmnist_mnv4_conv_small_kd').provenance.expected_top1 == 92.60  # README distillation table
    assert '**92.60**' in next(line for line in (REFERENCE.parent.parent / 'README.md').read_text().splitlines()
                               if line.startswith('| student (T 2, task 0.5, teacher 0.5) |'))
    quick = recipes.load('fmnist_mnv4_conv_small')
    assert (quick.data.dataset, quick.data.val_split, quick.model.num_classes) == ('fashion_mnist', 'test', None)
    assert set(departures('fmnist_mnv4_conv_small_long', 'fmnist_mnv4_conv_small')) - LABELS == {
        'model.drop_rate', 'model.drop_path_rate', 'aug.scale', 'aug.ratio', 'aug.reprob', 'schedule.epochs',
        'schedule.warmup_epochs', 'ema.decay', 'provenance.expected_top1'}
    tune = recipes.load('finetune_fmnist_from_ckpt')
    assert set(departures('finetune_fmnist_from_ckpt', 'fmnist_mnv4_conv_small')) - LABELS == {
        'model.pretrained_path', 'optim.lr', 'schedule.epochs', 'schedule.warmup_epochs',
        'provenance.expected_top1'}
    assert tune.model.pretrained_path == 'runs/fmnist_mnv4_conv_small/checkpoints/best.pt'  # the quickstart's run
    assert tune.optim.lr < quick.optim.lr and tune.schedule.epochs < quick.schedule.epochs


def test_speed_variants_change_only_the_train_size_ramp_and_the_fit_check_and_claim_no_result():
    ramp = {f'schedule.train_size_ramp.{key}' for key in ('start_size', 'start_epoch', 'end_epoch')}
    assert set(departures('fmnist_mnv4_conv_small_fast', 'fmnist_mnv4_conv_small')) - LABELS == ramp | {
        'train.fit_check_every', 'provenance.expected_top1'}
    assert set(departures('mnv4_hybrid_large_prog', 'mnv4_hybrid_large')) - LABELS == ramp | {
        'provenance.expected_top1', 'provenance.expected_top1_eval'}
    for name in ('fmnist_mnv4_conv_small_fast', 'mnv4_hybrid_large_prog'):
        provenance = recipes.load(name).provenance
        assert provenance.expected_top1 is None and '[INFERRED]' in provenance.source, name


@pytest.mark.parametrize('name', ALL)
def test_every_recipe_states_whether_the_ema_warms_up(name):
    assert 'warmup' in recipes.load_raw(name).get('ema', {}), f'{name} leaves ema.warmup to the default'


@pytest.mark.parametrize('name', ALL)
def test_every_recipe_builds_and_trains_one_step_on_cpu(name, tmp_path):
    ramp = ['schedule.train_size_ramp.start_size=32'] if recipes.load(name).schedule.train_size_ramp else []
    recipe = recipes.load(name, ['data.dataset=synthetic', 'data.img_size=64', 'data.synthetic_train_size=8',
                                 'data.synthetic_val_size=4', 'data.num_workers=0', 'train.global_batch_size=4',
                                 'train.batch_size=4', 'data.extra_evals=[]',
                                 'model.pretrained_path=null',  # fine-tuning recipes: tests/test_finetune.py
                                 "distill.teacher=''", *ramp])  # distillation recipes: tests/test_distill.py
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
