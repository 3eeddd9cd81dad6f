import math

import pytest
import torch

from mnv_train import model as models
from mnv_train import recipe as recipes
from mnv_train.optim import TrainLoss, create_optimizer, create_scheduler, plan_batch
from mnv_train.recipe import LossConfig, ScheduleConfig

from conftest import TINY, merge


def make(global_batch=4096, per_device=256, opt='adamw', lr=0.002, ema=0.9999, start=1560):
    return recipes.from_dict(merge(TINY, {
        'train': {'global_batch_size': global_batch, 'batch_size': per_device},
        'optim': {'name': opt, 'lr': lr}, 'ema': {'enabled': True, 'decay': ema, 'start_step': start}}))


def test_accumulation_keeps_the_recipe_global_batch():
    plan = plan_batch(make(), world_size=8)
    assert (plan.per_device, plan.accum_steps, plan.global_batch) == (256, 2, 4096)
    assert plan.lr == 0.002 and plan.ema_decay == 0.9999 and plan.notes == []
    single = plan_batch(make(), world_size=1)
    assert (single.per_device, single.accum_steps, single.global_batch) == (256, 16, 4096)


def test_per_device_batch_shrinks_to_split_exactly():
    plan = plan_batch(make(global_batch=1024, per_device=200), world_size=4)
    assert (plan.per_device, plan.accum_steps, plan.global_batch) == (128, 2, 1024)


def test_impossible_split_rescales_lr_and_ema_by_the_rule():
    plan = plan_batch(make(), world_size=3)
    ratio = plan.global_batch / 4096
    assert plan.global_batch != 4096 and plan.notes
    assert plan.lr_rule == 'sqrt'
    assert plan.lr == pytest.approx(0.002 * math.sqrt(ratio))
    assert plan.ema_decay == pytest.approx(0.9999 ** ratio)


def test_batch_override_rescales_lr_linearly_for_sgd_and_keeps_ema_horizon():
    plan = plan_batch(make(opt='sgd', lr=0.8), world_size=8, global_batch=1024)
    assert plan.global_batch == 1024 and plan.lr_rule == 'linear'
    assert plan.lr == pytest.approx(0.2)
    assert plan.ema_start_step == 1560 * 4
    # the EMA forgets the same number of samples: decay^(steps) at equal samples matches
    assert plan.ema_decay ** 4 == pytest.approx(0.9999)
    assert 'overridden' in plan.report(make(opt='sgd', lr=0.8))


def test_schedule_is_per_step_with_linear_warmup_and_cosine_to_min_lr():
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = create_scheduler(optimizer, ScheduleConfig(epochs=10, warmup_epochs=2, warmup_lr=0.0, min_lr=0.01),
                                 steps_per_epoch=10)
    lrs = []
    for step in range(101):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]['lr'])
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(0.5) and lrs[19] == pytest.approx(0.95)
    # as in the TF configs, warmup overrides the start of a cosine that counts from step 0
    assert lrs[20] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 20 / 100)))
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert lrs[100] == pytest.approx(0.01)


def test_optimizer_takes_recipe_betas_and_skips_decay_on_norm_and_bias():
    recipe = recipes.from_dict(merge(TINY, {'optim': {'betas': [0.6, 0.999], 'eps': 1e-6, 'weight_decay': 0.1}}))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = create_optimizer(model, recipe.optim, lr=0.01)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {tuple(g['betas']) for g in optimizer.param_groups} == {(0.6, 0.999)}
    decays = {g['weight_decay']: sum(p.numel() for p in g['params']) for g in optimizer.param_groups}
    assert decays == {0.1: 4 * 3 * 3 * 3, 0.0: 4 + 4 + 4}


def test_loss_smooths_hard_labels_and_takes_mixed_targets_as_they_are():
    loss = TrainLoss(LossConfig(smoothing=0.1))
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    hard = loss(logits, torch.tensor([0]))
    smoothed = torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]])
    assert hard == pytest.approx(loss(logits, smoothed).item())
    assert hard > torch.nn.functional.cross_entropy(logits, torch.tensor([0]))


@pytest.mark.parametrize('rule', ['1d', 'bn'])
def test_weight_decay_rule_decides_which_hybrid_large_tensors_decay(rule):
    model = models.create(recipes.ModelConfig(name='mobilenetv4_hybrid_large'), 10)
    cfg = recipes.OptimConfig(name='adamw', weight_decay=0.2, weight_decay_exclude=rule)
    decayed = {id(p) for group in create_optimizer(model, cfg, lr=0.01).param_groups if group['weight_decay'] > 0
               for p in group['params']}
    names = {id(p): name for name, p in model.named_parameters()}
    batchnorm = {id(p) for layer in model.modules() if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
                 for p in layer.parameters(recurse=False)}
    gammas = {i for i, name in names.items() if name.endswith('layer_scale.gamma')}
    assert len(gammas) == 35
    if rule == '1d':  # timm: every 1-D tensor is spared
        assert decayed == {id(p) for p in model.parameters() if p.ndim > 1}
        assert not gammas & decayed
    else:  # Google: only BatchNorm is spared; biases and layer scales decay
        assert decayed == set(names) - batchnorm
        assert gammas <= decayed
    assert len(decayed) == {'1d': 146, 'bn': 182}[rule]  # Google decays 35 layer scales and 1 bias more
