"""Stock mmengine: ``Runner.from_cfg`` on a config that names the spec in
``secure_inference=dict(spec_file=...)`` trains with the Block-ReLUs in place."""
from __future__ import annotations

import numpy as np

import secure_inference  # noqa: F401  (compat fixes before mmengine/torchvision)
from secure_inference import extract_block_spec, find_relu_sites, save_spec
from secure_inference.brelu import BlockReLU
from secure_inference.mmlab.config_utils import load_task_config
from secure_inference.mmlab.finetune import build_task_model, checkpoint_spec

from helpers import tiny_tasks as tt


def _every_other_site_spec(config) -> dict[str, np.ndarray]:
    cfg = load_task_config(config)
    sites = find_relu_sites(build_task_model(cfg), cfg.secure_inference.input_shape)
    sizes = [[2, 2], [1, 1], [0, 1], [3, 2]]
    return {s.name: np.array([sizes[(c + j) % 4] for c in range(s.channels)], np.int32)
            for j, s in enumerate(sites[::2])}


def test_stock_runner_from_cfg_applies_the_spec_and_trains(tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner

    data = tt.make_cls_data(tmp_path / "data")
    base = tt.cls_config(tmp_path / "tiny.py", data)
    spec = _every_other_site_spec(base)
    save_spec(spec, tmp_path / "spec.pickle")
    (tmp_path / "finetune.py").write_text(f"""
_base_ = ['./tiny.py']
custom_imports = dict(imports=['secure_inference.mmlab.runner'], allow_failed_imports=False)
custom_hooks = [dict(type='SecureInferenceHook')]
secure_inference = dict(spec_file={str(tmp_path / 'spec.pickle')!r})
work_dir = {str(tmp_path / 'work')!r}
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=1, val_interval=100)
param_scheduler = []
default_hooks = dict(checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=1,
                                     save_best=None))
""")
    cfg = Config.fromfile(str(tmp_path / "finetune.py"))   # stock loading, custom_imports run
    runner = Runner.from_cfg(cfg)
    runner.train()

    shape = tuple(cfg.secure_inference.input_shape)
    applied = extract_block_spec(runner.model, shape)
    assert set(applied) == set(spec)
    assert all(np.array_equal(applied[k], spec[k]) for k in spec)
    assert any(isinstance(m, BlockReLU) for m in runner.model.modules())
    assert runner.iter == 1
    assert np.isfinite(runner.message_hub.get_scalar("train/loss").current())
    recorded = checkpoint_spec(tmp_path / "work" / "iter_1.pth")
    assert set(recorded) == set(spec)
    assert all(np.array_equal(recorded[k], spec[k]) for k in spec)
