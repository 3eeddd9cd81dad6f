"""Fine-tuning: initialising from local weights, classifier reset, size warnings, freezing, layer-wise LR decay."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from mnv_train import checkpoint, finetune
from mnv_train import model as models
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.cli import train_main
from mnv_train.distributed import World
from mnv_train.engine import StopFlag, Watch, train_one_epoch
from mnv_train.errors import UserError
from mnv_train.recipe import ModelConfig

from conftest import ONE_EPOCH, run_cli, train_tiny


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """best.pt of a tiny 4-class run with EMA, trained at 32 px."""
    return train_tiny(tmp_path_factory.mktemp('pretrained'), ONE_EPOCH, name='source')[1] / 'checkpoints' / 'best.pt'


def fresh(num_classes=4, **model):
    cfg = ModelConfig(**{'name': 'mobilenetv4_conv_small', **model})
    return models.create(cfg, num_classes), cfg


def test_our_checkpoint_gives_its_ema_weights_and_a_new_classifier_when_classes_differ(pretrained):
    module, cfg = fresh(num_classes=6, pretrained_path=str(pretrained))
    notes = finetune.prepare(module, cfg, 32)
    assert notes[0] == f'initialised from the EMA weights of {pretrained}'
    assert notes[1].startswith('classifier reset: best.pt has 4 classes, this model 6 classes; classifier.weight')
    assert len(notes) == 2  # same input size: no warning
    ema = checkpoint.load(pretrained)['ema']
    state = module.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema if not k.startswith('classifier.'))
    assert state['classifier.weight'].shape[0] == 6


def test_another_input_size_than_pretraining_is_warned_about(pretrained, tmp_path):
    module, cfg = fresh(pretrained_path=str(pretrained))
    assert finetune.prepare(module, cfg, 48)[-1].startswith(
        'input size differs from pretraining: 32 px (its recipe), fine-tuning at 48 px')
    payload = checkpoint.load(pretrained)
    timm_file = tmp_path / 'model.pth.tar'
    torch.save({'state_dict': payload['model'], 'state_dict_ema': payload['ema']}, timm_file)
    module, cfg = fresh(pretrained_path=str(timm_file))
    notes = finetune.prepare(module, cfg, 32)
    assert notes[0] == f'initialised from the EMA weights of {timm_file}'
    assert notes[-1].startswith("input size differs from pretraining: 224 px (model.pth.tar does not say; timm's "
                                "pretrained cfg mobilenetv4_conv_small.e2400_r224_in1k does)")
    assert torch.equal(module.state_dict()['conv_stem.weight'], payload['ema']['conv_stem.weight'])


def test_safetensors_weights_load(tmp_path):
    source, _ = fresh(num_classes=4)
    path = tmp_path / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    module, cfg = fresh(num_classes=4, pretrained_path=str(path))
    assert len(finetune.prepare(module, cfg, 224)) == 1  # loaded, 224 px like timm's cfg: nothing to warn about
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), source.state_dict().values()))


def missing_file(directory):
    return directory / 'missing.pth'


def broken_safetensors(directory):
    path = directory / 'broken.safetensors'
    path.write_bytes(b'not safetensors')
    return path


def weights_of_another_model(directory):
    path = directory / 'other.pth'
    torch.save(timm.create_model('mobilenetv3_small_100', num_classes=4).state_dict(), path)
    return path


@pytest.mark.parametrize('make, message', [
    (missing_file, 'checkpoint {d}/missing.pth not found'),
    (broken_safetensors, '{d}/broken.safetensors: not a readable safetensors file'),
    (weights_of_another_model, '{d}/other.pth does not fit mobilenetv4_conv_small: missing '),
])
def test_bad_weights_are_a_user_error(make, message, tmp_path):
    module, cfg = fresh(pretrained_path=str(make(tmp_path)))
    with pytest.raises(UserError) as error:
        finetune.prepare(module, cfg, 32)
    assert str(error.value).startswith(message.format(d=tmp_path))


def test_a_checkpoint_of_another_model_names_it(pretrained):
    module, cfg = fresh(name='mobilenetv3_small_100', pretrained_path=str(pretrained))
    with pytest.raises(UserError, match=r'does not fit mobilenetv3_small_100 \(it was trained as '
                                        r'mobilenetv4_conv_small\): missing'):
        finetune.prepare(module, cfg, 32)


def test_init_from_on_the_command_line_trains_from_the_weights(pretrained, write_recipe, tmp_path):
    recipe = write_recipe({**ONE_EPOCH, 'data': {'synthetic_classes': 5}})
    result = run_cli('train.py', '--recipe', recipe, '--output', tmp_path / 'tuned', '--quiet',
                     '--init-from', pretrained)
    assert result.returncode == 0, result.stderr
    assert f'warning: initialised from the EMA weights of {pretrained}' in result.stderr
    assert 'warning: classifier reset: best.pt has 4 classes, this model 5 classes' in result.stderr
    bad = run_cli('train.py', '--recipe', recipe, '--output', tmp_path / 'bad', '--init-from', tmp_path / 'nope.pt')
    assert bad.returncode == 2 and bad.stderr.splitlines() == [f'error: checkpoint {tmp_path}/nope.pt not found']


def test_frozen_layers_and_their_batchnorm_statistics_do_not_change(write_recipe, tmp_path):
    recipe = recipes.load(str(write_recipe({**ONE_EPOCH, 'model': {'freeze': ['conv_stem', 'bn1', 'blocks.0']}})))
    run = build_run(recipe, World(), tmp_path)
    optimized = {id(p) for group in run.optimizer.param_groups for p in group['params']}
    assert id(run.module.conv_stem.weight) not in optimized and id(run.module.classifier.weight) in optimized
    before = {k: v.clone() for k, v in run.module.state_dict().items()}
    train_one_epoch(run, 0, Watch(run, StopFlag()))
    after = run.module.state_dict()
    frozen = [k for k in before if k.startswith(('conv_stem.', 'bn1.', 'blocks.0.')) and 'num_batches' not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before['blocks.1.0.bn1.running_mean'], after['blocks.1.0.bn1.running_mean'])
    assert not torch.equal(before['classifier.weight'], after['classifier.weight'])


def test_a_freeze_prefix_that_matches_nothing_is_a_user_error():
    module, cfg = fresh(freeze=['conv_stem', 'block.0'])
    with pytest.raises(UserError, match=r"model.freeze: 'block.0' matches no parameter name \(top-level modules: "
                                        r"conv_stem, bn1, blocks,"):
        finetune.prepare(module, cfg, 32)


def test_layer_decay_gives_mnv4_smaller_lrs_towards_the_input(write_recipe, tmp_path):
    run = build_run(recipes.load(str(write_recipe({'optim': {'layer_decay': 0.7}}))), World(), tmp_path)
    run.scheduler.step_update(run.steps_per_epoch)  # past the warmup
    lr_of = {id(p): group['lr'] for group in run.optimizer.param_groups for p in group['params']}
    stem, head = lr_of[id(run.module.conv_stem.weight)], lr_of[id(run.module.classifier.weight)]
    assert len(set(lr_of.values())) >= 5
    assert stem == pytest.approx(head * min(g['lr_scale'] for g in run.optimizer.param_groups))
    assert stem < 0.01 * head


def test_the_shipped_finetune_recipe_starts_from_a_quickstart_checkpoint(tmp_path, capsys):
    synthetic = ['data.dataset=synthetic', 'data.synthetic_train_size=8', 'data.synthetic_val_size=4',
                 'data.num_workers=0', 'train.global_batch_size=4', 'train.batch_size=4']
    quickstart = tmp_path / 'quickstart'
    assert train_main(['--recipe', 'fmnist_mnv4_conv_small', '--output', str(quickstart), '--quiet',
                       '--set', 'schedule.epochs=1'] + [a for s in synthetic for a in ('--set', s)]) == 0
    best = quickstart / 'checkpoints' / 'best.pt'
    recipe = recipes.load('finetune_fmnist_from_ckpt', synthetic + [f'model.pretrained_path={best}'])
    assert recipes.load('finetune_fmnist_from_ckpt').model.pretrained_path == \
        'runs/fmnist_mnv4_conv_small/checkpoints/best.pt'
    capsys.readouterr()
    run = build_run(recipe, World(), tmp_path / 'tuned')
    err = capsys.readouterr().err
    assert f'warning: initialised from the EMA weights of {best}\n' in err
    assert 'classifier reset' not in err and 'input size differs' not in err
    train_one_epoch(run, 0, Watch(run, StopFlag()))
    assert run.state.step == 2 and all(torch.isfinite(p).all() for p in run.module.parameters())
