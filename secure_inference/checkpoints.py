"""Checkpoint files: safe (weights-only) reading and the model weights inside them.

A base module (torch only): :mod:`secure_inference.mmlab.finetune` and the model-loading
dispatch :mod:`secure_inference.models` both read checkpoints through it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    """The model, config or checkpoint could not be loaded; the message says what to fix."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file with torch's safe (weights-only) loader."""
    if not Path(path).is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe content
        raise ModelLoadError(f"cannot load checkpoint {path} safely: {_why(e)}") from None
    if not isinstance(ckpt, dict):
        raise ModelLoadError(f"checkpoint {path} holds {type(ckpt).__name__}, expected a dict")
    return ckpt


def _why(exc: Exception) -> str:
    """What a user can do about a failed safe load (torch's own advice is for programmers)."""
    text = str(exc)
    if "Unsupported global" in text:
        name = text.split("GLOBAL ", 1)[1].split()[0] if "GLOBAL " in text else "an object"
        return (f"it holds a pickled Python object ({name}), not only weights (a whole model "
                "saved with torch.save(model)?). Save the weights instead: "
                "torch.save(model.state_dict(), path), and load those; this tool never runs "
                "code from a checkpoint file")
    return (f"it is not a torch checkpoint (truncated, or another kind of file; torch says: "
            f"{type(exc).__name__}: {text[:200]}); expected a file written by torch.save or an "
            "mmengine checkpoint")


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights inside an mmengine or plain checkpoint dict."""
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt))
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict:
    """Load checkpoint weights into ``model``; returns the checkpoint's ``meta`` dict."""
    ckpt = read_checkpoint(path)
    try:
        model.load_state_dict(state_dict_of(ckpt), strict=strict)
    except RuntimeError as e:
        raise ModelLoadError(f"checkpoint {path} does not fit the model: {e}") from None
    return dict(ckpt.get("meta") or {})
