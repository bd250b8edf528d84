"""The distortion data split of a task config, as model-ready input tensors.

A project config's ``secure_inference.distortion_data`` is an mmengine dataset config (the
training images through a deterministic pipeline). :func:`distortion_inputs` builds it with
the registry of the config's scope and runs the model's own data preprocessor
(normalisation, BGR→RGB, padding), so the tensors are exactly what the network sees at
test time and can go straight into ``model(x, mode='tensor')``.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from .config_utils import task_options


def dataset_registry(scope: str | None):
    """The DATASETS registry of an mmpretrain or mmseg config scope (datasets registered)."""
    if scope == "mmpretrain":
        import mmpretrain.datasets  # noqa: F401  (registers datasets and transforms)
        from mmpretrain.registry import DATASETS
    elif scope == "mmseg":
        import mmseg.datasets  # noqa: F401
        from mmseg.registry import DATASETS
    else:
        raise ValueError(f"config default_scope is {scope!r}; expected 'mmpretrain' or 'mmseg'")
    return DATASETS


def build_dataset(cfg, data_cfg):
    """Build the mmengine dataset config ``data_cfg`` with the registry of ``cfg``'s scope."""
    scope = cfg.get("default_scope", None)
    registry = dataset_registry(scope)
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        return registry.build(dict(data_cfg))


def build_distortion_dataset(cfg):
    """The dataset of ``cfg.secure_inference.distortion_data`` (built, not yet loaded)."""
    data_cfg = task_options(cfg).get("distortion_data")
    if not data_cfg:
        raise ValueError("the config has no secure_inference.distortion_data entry (an mmengine "
                         "dataset config of training images with a deterministic pipeline)")
    return build_dataset(cfg, data_cfg)


def preprocessed_batches(dataset, model: nn.Module, indices: Sequence[int], batch_size: int
                         ) -> Iterator[tuple[torch.Tensor, list]]:
    """(inputs [B, C, H, W], data samples) of ``dataset[indices]`` through the model's own
    ``data_preprocessor`` in eval mode: exactly what the network sees at test time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preprocessor = getattr(model, "data_preprocessor", None)
    if preprocessor is None:
        raise ValueError(f"{type(model).__name__} has no data_preprocessor; build the model "
                         "with secure_inference.mmlab.finetune.build_task_model")
    from mmengine.dataset import pseudo_collate
    indices = [int(i) for i in indices]
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start:start + batch_size]]
        with torch.no_grad():
            data = preprocessor(pseudo_collate(items), False)
        yield data["inputs"], data["data_samples"]


def distortion_inputs(cfg, model: nn.Module, num_samples: int | None = None,
                      batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Yield preprocessed input batches [B, C, H, W] of the distortion split, in order.

    ``num_samples`` limits how many images are used (the first ones; None: all).
    """
    dataset = build_distortion_dataset(cfg)
    total = len(dataset) if num_samples is None else min(int(num_samples), len(dataset))
    for inputs, _ in preprocessed_batches(dataset, model, range(total), batch_size):
        yield inputs
