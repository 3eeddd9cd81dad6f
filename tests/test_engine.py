"""The loop's bookkeeping (fp16 skipped steps), and resuming across changed modes."""
import torch

from mnv_train import distributed, resume
from mnv_train import recipe as recipes
from mnv_train.build import build_run
from mnv_train.engine import StopFlag, Watch, optimizer_step, sync


def fp16_like(run):
    """The run with a loss scaler switched on, as train.amp fp16 has on CUDA (GradScaler works on CPU tensors)."""
    run.scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    run.scaler.scale(torch.ones(()))  # the scale lives on the device from the first scaled loss
    return run


def set_gradients(run, value):
    for p in run.module.parameters():
        p.grad = torch.full_like(p, value)


def test_fp16_steps_the_loss_scaler_skips_are_counted_and_the_schedule_still_advances(write_recipe, tmp_path):
    run = fp16_like(build_run(recipes.load(str(write_recipe())), distributed.init('cpu'), tmp_path))
    watch = Watch(run, StopFlag())
    before = {k: v.clone() for k, v in run.module.state_dict().items()}
    set_gradients(run, float('inf'))
    watch.pending.record_update(*optimizer_step(run))
    assert all(torch.equal(v, before[k]) for k, v in run.module.state_dict().items() if 'running' not in k)
    set_gradients(run, 1e-3)
    watch.pending.record_update(*optimizer_step(run))
    sync(run, watch)
    assert run.state.skipped_steps_in_epoch == 1 and run.state.step == 2
    assert run.scaler.get_scale() == 512.0  # halved once, for the skipped step
    assert run.lr() == run.scheduler._get_lr(2)[0]


def test_resuming_an_fp16_run_from_a_checkpoint_without_a_loss_scale_starts_it_fresh(write_recipe, tmp_path):
    recipe = recipes.load(str(write_recipe()))
    plain = build_run(recipe, distributed.init('cpu'), tmp_path / 'a')
    payload, _ = resume.capture(plain)
    assert payload['scaler'] == {}  # a bf16 or fp32 run has no loss scale
    resumed = fp16_like(build_run(recipe, distributed.init('cpu'), tmp_path / 'b'))
    notes = resume.restore(resumed, payload, 'plain')
    assert any('loss scale starts' in note for note in notes) and resumed.scaler.get_scale() == 1024.0


def test_resuming_with_channels_last_toggled_puts_the_optimizer_moments_in_the_new_layout(write_recipe, tmp_path):
    trained = build_run(recipes.load(str(write_recipe())), distributed.init('cpu'), tmp_path / 'a')
    set_gradients(trained, 1e-3)
    optimizer_step(trained)
    payload, _ = resume.capture(trained)
    resumed = build_run(recipes.load(str(write_recipe({'train': {'channels_last': False}}))),
                        distributed.init('cpu'), tmp_path / 'b')
    resume.restore(resumed, payload, 'trained')
    for group in resumed.optimizer.param_groups:
        for p in group['params']:
            for value in resumed.optimizer.state[p].values():
                if value.shape == p.shape:
                    assert value.stride() == p.stride()
    conv = resumed.module.conv_stem.weight
    assert conv.is_contiguous() and not trained.module.conv_stem.weight.is_contiguous()


def test_determinism_means_deterministic_kernels_on_every_device_or_autotuning(monkeypatch):
    from mnv_train.build import set_determinism
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        assert __import__('os').environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        set_determinism(False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        set_determinism(False)
