"""Knowledge distillation from a local teacher: the loss it adds, a frozen teacher kept out of checkpoints, exact
resume, and the bad teachers a user can give."""
import signal

import pytest
import torch
from test_resume import start_training

from mnv_train import checkpoint, distributed
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.cli import train_main
from mnv_train.data import device_batches
from mnv_train.engine import StopFlag, Watch, train_one_epoch

from conftest import ONE_EPOCH, assert_same_training_state, merge, train_tiny, wait_for


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """best.pt of a tiny 4-class run (mobilenetv4_conv_small, 32 px), the teacher of the tests below."""
    return train_tiny(tmp_path_factory.mktemp('teacher'), ONE_EPOCH, name='teacher')[1] / 'checkpoints' / 'best.pt'


def kd(path, **distill):
    return {'distill': {'teacher': 'mobilenetv4_conv_small', 'teacher_path': str(path), 'temperature': 2.0,
                        'task_loss_weight': 0.5, 'distill_loss_weight': 0.5, **distill}}


def fixed_batch(run):
    images, targets, _ = next(iter(device_batches(run.train_loader, run.train_input)))
    return images, targets


def test_logit_distillation_lowers_the_distillation_loss(write_recipe, tmp_path, teacher):
    only_the_teacher = kd(teacher, temperature=1.0, task_loss_weight=0.0, distill_loss_weight=1.0)
    recipe = recipes.load(str(write_recipe(merge(only_the_teacher, {'schedule': {'epochs': 5, 'warmup_epochs': 0.5},
                                                                    'optim': {'lr': 0.0005},
                                                                    'ema': {'enabled': False}}))))
    run = build_run(recipe, distributed.init('cpu'), tmp_path / 'run')
    batches = [(images, targets) for images, targets, _ in device_batches(run.train_loader, run.train_input)]
    task = run.distillation.task

    def kd_loss():  # in training mode: a few steps leave BatchNorm's running statistics far from the batch's
        task.train()  # averaged over the epoch's batches: one batch's loss moves by 10 % from one epoch to the next
        with torch.no_grad():
            return sum(float(task(images, targets)['kd_loss']) for images, targets in batches) / len(batches)
    before = kd_loss()
    watch = Watch(run, StopFlag())
    for epoch in range(5):
        train_one_epoch(run, epoch, watch)
        run.state.samples_in_epoch = 0
    assert kd_loss() < 0.8 * before


def test_the_teacher_is_frozen_outside_ddp_and_the_checkpoint_keeps_only_its_path_and_sha256(write_recipe, tmp_path,
                                                                                           teacher):
    recipe = write_recipe(kd(teacher))
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    payload = checkpoint.load(tmp_path / 'run' / 'checkpoints' / 'last.pt')
    plain = build_run(recipes.load(str(write_recipe(name='plain'))), distributed.init('cpu'), tmp_path / 'plain')
    assert payload['model'].keys() == plain.module.state_dict().keys() == payload['ema'].keys()  # the student only
    assert payload['distill']['path'] == str(teacher)
    assert payload['distill']['sha256'] == checkpoint.file_sha256(teacher)
    assert payload['distill']['projection'] is None
    run = build_run(recipes.load(str(recipe)), distributed.init('cpu'), tmp_path / 'again')
    teacher_parameters = list(run.distillation.teacher.module.parameters())
    assert teacher_parameters and not any(p.requires_grad for p in teacher_parameters)
    trained = {id(p) for group in run.optimizer.param_groups for p in group['params']}
    assert not trained & {id(p) for p in teacher_parameters}
    assert not any(m is run.distillation.teacher.module for m in run.model.modules())
    run.model.train()
    assert not any(m.training for m in run.distillation.teacher.module.modules())  # eval while the student trains
    before = [p.clone() for p in teacher_parameters]
    train_one_epoch(run, 0, Watch(run, StopFlag()))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher_parameters))


def test_kill_9_and_resume_with_a_teacher_is_bit_identical(write_recipe, tmp_path, teacher):
    recipe = write_recipe(merge(kd(teacher), {'data': {'synthetic_train_size': 256},
                                              'train': {'checkpoint_every_steps': 3}}))
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'whole'), '--quiet']) == 0
    out = tmp_path / 'killed'
    process = start_training(recipe, out)
    wait_for(out / 'checkpoints' / 'step-00000012.pt.json', process)
    process.kill()
    assert process.wait() == -signal.SIGKILL
    assert train_main(['--recipe', str(recipe), '--output', str(out), '--quiet', '--resume', 'auto']) == 0
    assert_same_training_state(*(d / 'checkpoints' / 'last.pt' for d in (tmp_path / 'whole', out)))


def test_feature_distillation_trains_a_projection_and_saves_it(write_recipe, tmp_path, teacher):
    recipe = write_recipe(merge(kd(teacher, type='feature', loss='mse'),
                                {'model': {'name': 'mobilenetv3_small_100'}}))  # 1024 features, the teacher 1280
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 0
    payload = checkpoint.load(tmp_path / 'run' / 'checkpoints' / 'last.pt')
    assert payload['distill']['projection']['weight'].shape == (1280, 1024)
    assert not any(key.startswith('student.') for key in payload['model'])  # the plain student's names


def test_dry_run_reports_the_teachers_share_of_a_step(write_recipe, tmp_path, teacher, capsys):
    assert train_main(['--recipe', str(write_recipe(kd(teacher))), '--output', str(tmp_path / 'run'),
                       '--dry-run']) == 0
    assert "of which the teacher's forward" in capsys.readouterr().out


@pytest.mark.parametrize('changes, culprit', [
    (lambda t, tmp: kd(tmp / 'no-such.pt'), 'distill.teacher_path {tmp}/no-such.pt not found'),
    (lambda t, tmp: kd(t, teacher='mobilenetv3_small_100'), 'distill.teacher_path {teacher} does not fit '
                                                             'mobilenetv3_small_100'),
    (lambda t, tmp: merge(kd(t), {'data': {'synthetic_classes': 6}}), 'distill.teacher_path {teacher} was trained '
                                                                        'for 4 classes, but'),
    (lambda t, tmp: merge(kd(t, type='feature', loss='mse', projection=False),
                          {'model': {'name': 'mobilenetv3_small_100'}}),
     'distill.projection false needs features of one size: the student MobileNetV3 has 1024, the teacher '
     'mobilenetv4_conv_small 1280'),
    (lambda t, tmp: kd(t, type='feature'), "distill.loss 'kl' does not go with distill.type 'feature'"),
    (lambda t, tmp: {'distill': {'teacher': 'mobilenetv4_conv_small'}}, 'needs distill.teacher_path'),
])
def test_a_bad_teacher_is_one_line_naming_it(changes, culprit, write_recipe, tmp_path, teacher, capsys):
    recipe = write_recipe(changes(teacher, tmp_path))
    assert train_main(['--recipe', str(recipe), '--output', str(tmp_path / 'run'), '--quiet']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit.format(tmp=tmp_path, teacher=teacher) in err, err


def test_gradient_clipping_covers_the_projection_of_feature_distillation(write_recipe, tmp_path, teacher):
    recipe = recipes.load(str(write_recipe(merge(kd(teacher, type='feature', loss='mse'),
                                                 {'model': {'name': 'mobilenetv3_small_100'},
                                                  'optim': {'clip_grad': 1e-3, 'clip_mode': 'norm'}}))))
    run = build_run(recipe, distributed.init('cpu'), tmp_path / 'run')
    projection = list(run.distillation.projection.parameters())
    trained = {id(p) for group in run.optimizer.param_groups for p in group['params']}
    assert {id(p) for p in run.trained_parameters()} == trained and {id(p) for p in projection} <= trained
    images, targets = fixed_batch(run)
    run.loss(images, targets).backward()
    before = torch.stack([p.grad.norm() for p in run.trained_parameters() if p.grad is not None]).norm()
    assert before > 1e-2  # far above the clip: the step must scale every gradient down, the projection's too
    clipped = torch.nn.utils.clip_grad_norm_(run.trained_parameters(), 1e-3)
    assert torch.isclose(clipped, before)
    assert torch.stack([p.grad.norm() for p in run.trained_parameters() if p.grad is not None]).norm() <= 1.01e-3


def test_a_teacher_given_as_a_safetensors_file_gets_the_weights_of_its_checkpoint(write_recipe, tmp_path, teacher):
    from safetensors.torch import save_file
    payload = checkpoint.load(teacher, needs=('model',))
    path = tmp_path / 'teacher.safetensors'
    save_file({key: value.contiguous() for key, value in (payload.get('ema') or payload['model']).items()}, str(path))
    teachers = [build_run(recipes.load(str(write_recipe(kd(source)))), distributed.init('cpu'),
                          tmp_path / name).distillation.teacher for source, name in ((teacher, 'a'), (path, 'b'))]
    assert teachers[1].sha256 == checkpoint.file_sha256(path) and teachers[1].img_size == teachers[0].img_size
    first, second = (t.module.state_dict() for t in teachers)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
