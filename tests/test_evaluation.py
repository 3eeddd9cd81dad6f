"""When training evaluates which sets, and what its evaluation loaders keep alive in between."""
import pytest

from mnv_train import distributed, evaluation
from mnv_train import recipe as recipes
from mnv_train.build import build_run

EVERY_OTHER = {'schedule': {'epochs': 3, 'warmup_epochs': 0.5},
               'data': {'extra_evals': [[24, 1.0]], 'synthetic_val_size': 8, 'num_workers': 1},
               'train': {'extra_eval_every': 2, 'fit_check_every': 2, 'fit_check_images': 8}}


@pytest.mark.parametrize('keep', [False, True])
def test_extra_sizes_and_the_fit_check_come_every_nth_epoch_and_at_the_last_with_workers_kept_only_if_asked(
        write_recipe, tmp_path, keep):
    changes = {**EVERY_OTHER, 'data': {**EVERY_OTHER['data'], 'eval_persistent_workers': keep}}
    run = build_run(recipes.load(str(write_recipe(changes))), distributed.init('cpu'), tmp_path / 'run')
    evaluated = [sorted(evaluation.evaluate_run(run, epoch)) for epoch in range(3)]
    extra, fit = {'top1@24', 'ema_top1@24'}, {'train_top1'}
    assert [extra <= set(keys) for keys in evaluated] == [False, True, True]  # epoch 2, then the last (3)
    assert [fit <= set(keys) for keys in evaluated] == [False, True, True]
    assert all('top1' in keys and 'ema_top1' in keys for keys in evaluated)
    # a loader without persistent workers drops its iterator, and with it the workers, after each pass
    assert [s.loader._iterator is not None for s in [*run.evals, run.fit_check]] == [keep] * 3
