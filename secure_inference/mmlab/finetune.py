"""Finetuning MMLab models with Block-ReLUs: model preparation, checkpoint meta, runners.

The order of operations for a task config (mmpretrain or mmseg):

1. build ``cfg.model`` (the config's top-level ``data_preprocessor`` merged in, as the
   mmengine Runner does; SyncBN reverted to BN where no CUDA device is present);
2. apply the architecture conversions of ``secure_inference.convert``
   (``maxpool_to_avgpool``, ``relu6_to_relu``);
3. swap in the Block-ReLUs of the spec (state_dict keys are unchanged, so plain checkpoints
   load afterwards);
4. hand the prepared model to the mmengine Runner, which loads ``load_from`` or resumes.

Every checkpoint saved by such a Runner records the spec and conversions in
``checkpoint['meta']['secure_inference']``; loading a finetuned checkpoint without its spec,
or with another one, is an error (:class:`SpecMismatchError`).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..conversions import maxpool_to_avgpool, relu6_to_relu
from ..checkpoints import ModelLoadError, read_checkpoint, state_dict_of
from ..spec import Spec, SpecError, apply_block_spec, count_drelus, validate_spec
from ..sites import find_relu_sites
from .config_utils import conversions_of, input_shape_from_cfg, load_task_config, task_options

META_KEY = "secure_inference"

_CONVERSIONS = {"maxpool_to_avgpool": maxpool_to_avgpool, "relu6_to_relu": relu6_to_relu}


class SpecMismatchError(SpecError):
    """A checkpoint's recorded spec/conversions differ from the ones the caller asked for."""


# --------------------------------------------------------------------------- spec <-> meta

def spec_to_meta(spec: Mapping[str, np.ndarray]) -> dict[str, list[list[int]]]:
    """The spec as plain nested lists (safe for weights-only checkpoint loading)."""
    return {str(k): np.asarray(v).astype(int).tolist() for k, v in spec.items()}


def spec_from_meta(entry: Mapping[str, Any] | None) -> Spec | None:
    """The spec recorded in a checkpoint's ``meta['secure_inference']`` (None: no spec)."""
    if not entry or entry.get("relu_spec") is None:
        return None
    raw = entry["relu_spec"]
    if not isinstance(raw, Mapping):
        raise SpecError(f"checkpoint meta relu_spec must be a dict, got {type(raw).__name__}")
    return {str(k): np.asarray(v, dtype=np.int32).reshape(-1, 2) for k, v in raw.items()}


def specs_equal(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray] | None) -> bool:
    """True when both specs name the same sites with the same block sizes (None == empty)."""
    a, b = dict(a or {}), dict(b or {})
    if set(a) != set(b):
        return False
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _describe_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if not np.array_equal(a[k], b[k]))
    parts = []
    if only_a:
        parts.append(f"only in the given spec: {only_a[:3]}{'…' if len(only_a) > 3 else ''}")
    if only_b:
        parts.append(f"only in the checkpoint: {only_b[:3]}{'…' if len(only_b) > 3 else ''}")
    if differ:
        parts.append(f"different block sizes at: {differ[:3]}{'…' if len(differ) > 3 else ''}")
    return "; ".join(parts)


def make_meta_entry(spec: Mapping[str, np.ndarray] | None, conversions: Sequence[str],
                    input_shape: Sequence[int] | None,
                    drelus: int | None = None) -> dict[str, Any]:
    """What a finetuned checkpoint records about its activations (plain Python values)."""
    return {
        "relu_spec": spec_to_meta(spec) if spec else None,
        "conversions": list(conversions),
        "input_shape": [int(s) for s in input_shape] if input_shape is not None else None,
        "drelus": int(drelus) if drelus is not None else None,
    }


def check_checkpoint_meta(meta: Mapping[str, Any] | None, spec: Mapping[str, np.ndarray] | None,
                          conversions: Sequence[str], *, source: str) -> None:
    """Raise :class:`SpecMismatchError` unless the checkpoint fits ``spec`` and ``conversions``.

    A checkpoint without a recorded spec (a plain/baseline checkpoint) fits any spec: that is
    how a bReLU finetune starts. A checkpoint with a spec fits only the identical spec.
    Recorded conversions must equal the requested ones.
    """
    entry = (meta or {}).get(META_KEY) or {}
    recorded = spec_from_meta(entry)
    if recorded is not None and not spec:
        raise SpecMismatchError(
            f"{source} was finetuned with Block-ReLUs at {len(recorded)} sites, but no spec was "
            "given: pass its spec (--relu-spec-file) or let it be applied from the checkpoint "
            "(load_finetuned / test.py do so by default)")
    if recorded is not None and not specs_equal(spec, recorded):
        raise SpecMismatchError(f"the given spec differs from the one {source} was finetuned "
                                f"with ({_describe_difference(dict(spec or {}), recorded)})")
    if entry and entry.get("conversions") is not None:
        if list(entry["conversions"]) != list(conversions):
            raise SpecMismatchError(
                f"{source} was trained with conversions {list(entry['conversions'])}, but the "
                f"config asks for {list(conversions)} (secure_inference.convert)")


# --------------------------------------------------------------------------- models

def apply_conversions(model: nn.Module, conversions: Sequence[str]) -> nn.Module:
    """Apply the named architecture conversions in order (in place); returns ``model``."""
    for name in conversions:
        if name not in _CONVERSIONS:
            raise ValueError(f"unknown conversion '{name}'; known: {sorted(_CONVERSIONS)}")
        _CONVERSIONS[name](model)
    return model


def build_from_config(cfg) -> nn.Module:
    """Build ``cfg.model`` with the registry of the config's default scope."""
    scope = cfg.get("default_scope", None)
    if scope == "mmpretrain":
        import mmpretrain.models  # noqa: F401  (registers the models)
        from mmpretrain.registry import MODELS
    elif scope == "mmseg":
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
    else:
        raise ModelLoadError(f"config default_scope is {scope!r}; expected 'mmpretrain' "
                             "(classification) or 'mmseg' (segmentation)")
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
    return model


def build_task_model(cfg) -> nn.Module:
    """Build ``cfg.model`` like the mmengine Runner does, without converting or loading.

    The top-level ``data_preprocessor`` is merged into the model config and SyncBN layers
    are reverted to BN when CUDA is unavailable (SyncBN cannot run on CPU).
    """
    cfg = copy.deepcopy(cfg)
    if cfg.get("data_preprocessor") is not None and isinstance(cfg.model, Mapping):
        cfg.model.setdefault("data_preprocessor", cfg.data_preprocessor)
    model = build_from_config(cfg)
    if not torch.cuda.is_available():
        from mmengine.model import revert_sync_batchnorm
        model = revert_sync_batchnorm(model)
    return model


def prepare_model(model: nn.Module, cfg, spec: Mapping[str, np.ndarray] | None) -> nn.Module:
    """Conversions of ``cfg`` then the Block-ReLUs of ``spec`` (in place); returns ``model``."""
    apply_conversions(model, conversions_of(cfg))
    if spec:
        apply_block_spec(model, spec, input_shape_from_cfg(cfg))
    return model


def drelu_count(model: nn.Module, cfg, spec: Mapping[str, np.ndarray] | None) -> int | None:
    """DReLUs per image of the prepared ``model`` at the config's input shape (None: unknown)."""
    shape = task_options(cfg).get("input_shape")
    if shape is None:
        return None
    sites = find_relu_sites(model, shape)
    return count_drelus(validate_spec(spec or {}, sites), sites)["total"]


def load_finetuned(config: str | os.PathLike | Any, checkpoint: str | os.PathLike,
                   spec: Mapping[str, np.ndarray] | None = None, *,
                   cfg_options: dict | None = None, device: str | torch.device = "cpu",
                   strict: bool = True) -> nn.Module:
    """The model of ``config`` with its conversions, Block-ReLUs and ``checkpoint`` weights.

    The spec recorded in the checkpoint is applied when ``spec`` is None; a ``spec`` that
    differs from the recorded one, or conversions that differ from the config's, raise
    :class:`SpecMismatchError`. A plain checkpoint (no record) takes ``spec`` as given.
    Returns the model in eval mode on ``device``.
    """
    cfg = config if hasattr(config, "model") else load_task_config(config, cfg_options)
    ckpt = read_checkpoint(checkpoint)
    meta = dict(ckpt.get("meta") or {})
    recorded = spec_from_meta(meta.get(META_KEY))
    use_spec = dict(spec) if spec is not None else recorded
    check_checkpoint_meta(meta, use_spec, conversions_of(cfg), source=f"checkpoint {checkpoint}")
    model = prepare_model(build_task_model(cfg), cfg, use_spec)
    try:
        model.load_state_dict(state_dict_of(ckpt), strict=strict)
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint {checkpoint} does not fit the model of the config: "
                             f"{e}") from None
    return model.to(device).eval()


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` dict of a checkpoint file (safe loading)."""
    return dict(read_checkpoint(path).get("meta") or {})


def checkpoint_spec(path: str | os.PathLike) -> Spec | None:
    """The spec a finetuned checkpoint records (None for a plain checkpoint)."""
    return spec_from_meta(checkpoint_meta(path).get(META_KEY))
