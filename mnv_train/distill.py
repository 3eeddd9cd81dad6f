"""Knowledge distillation from a local teacher, with timm's own task components (timm.task.distillation).

The recipe's distill section names a timm model and local weights for it: an mnv-train checkpoint (its EMA weights
when it has them), a timm .pth or a .safetensors file; nothing is downloaded. timm's DistillationTeacher runs it in
eval mode without gradients; the loop calls it under the run's autocast, on the same mixed or cut images as the
student, resized to the teacher's own input size and renormalised to its own mean and std. timm's
LogitDistillationTask (KL divergence of the softened logits) or FeatureDistillationTask (MSE of the pooled
features, through a learned projection when the sizes differ) adds its loss to the student's.

The teacher is not part of the student: DDP, the EMA, evaluation, checkpoints and export see the student alone. A
checkpoint records the teacher's path and sha256 instead of its weights, and the projection of feature
distillation, which trains with the student.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.task.distillation import DistillationTeacher, FeatureDistillationTask, LogitDistillationTask
from torch import nn

from . import checkpoint, data
from . import model as models
from .errors import UserError
from .recipe import DistillConfig, ModelConfig


class TeacherInput(nn.Module):
    """The teacher behind a resize of the student's batch to the teacher's own input size."""

    def __init__(self, model: nn.Module, img_size: int):
        super().__init__()
        self.model, self.img_size = model, img_size
        self.num_features = model.num_features
        self.head_hidden_size = getattr(model, 'head_hidden_size', model.num_features)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] == self.img_size and images.shape[-2] == self.img_size:
            return images
        return F.interpolate(images, size=(self.img_size, self.img_size), mode='bilinear', align_corners=False,
                             antialias=True)

    def forward(self, images):
        return self.model(self.resize(images))

    def forward_features(self, images):
        return self.model.forward_features(self.resize(images))

    def forward_head(self, features, pre_logits: bool = False):
        return self.model.forward_head(features, pre_logits=pre_logits)


@dataclass
class Teacher:
    module: DistillationTeacher
    path: Path
    sha256: str
    img_size: int
    norm: data.Normalization

    def record(self) -> dict:
        """What a checkpoint keeps of the teacher: where it came from and which file it was."""
        return {'path': str(self.path), 'sha256': self.sha256, 'img_size': self.img_size}


def load_teacher(cfg: DistillConfig, num_classes: int, student_size: int, device: torch.device,
                 channels_last: bool) -> Teacher:
    """The teacher of distill.teacher with the weights of distill.teacher_path, frozen, on the device.

    Its input size and normalisation are the distill section's, else those its own recipe states (an mnv-train
    checkpoint), else timm's pretrained config for the model.
    """
    path = Path(cfg.teacher_path)
    if not path.is_file():
        raise UserError(f'distill.teacher_path {path} not found (the teacher\'s weights, trained beforehand)')
    stored = checkpoint.read_weights(path, needs=('model', 'recipe'))
    model = models.create(ModelConfig(name=cfg.teacher), num_classes)
    models.load_weights(model, stored.preferred, f'distill.teacher_path {path}')
    own = (stored.recipe or {}).get('data', {})
    img_size = cfg.img_size or own.get('img_size') or student_size
    defaults = resolve_data_config({}, model=model)
    norm = data.Normalization(tuple(cfg.mean or own.get('mean') or defaults['mean']),
                              tuple(cfg.std or own.get('std') or defaults['std']))
    model = models.prepare(model, device, channels_last).eval().requires_grad_(False)
    teacher = DistillationTeacher(TeacherInput(model, img_size), device=device).eval()
    teacher.mean_kd.copy_(torch.tensor(norm.mean, device=device).view(1, -1, 1, 1))
    teacher.std_kd.copy_(torch.tensor(norm.std, device=device).view(1, -1, 1, 1))
    return Teacher(teacher, path, checkpoint.file_sha256(path), img_size, norm)


@dataclass
class Distillation:
    task: nn.Module  # timm's task: task(images, targets) -> {'loss', 'task_loss', 'kd_loss', 'output'}
    teacher: Teacher
    projection: Optional[nn.Module]  # feature distillation's learned map, which trains and is saved with the student

    def record(self) -> dict:
        """What a checkpoint keeps: the teacher's path and sha256, and the projection's weights."""
        return {**self.teacher.record(),
                'projection': self.projection.state_dict() if self.projection is not None else None}

    def restore(self, saved: dict) -> list[str]:
        """The projection's weights back; a note when the teacher file is not the one the run started with."""
        if self.projection is not None and saved.get('projection') is not None:
            self.projection.load_state_dict(saved['projection'])
        if saved.get('sha256') != self.teacher.sha256:
            return [f'the teacher {self.teacher.path} is not the file the checkpoint was trained with (sha256 '
                    f'{str(saved.get("sha256"))[:8]} then, {self.teacher.sha256[:8]} now): the run continues, but '
                    f'not as it would have']
        return []


def build_distillation(cfg: DistillConfig, student: nn.Module, criterion: nn.Module, student_norm: data.Normalization,
                       num_classes: int, student_size: int, device: torch.device, channels_last: bool) -> Distillation:
    """timm's logit or feature distillation task over the plain student. Its trainable_module (the student, with the
    feature projection when there is one) is what the optimizer, compile and DDP take; the caller puts the wrapped
    one back in task.trainable_module."""
    teacher = load_teacher(cfg, num_classes, student_size, device, channels_last)
    weights = {'task_loss_weight': cfg.task_loss_weight, 'distill_loss_weight': cfg.distill_loss_weight}
    if cfg.type == 'logit':
        task = LogitDistillationTask(student, teacher.module, criterion=criterion, temperature=cfg.temperature,
                                     device=device, verbose=False, **weights)
    else:
        student_dim = getattr(student, 'head_hidden_size', student.num_features)
        teacher_dim = teacher.module.model.head_hidden_size
        if student_dim != teacher_dim and not cfg.projection:
            raise UserError(f'distill.projection false needs features of one size: the student '
                            f'{type(student).__name__} has {student_dim}, the teacher {cfg.teacher} {teacher_dim}')
        task = FeatureDistillationTask(student, teacher.module, criterion=criterion, device=device, verbose=False,
                                       student_feature_dim=student_dim, teacher_feature_dim=teacher_dim, **weights)
    # timm takes the student's normalisation from its pretrained cfg; the batches are normalised as the recipe says
    task.student_mean.copy_(torch.tensor(student_norm.mean, device=device).view(1, -1, 1, 1))
    task.student_std.copy_(torch.tensor(student_norm.std, device=device).view(1, -1, 1, 1))
    return Distillation(task, teacher, getattr(task.trainable_module, 'projection', None))
