"""Model construction: SyncBatchNorm conversion that keeps timm's fused activations, and its order with freezing."""
import torch

from mnv_train import finetune
from mnv_train import model as models
from mnv_train import recipe as recipes
from mnv_train.build import build_model, create_ema
from mnv_train.optim import plan_batch


def test_sync_batchnorm_keeps_the_activations_so_eval_outputs_are_unchanged():
    torch.manual_seed(0)
    module = models.create(recipes.ModelConfig(name='mobilenetv4_conv_small'), 10).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = module.forward_features(images)  # timm zero-initialises the classifier: compare features
        converted = models.sync_batchnorm(module).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
        assert torch.equal(converted.forward_features(images), expected)
        # torch's own conversion drops BatchNormAct2d's activation: the network it gives is another one
        plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(models.create(recipes.ModelConfig(
            name='mobilenetv4_conv_small'), 10)).eval()
        plain.load_state_dict(module.state_dict())
        assert not torch.allclose(plain.forward_features(images), expected, rtol=1e-3, atol=0)


def test_sync_batchnorm_comes_before_freezing_and_the_ema_copy(write_recipe):
    recipe = recipes.load(str(write_recipe({'model': {'freeze': ['conv_stem', 'bn1']}})))
    module = build_model(recipe, 4, sync_bn=True)
    assert isinstance(module.bn1, torch.nn.SyncBatchNorm) and finetune.has_frozen_statistics(module.bn1)
    ema = create_ema(module, plan_batch(recipe, 1), recipe)
    assert type(ema.module.bn1) is type(module.bn1) and isinstance(ema.module.bn1.act, torch.nn.Module)
    frozen = {name: buffer.clone() for name, buffer in module.bn1.named_buffers()}
    module.train()(torch.randn(4, 3, 32, 32))  # a training step's forward: frozen statistics must not move
    assert all(torch.equal(frozen[name], buffer) for name, buffer in module.bn1.named_buffers())
    assert not torch.equal(module.blocks[0][0].bn1.running_mean, torch.zeros_like(module.blocks[0][0].bn1.running_mean))
