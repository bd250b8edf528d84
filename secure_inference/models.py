"""The one model-loading path: a model from a name, a factory path or an MMLab config.

``load_model(model)`` accepts:

* a path to an MMLab config (``*.py``): built with the registry of the config's
  ``default_scope`` (``mmpretrain`` or ``mmseg``); MMLab configs of this project carry a
  ``secure_inference = dict(input_shape=[C, H, W], ...)`` entry read by :func:`input_shape_of`;
* a torchvision model name (``resnet18``, ``mobilenet_v2`` …), built without weights;
* ``package.module:factory`` — any importable callable returning an ``nn.Module``.

Nothing here downloads: pretrained weights come only from an explicit checkpoint file.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Sequence

from torch import nn

from .checkpoints import ModelLoadError, load_weights, read_checkpoint, state_dict_of
from .mmlab.config_utils import load_task_config
from .mmlab.finetune import build_from_config, build_task_model, load_finetuned, prepare_model

__all__ = ["ModelLoadError", "build_from_config", "build_named_model", "input_shape_of",
           "is_config_path", "load_config", "load_config_model", "load_model", "load_weights",
           "read_checkpoint", "state_dict_of"]


def is_config_path(model: str) -> bool:
    return str(model).endswith(".py") and Path(model).is_file()


def load_config(path: str | os.PathLike, cfg_options: dict | None = None):
    """An mmengine Config (``mmpretrain::``/``mmseg::`` bases resolved) with ``cfg_options``."""
    if not Path(path).is_file():
        raise ModelLoadError(f"config file not found: {path}")
    return load_task_config(path, cfg_options)


def split_model_arguments(name: str) -> tuple[str, dict]:
    """``NAME,key=value,...`` → (NAME, {key: value}); values are Python literals
    (``resnet18,num_classes=10``, ``pkg.mod:factory,width=4``)."""
    import ast
    base, *items = str(name).split(",")
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelLoadError(f"model '{name}': '{item}' is not key=value (write e.g. "
                                 "resnet18,num_classes=10)")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()   # a bare word: a string
    return base.strip(), kwargs


def build_named_model(name: str) -> nn.Module:
    """A torchvision model by name, or ``module:factory``, built without pretrained weights;
    ``,key=value`` suffixes are keyword arguments (``resnet18,num_classes=10``)."""
    name, kwargs = split_model_arguments(name)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ModelLoadError(f"cannot import factory '{name}': {e}") from None
        try:
            model = factory(**kwargs)
        except TypeError as e:
            raise ModelLoadError(f"factory '{name}' does not take {kwargs}: {e}") from None
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"factory '{name}' returned {type(model).__name__}, "
                                 "expected a torch.nn.Module")
        return model
    import torchvision
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as e:
        raise ModelLoadError(f"torchvision's {name} does not take {kwargs}: {e}") from None
    except ValueError:
        raise ModelLoadError(
            f"'{name}' is neither a config file, a 'module:factory' path, nor a torchvision "
            f"model name (e.g. {sorted(torchvision.models.list_models())[:5]}…)") from None


def load_config_model(cfg, checkpoint: str | os.PathLike | None = None) -> nn.Module:
    """The model of a loaded MMLab config, built as the training tools build it (eval mode).

    The top-level data preprocessor is merged in and ``secure_inference.convert`` applied;
    with ``checkpoint``, its weights are loaded and the Block-ReLU spec it records applied.
    """
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise ModelLoadError(f"checkpoint file not found: {checkpoint}")
        return load_finetuned(cfg, checkpoint)
    return prepare_model(build_task_model(cfg), cfg, None).eval()


def load_model(model: str, checkpoint: str | None = None,
               cfg_options: dict | None = None) -> nn.Module:
    """Build a model from a config path, torchvision name or factory; load ``checkpoint``.

    A config's model is built like the training tools build it (data preprocessor merged in,
    the config's ``secure_inference.convert`` conversions applied) and a finetuned
    checkpoint brings its recorded Block-ReLU spec
    (:func:`secure_inference.mmlab.finetune.load_finetuned`).
    """
    if is_config_path(model):
        return load_config_model(load_config(model, cfg_options), checkpoint)
    if str(model).endswith(".py"):
        raise ModelLoadError(f"config file not found: {model}")
    net = build_named_model(model)
    if checkpoint is not None:
        try:
            load_weights(net, checkpoint)
        except ModelLoadError as e:
            hint = _classes_hint(net, checkpoint, model)
            raise ModelLoadError(f"{e}{hint}") from None
    return net.eval()


def _classes_hint(net: nn.Module, checkpoint, model: str) -> str:
    """'; build it with ...,num_classes=K' when only the classifier's size differs."""
    sd = state_dict_of(read_checkpoint(checkpoint))
    mine = net.state_dict()
    diff = [k for k in mine if k in sd and tuple(sd[k].shape) != tuple(mine[k].shape)]
    if diff and all(sd[k].shape[0] != mine[k].shape[0] and sd[k].shape[1:] == mine[k].shape[1:]
                    for k in diff) and len({sd[k].shape[0] for k in diff}) == 1:
        k = sd[diff[0]].shape[0]
        return (f"; the checkpoint's {diff[0]} has {k} outputs: build the model with them, "
                f"--model {split_model_arguments(model)[0]},num_classes={k}")
    return ""


def input_shape_of(model: str, default: Sequence[int] | None = None,
                   cfg_options: dict | None = None, config=None) -> tuple[int, int, int]:
    """The (C, H, W) a model runs at: the config's ``secure_inference.input_shape``, else default.
    ``config``: the model's config if the caller loaded it already (not read again)."""
    if is_config_path(model):
        cfg = load_config(model, cfg_options) if config is None else config
        shape = (cfg.get("secure_inference") or {}).get("input_shape")
        if shape is not None:
            return tuple(int(s) for s in shape)
    if default is None:
        raise ModelLoadError(f"no input shape known for '{model}': pass one explicitly "
                             "(e.g. --input-shape 3 224 224) or set secure_inference.input_shape "
                             "in the config")
    return tuple(int(s) for s in default)
