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

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..spec import load_spec
from .config_utils import conversions_of, load_task_config, task_options
from .distill import distillation_hook_from_cfg
from .finetune import build_task_model, drelu_count, load_finetuned, prepare_model
from .hooks import ReluSpecCheckpointHook, SyncNormStatsHook

LAUNCHERS = ("none", "pytorch")


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
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def build_runner(cfg, model: torch.nn.Module, extra_hooks: list | None = None,
                 load_from: str | None = None, resume: bool = False):
    """An mmengine Runner for ``cfg`` that uses the already prepared ``model``."""
    from mmengine.runner import Runner
    hooks = list(cfg.get("custom_hooks") or []) + list(extra_hooks or [])
    return Runner(
        model=model,
        work_dir=cfg.work_dir,
        train_dataloader=cfg.get("train_dataloader"),
        val_dataloader=cfg.get("val_dataloader"),
        test_dataloader=cfg.get("test_dataloader"),
        train_cfg=cfg.get("train_cfg"),
        val_cfg=cfg.get("val_cfg"),
        test_cfg=cfg.get("test_cfg"),
        auto_scale_lr=cfg.get("auto_scale_lr"),
        optim_wrapper=cfg.get("optim_wrapper"),
        param_scheduler=cfg.get("param_scheduler"),
        val_evaluator=cfg.get("val_evaluator"),
        test_evaluator=cfg.get("test_evaluator"),
        default_hooks=cfg.get("default_hooks"),
        custom_hooks=hooks,
        load_from=load_from,
        resume=resume,
        launcher=cfg.get("launcher", "none"),
        env_cfg=cfg.get("env_cfg", dict(dist_cfg=dict(backend="nccl"))),
        log_processor=cfg.get("log_processor"),
        log_level=cfg.get("log_level", "INFO"),
        visualizer=cfg.get("visualizer"),
        default_scope=cfg.get("default_scope", "mmengine"),
        randomness=cfg.get("randomness", dict(seed=None)),
        experiment_name=cfg.get("experiment_name"),
        cfg=cfg,
    )


def prepare_training(config: str | os.PathLike, *, spec=None, work_dir: str | None = None,
                     load_from: str | None = None, resume: str | bool | None = None,
                     amp: bool = False, cfg_options: dict | None = None,
                     launcher: str = "none"):
    """Config, prepared model and Runner for a training run (nothing is trained yet).

    ``resume``: ``True``/``'auto'`` resumes from the latest checkpoint in the work dir,
    a path resumes from that checkpoint. ``load_from`` overrides the config's ``load_from``.
    """
    setup_distributed(launcher)
    cfg = load_task_config(config, cfg_options)
    configure_runtime(cfg, launcher=launcher, work_dir=work_dir, config_path=config, amp=amp)
    spec = _read_spec(spec)
    if load_from is not None:
        cfg.load_from = str(load_from)
    resume_flag = False
    if resume:
        resume_flag = True
        if resume not in (True, "auto"):
            cfg.load_from = str(resume)
    model = prepare_model(build_task_model(cfg), cfg, spec)
    hooks: list = [ReluSpecCheckpointHook(spec, conversions_of(cfg),
                                          task_options(cfg).get("input_shape"),
                                          drelu_count(model, cfg, spec))]
    if launcher != "none":
        hooks.append(SyncNormStatsHook())
    distill = distillation_hook_from_cfg(cfg)
    if distill is not None:
        hooks.append(distill)
    runner = build_runner(cfg, model, hooks, load_from=cfg.get("load_from"), resume=resume_flag)
    return cfg, model, runner


def train(config: str | os.PathLike, **kwargs):
    """Train ``config`` (see :func:`prepare_training` for the options); returns the Runner."""
    _, _, runner = prepare_training(config, **kwargs)
    runner.train()
    return runner


def prepare_test(config: str | os.PathLike, checkpoint: str | os.PathLike, *, spec=None,
                 work_dir: str | None = None, cfg_options: dict | None = None,
                 launcher: str = "none"):
    """Config, model (weights loaded, spec checked) and Runner for evaluating ``checkpoint``.

    Without ``spec`` the checkpoint's recorded spec is applied; a different spec, or
    conversions that differ from the recorded ones, raise ``SpecMismatchError``.
    """
    setup_distributed(launcher)
    cfg = load_task_config(config, cfg_options)
    configure_runtime(cfg, launcher=launcher, work_dir=work_dir, config_path=config)
    model = load_finetuned(cfg, checkpoint, _read_spec(spec))
    runner = build_runner(cfg, model, load_from=None)
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
