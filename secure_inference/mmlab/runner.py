"""Training and testing MMLab task configs with Block-ReLUs on the mmengine Runner.

:func:`train` and :func:`evaluate` are what ``mmlab_tools/train.py`` / ``test.py`` call. They
build the model themselves (conversions, then the spec) and pass the prepared module to the
Runner, so the Runner trains, wraps (DDP) and checkpoints exactly that model.

Distributed runs without CUDA (``torchrun`` on CPU) need three fixes, applied here: the gloo
process group is initialised before the Runner exists (mmengine would otherwise call
``torch.cuda.set_device``), DDP is built with ``device_ids=None``, and SyncBN is reverted
to BN (see :func:`~secure_inference.mmlab.finetune.build_task_model`). Distributed training
also averages BN running statistics across processes after every iteration
(:class:`~secure_inference.mmlab.hooks.SyncNormStatsHook`), so that validation during
training and the saved checkpoint see the same network.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..spec import load_spec
from .config_utils import conversions_of, load_task_config, task_options
from .distill import DistillationHook, distillation_options
from .finetune import META_KEY, check_checkpoint_meta, checkpoint_meta, spec_from_meta
from .hooks import ReluSpecCheckpointHook, SecureInferenceHook, SyncNormStatsHook
from .launchers import LAUNCHERS

__all__ = ["DistillationHook", "ReluSpecCheckpointHook", "SecureInferenceHook",
           "SyncNormStatsHook", "build_runner", "configure_runtime", "evaluate",
           "finetune_config", "prepare_test", "prepare_training", "setup_distributed",
           "teardown_distributed", "train"]



def setup_distributed(launcher: str) -> None:
    """Initialise the process group for ``launcher`` where mmengine cannot (CPU: gloo)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got '{launcher}'")
    if launcher == "none" or torch.cuda.is_available():
        return  # mmengine's init_dist handles CUDA (nccl) itself
    import torch.distributed as dist
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise RuntimeError(f"--launcher pytorch needs the torchrun environment; missing "
                           f"{missing}. Start with mmlab_tools/dist_train.sh or torchrun.")
    dist.init_process_group(backend="gloo")


def teardown_distributed() -> None:
    """Wait for all processes, then destroy the process group (after a successful run).

    Leaving a gloo group alive until interpreter exit can abort the process
    ("terminate called without an active exception") after the work is done.
    """
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        # the mmengine Runner lives in reference cycles (hooks, its model wrapper): collect it
        # now, so DDP's reducer and its pending gloo work are freed while the group and the
        # interpreter are alive, not during interpreter shutdown (where freeing a tensor held
        # by a gloo worker thread aborts the process after the work is done)
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def configure_runtime(cfg, *, launcher: str = "none", work_dir: str | None = None,
                      config_path: str | os.PathLike | None = None, amp: bool = False) -> None:
    """Set launcher, work_dir, CPU-DDP and AMP options on ``cfg`` (in place)."""
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    elif cfg.get("work_dir") is None:
        stem = Path(config_path).stem if config_path else "secure_inference"
        cfg.work_dir = os.path.join("work_dirs", stem)
    if launcher != "none" and not torch.cuda.is_available():
        wrapper = dict(cfg.get("model_wrapper_cfg") or {})
        wrapper.setdefault("type", "MMDistributedDataParallel")
        wrapper["device_ids"] = None
        cfg.model_wrapper_cfg = wrapper
        env_cfg = dict(cfg.get("env_cfg") or {})
        env_cfg["dist_cfg"] = dict(backend="gloo")
        cfg.env_cfg = env_cfg
    if amp:
        if not torch.cuda.is_available():
            raise RuntimeError("--amp needs a CUDA device (mmengine's AmpOptimWrapper does not "
                               "run on CPU); drop --amp on this machine")
        optim = cfg.optim_wrapper
        if optim.get("type", "OptimWrapper") == "AmpOptimWrapper":
            return
        optim.type = "AmpOptimWrapper"
        optim.setdefault("loss_scale", "dynamic")


def _read_spec(spec: str | os.PathLike | Mapping[str, Any] | None):
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {k: np.asarray(v, dtype=np.int32) for k, v in spec.items()}
    return load_spec(spec)


def _sync_bn_to_bn(node: Any) -> Any:
    """Every ``SyncBN`` norm config in ``node`` as ``BN`` (same parameters and state keys)."""
    if isinstance(node, Mapping):
        out = {k: _sync_bn_to_bn(v) for k, v in node.items()}
        if out.get("type") == "SyncBN":
            out["type"] = "BN"
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_sync_bn_to_bn(v) for v in node)
    return node


RUNNER_MODULES = ["secure_inference.mmlab.runner"]
"""Modules that register this package's hooks (``custom_imports`` of a prepared config)."""


def finetune_config(cfg, *, spec=None, launcher: str = "none", load_from: str | None = None,
                    resume: bool = False, spec_from_checkpoint: bool = False,
                    strict_load: bool = False) -> Any:
    """Complete ``cfg`` (in place) so that stock ``Runner.from_cfg(cfg)`` runs the finetune.

    The spec goes into ``secure_inference.spec_file`` (a path) or ``secure_inference.spec``
    (a dict, as plain lists); the registered hooks that apply and record it
    (:class:`~secure_inference.mmlab.hooks.SecureInferenceHook`), average BN statistics
    across processes and distil (``secure_inference.distill``) are appended to
    ``custom_hooks``; ``custom_imports`` names the modules that register them, so the config
    the Runner dumps into its work dir reproduces the run. On CPU under a launcher, SyncBN
    norm configs become BN (SyncBN cannot run on CPU). Returns ``cfg``.
    """
    options = task_options(cfg)
    if spec is not None:
        if isinstance(spec, Mapping):
            options["spec"] = {str(k): np.asarray(v).astype(int).tolist()
                               for k, v in spec.items()}
            options.pop("spec_file", None)
        else:
            options["spec_file"] = str(Path(spec).resolve())
            options.pop("spec", None)
    cfg.secure_inference = options
    if load_from is not None:
        cfg.load_from = str(load_from)
    cfg.resume = bool(resume)
    if launcher != "none" and not torch.cuda.is_available():
        cfg.model = _sync_bn_to_bn(cfg.model)
    hooks = list(cfg.get("custom_hooks") or [])
    hooks.append(dict(type="SecureInferenceHook", spec_from_checkpoint=spec_from_checkpoint,
                      strict_load=strict_load))
    if launcher != "none":
        hooks.append(dict(type="SyncNormStatsHook"))
    distill = distillation_options(cfg)
    if distill is not None:
        hooks.append(dict(type="DistillationHook", **distill))
    cfg.custom_hooks = hooks
    imports = dict(cfg.get("custom_imports") or {})
    names = list(imports.get("imports") or [])
    names += [m for m in RUNNER_MODULES if m not in names]
    imports["imports"] = names
    imports.setdefault("allow_failed_imports", False)
    cfg.custom_imports = imports
    return cfg


def build_runner(cfg, model: torch.nn.Module | None = None, extra_hooks: list | None = None,
                 load_from: str | None = None, resume: bool = False):
    """An mmengine Runner for ``cfg``: ``Runner.from_cfg`` unless a prepared ``model`` is given.

    With ``model`` (and Python hook objects in ``extra_hooks``) the Runner is built from the
    same config entries, with that module in place of ``cfg.model``.
    """
    from mmengine.runner import Runner
    if model is None and not extra_hooks:
        if load_from is not None:
            cfg.load_from = str(load_from)
        if resume:
            cfg.resume = True
        return Runner.from_cfg(cfg)
    from mmengine.config import Config
    built = copy.deepcopy(cfg) if isinstance(cfg, Config) else Config(dict(cfg))
    built.custom_hooks = list(cfg.get("custom_hooks") or [])
    built.load_from, built.resume = load_from, bool(resume)
    runner = Runner.from_cfg(built) if model is None else _runner_with_model(built, model)
    for hook in extra_hooks or []:
        runner.register_hook(hook)
    return runner


def _runner_with_model(cfg, model: torch.nn.Module):
    """``Runner.from_cfg(cfg)`` with an nn.Module in place of ``cfg.model``."""
    from mmengine.runner import Runner

    class _PreparedModelRunner(Runner):
        def build_model(self, _cfg_model):  # the Runner builds this module instead
            return model

    return _PreparedModelRunner.from_cfg(cfg)


def is_model_wrapper(model) -> bool:
    """True for mmengine's model wrappers (DDP and friends)."""
    from mmengine.model import is_model_wrapper as _is_wrapper
    return _is_wrapper(model)


def prepare_training(config: str | os.PathLike, *, spec=None, work_dir: str | None = None,
                     load_from: str | None = None, resume: str | bool | None = None,
                     amp: bool = False, cfg_options: dict | None = None,
                     launcher: str = "none"):
    """Config, model and Runner for a training run (nothing is trained yet).

    ``resume``: ``True``/``'auto'`` resumes from the latest checkpoint in the work dir,
    a path resumes from that checkpoint. ``load_from`` overrides the config's ``load_from``.
    The Runner is stock ``Runner.from_cfg`` on the completed config (:func:`finetune_config`);
    its model gets its conversions and Block-ReLUs when the run starts (``before_run``).
    """
    setup_distributed(launcher)
    cfg = load_task_config(config, cfg_options)
    configure_runtime(cfg, launcher=launcher, work_dir=work_dir, config_path=config, amp=amp)
    _read_spec(spec)  # a missing or untrusted spec file fails here, before the Runner exists
    resume_flag = False
    if resume:
        resume_flag = True
        if resume not in (True, "auto"):
            cfg.load_from = str(resume)
    finetune_config(cfg, spec=spec, launcher=launcher, load_from=load_from,
                    resume=resume_flag)
    runner = build_runner(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return cfg, model, runner


def train(config: str | os.PathLike, **kwargs):
    """Train ``config`` (see :func:`prepare_training` for the options); returns the Runner."""
    _, _, runner = prepare_training(config, **kwargs)
    runner.train()
    return runner


def prepare_test(config: str | os.PathLike, checkpoint: str | os.PathLike, *, spec=None,
                 work_dir: str | None = None, cfg_options: dict | None = None,
                 launcher: str = "none"):
    """Config, model and Runner for evaluating ``checkpoint``.

    Without ``spec`` the checkpoint's recorded spec is applied; a different spec, or
    conversions that differ from the recorded ones, raise ``SpecMismatchError`` (here,
    before the Runner is built). The checkpoint loads strictly (every weight must fit).
    """
    setup_distributed(launcher)
    cfg = load_task_config(config, cfg_options)
    configure_runtime(cfg, launcher=launcher, work_dir=work_dir, config_path=config)
    given = _read_spec(spec)
    meta = checkpoint_meta(checkpoint)
    recorded = spec_from_meta(meta.get(META_KEY))
    check_checkpoint_meta(meta, given if given is not None else recorded, conversions_of(cfg),
                          source=f"checkpoint {checkpoint}")
    finetune_config(cfg, spec=spec, launcher=launcher, load_from=str(checkpoint),
                    spec_from_checkpoint=spec is None, strict_load=True)
    runner = build_runner(cfg)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return cfg, model, runner


def evaluate(config: str | os.PathLike, checkpoint: str | os.PathLike, *,
             out: str | os.PathLike | None = None, **kwargs) -> dict[str, float]:
    """Evaluate ``checkpoint`` on the config's test set; returns (and optionally saves) metrics."""
    _, _, runner = prepare_test(config, checkpoint, **kwargs)
    metrics = runner.test()
    clean = {k: float(v) for k, v in metrics.items() if np.isscalar(v) or
             (torch.is_tensor(v) and v.numel() == 1)}
    if out is not None and _is_main_process():
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(clean, indent=1))
    return clean


def _is_main_process() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
