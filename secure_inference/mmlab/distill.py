"""Knowledge distillation from the unmodified network while finetuning with Block-ReLUs.

Switched on by the config entry::

    secure_inference = dict(
        ...,
        distill=dict(teacher_checkpoint='work_dirs/baseline/epoch_200.pth',
                     temperature=4.0, loss_weight=1.0))

The teacher is the same architecture (with the config's conversions) loaded from the
checkpoint before Block-ReLUs were introduced; it runs frozen in eval mode on the same
preprocessed batch. The student's logits (classification head or segmentation decode head
output) are captured during its ordinary loss computation, and ``loss_kd``
= ``loss_weight · T² · KL(softmax(t/T) ‖ softmax(s/T))`` (over the class dimension, mean
over images and pixels) is added to its losses. The checkpoint keeps only the student.

:class:`DistillationHook` is registered in mmengine's ``HOOKS``; it captures the logits with
torch module hooks (a forward hook on the head, a forward pre-hook and forward hook on the
model in ``mode='loss'``), so nothing of the model is replaced or patched.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from .config_utils import task_options


def kd_loss(student: torch.Tensor, teacher: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over dim 1, mean over the rest."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {list(student.shape)} and teacher logits "
                         f"{list(teacher.shape)} differ in shape; distillation needs the same "
                         "head on both networks")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_p_s = F.log_softmax(student.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * (t * t)


def _head_of(model: nn.Module, head: str | None) -> tuple[str, nn.Module]:
    names = [head] if head else ["head", "decode_head"]
    for name in names:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ValueError(f"cannot find the logits head of {type(model).__name__} (tried {names}); "
                     "set secure_inference.distill.head to the attribute name of its head")


def _loss_mode(args: tuple, kwargs: dict) -> bool:
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "tensor")
    return mode == "loss"


@HOOKS.register_module()
class DistillationHook(Hook):
    """Adds the distillation loss against a frozen teacher to the model's training losses.

    ``cfg`` (the config whose model and conversions build the teacher) defaults to the
    Runner's config, so the hook can be given in a config as ``dict(type='DistillationHook',
    teacher_checkpoint=...)``.
    """

    priority = "NORMAL"

    def __init__(self, cfg=None, teacher_checkpoint: str | None = None,
                 temperature: float = 4.0, loss_weight: float = 1.0,
                 head: str | None = None) -> None:
        if not teacher_checkpoint:
            raise ValueError("secure_inference.distill needs teacher_checkpoint (the checkpoint "
                             "of the network before Block-ReLUs)")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.cfg = cfg
        self.teacher_checkpoint = str(teacher_checkpoint)
        self.temperature = float(temperature)
        self.loss_weight = float(loss_weight)
        self.head = head
        self.teacher: nn.Module | None = None
        self._captured: torch.Tensor | None = None
        self._handles: list = []

    def before_train(self, runner) -> None:
        from .finetune import load_finetuned
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        device = next(model.parameters()).device
        teacher = load_finetuned(self.cfg if self.cfg is not None else runner.cfg,
                                 self.teacher_checkpoint, device=device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.attach(model)
        runner.logger.info(f"distilling from {self.teacher_checkpoint} "
                           f"(T={self.temperature}, weight={self.loss_weight})")

    def attach(self, model: nn.Module) -> None:
        """Register the module hooks on ``model`` and its head that add ``loss_kd``."""
        self.detach()
        _, head = _head_of(model, self.head)
        self._handles = [
            head.register_forward_hook(self._capture_logits),
            model.register_forward_pre_hook(self._start_loss, with_kwargs=True),
            model.register_forward_hook(self._add_kd_loss, with_kwargs=True),
        ]

    def detach(self) -> None:
        """Remove the module hooks (after training)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def after_train(self, runner) -> None:
        self.detach()

    def _capture_logits(self, head: nn.Module, args, out) -> None:
        if head.training and torch.is_tensor(out):
            self._captured = out

    def _start_loss(self, model: nn.Module, args, kwargs) -> None:
        if _loss_mode(args, kwargs):
            self._captured = None

    def _add_kd_loss(self, model: nn.Module, args, kwargs, losses):
        if not _loss_mode(args, kwargs):
            return None
        student = self._captured
        self._captured = None
        if student is None:
            raise RuntimeError("distillation: the student's head produced no logits during "
                               "its loss computation")
        if self.teacher is None:
            raise RuntimeError("distillation: the teacher is not loaded (before_train "
                               "did not run)")
        inputs = kwargs["inputs"] if "inputs" in kwargs else args[0]
        with torch.no_grad():
            target = self.teacher(inputs, mode="tensor")
        losses["loss_kd"] = self.loss_weight * kd_loss(student, target, self.temperature)
        return losses


def distillation_hook_from_cfg(cfg) -> DistillationHook | None:
    """The hook for ``secure_inference.distill`` (None when the switch is absent or off)."""
    options = distillation_options(cfg)
    return None if options is None else DistillationHook(cfg, **options)


def distillation_options(cfg) -> dict | None:
    """The checked ``secure_inference.distill`` options (None when absent or switched off)."""
    options = task_options(cfg).get("distill")
    if not options:
        return None
    options = dict(options)
    if options.pop("enabled", True) is False:
        return None
    allowed = {"teacher_checkpoint", "temperature", "loss_weight", "head"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"secure_inference.distill has unknown keys {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")
    if not options.get("teacher_checkpoint"):
        raise ValueError("secure_inference.distill needs teacher_checkpoint (the checkpoint "
                         "of the network before Block-ReLUs)")
    if float(options.get("temperature", 4.0)) <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {options['temperature']}")
    return options
