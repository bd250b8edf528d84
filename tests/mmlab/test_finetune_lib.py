"""Library-level tests of the finetuning stage: spec meta, save/load, distillation, configs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import secure_inference  # noqa: F401  (compat fixes)
from secure_inference import extract_block_spec
from secure_inference.brelu import BlockReLU
from secure_inference.mmlab.config_utils import (conversions_of, load_task_config,
                                                 patch_mmengine_package_lookup)
from secure_inference.mmlab.distill import DistillationHook, distillation_hook_from_cfg, kd_loss
from secure_inference.mmlab.finetune import (SpecMismatchError, build_task_model,
                                             check_checkpoint_meta, load_finetuned,
                                             make_meta_entry, prepare_model, spec_from_meta,
                                             spec_to_meta, specs_equal)
from secure_inference.mmlab.runner import configure_runtime
from secure_inference.sites import find_relu_sites
from secure_inference.spec import MultiSiteActivation

from helpers import tiny_tasks as tt
from helpers.scripts import load_script

CONFIGS = tt.REPO / "configs"


@pytest.fixture(scope="module")
def cls_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls_lib")
    return load_task_config(tt.cls_config(root / "tiny_cls.py", root / "data"))


def mixed_spec(model, shape) -> dict[str, np.ndarray]:
    sizes = [[2, 2], [0, 1], [1, 1], [3, 1], [8, 8]]
    sites = find_relu_sites(model, shape)
    return {s.name: np.array([sizes[(c + i) % len(sizes)] for c in range(s.channels)],
                             dtype=np.int32)
            for i, s in enumerate(sites) if i % 3 != 1}


# --------------------------------------------------------------------------- spec meta

def test_spec_meta_round_trip_is_plain_lists():
    spec = {"a": np.array([[1, 1], [0, 1]], dtype=np.int32), "b#1": np.array([[2, 3]])}
    meta = spec_to_meta(spec)
    assert meta == {"a": [[1, 1], [0, 1]], "b#1": [[2, 3]]}
    assert all(type(x) is int for rows in meta.values() for row in rows for x in row)
    back = spec_from_meta({"relu_spec": meta})
    assert specs_equal(back, spec) and back["a"].dtype == np.int32
    assert spec_from_meta({"relu_spec": None}) is None and spec_from_meta(None) is None


def test_specs_equal_edge_cases():
    a = {"x": np.array([[1, 1]])}
    assert specs_equal(None, {}) and not specs_equal(a, None)
    assert not specs_equal(a, {"x": np.array([[1, 2]])})
    assert not specs_equal(a, {"y": np.array([[1, 1]])})
    assert specs_equal(a, {"x": [[1, 1]]})


def test_check_checkpoint_meta_rules():
    spec = {"s": np.array([[2, 2]])}
    recorded = {"secure_inference": make_meta_entry(spec, ["relu6_to_relu"], [3, 8, 8], 4)}
    plain: dict = {}
    check_checkpoint_meta(plain, spec, [], source="plain")            # baseline + spec: fine
    check_checkpoint_meta(plain, None, [], source="plain")
    check_checkpoint_meta(recorded, spec, ["relu6_to_relu"], source="ft")
    with pytest.raises(SpecMismatchError, match="no spec was given"):
        check_checkpoint_meta(recorded, None, ["relu6_to_relu"], source="ft")
    with pytest.raises(SpecMismatchError, match="different block sizes at"):
        check_checkpoint_meta(recorded, {"s": np.array([[1, 1]])}, ["relu6_to_relu"],
                              source="ft")
    with pytest.raises(SpecMismatchError, match="only in the given spec"):
        check_checkpoint_meta(recorded, dict(spec, t=np.array([[1, 1]])), ["relu6_to_relu"],
                              source="ft")
    with pytest.raises(SpecMismatchError, match="conversions"):
        check_checkpoint_meta(recorded, spec, [], source="ft")
    no_spec = {"secure_inference": make_meta_entry(None, ["maxpool_to_avgpool"], None)}
    with pytest.raises(SpecMismatchError, match="conversions"):
        check_checkpoint_meta(no_spec, None, [], source="ft")


# --------------------------------------------------------------------------- save / load

def test_spec_model_same_outputs_after_save_and_load(cls_cfg, tmp_path):
    model = prepare_model(build_task_model(cls_cfg), cls_cfg, None)
    shape = cls_cfg.secure_inference.input_shape
    spec = mixed_spec(model, shape)
    model.init_weights()
    from secure_inference import apply_block_spec
    apply_block_spec(model, spec, shape)
    assert any(isinstance(m, MultiSiteActivation) for m in model.modules())
    with torch.no_grad():                       # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected = model(x, mode="tensor")
    path = tmp_path / "ft.pth"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"secure_inference": make_meta_entry(spec, [], shape, 1)}}, path)

    loaded = load_finetuned(cls_cfg, path)          # spec applied from the checkpoint
    assert specs_equal(extract_block_spec(loaded, shape), spec)
    with torch.no_grad():
        assert torch.equal(loaded(x, mode="tensor"), expected)
        again = load_finetuned(cls_cfg, path, spec=spec)
        assert torch.equal(again(x, mode="tensor"), expected)
        # the spec matters: the same weights without Block-ReLUs give other logits
        plain = build_task_model(cls_cfg)
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(plain.eval()(x, mode="tensor"), expected)
    other = {k: np.ones_like(v) for k, v in spec.items()}
    with pytest.raises(SpecMismatchError):
        load_finetuned(cls_cfg, path, spec=other)


def test_plain_checkpoint_loads_into_spec_model(cls_cfg, tmp_path):
    """Block-ReLUs keep the state_dict keys: a baseline checkpoint loads strictly."""
    base = build_task_model(cls_cfg).eval()
    path = tmp_path / "base.pth"
    torch.save({"state_dict": base.state_dict(), "meta": {}}, path)
    shape = cls_cfg.secure_inference.input_shape
    spec = mixed_spec(base, shape)
    model = load_finetuned(cls_cfg, path, spec=spec)
    assert sum(isinstance(m, BlockReLU) for m in model.modules()) >= len(spec) // 2
    assert set(model.state_dict()) == set(base.state_dict())


# --------------------------------------------------------------------------- distillation

def test_kd_loss_matches_reference():
    rng = np.random.default_rng()
    s = rng.normal(size=(3, 5, 2, 2))
    t = rng.normal(size=(3, 5, 2, 2))
    for temp in (1.0, 4.0):
        ps = np.exp(s / temp) / np.exp(s / temp).sum(axis=1, keepdims=True)
        pt = np.exp(t / temp) / np.exp(t / temp).sum(axis=1, keepdims=True)
        ref = (pt * (np.log(pt) - np.log(ps))).sum(axis=1).mean() * temp ** 2
        got = kd_loss(torch.tensor(s), torch.tensor(t), temp)
        assert got.item() == pytest.approx(ref, rel=1e-5)
    same = torch.randn(4, 7)
    assert kd_loss(same, same.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(same, same, 0.0)


def test_distillation_hook_adds_kd_loss(cls_cfg):
    student = build_task_model(cls_cfg).train()
    teacher = build_task_model(cls_cfg).eval()
    hook = DistillationHook(cls_cfg, teacher_checkpoint="unused.pth", temperature=3.0,
                            loss_weight=0.5)
    hook.teacher = teacher
    hook.attach(student)
    x = torch.randn(4, 3, tt.CLS_SIZE, tt.CLS_SIZE)
    from mmpretrain.structures import DataSample
    samples = [DataSample().set_gt_label(i % 3) for i in range(4)]
    losses = student(x, samples, mode="loss")
    assert set(losses) == {"loss", "loss_kd"}
    with torch.no_grad():
        s_logits = student(x, mode="tensor")          # train-mode BN: same batch, same output
        t_logits = teacher(x, mode="tensor")
    assert losses["loss_kd"].item() == pytest.approx(
        0.5 * kd_loss(s_logits, t_logits, 3.0).item(), rel=1e-5)
    losses["loss_kd"].backward()
    assert student.head.fc.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_switch_in_config(cls_cfg):
    assert distillation_hook_from_cfg(cls_cfg) is None            # off by default
    cfg = cls_cfg.copy()
    cfg.merge_from_dict({"secure_inference.distill.enabled": True,
                         "secure_inference.distill.teacher_checkpoint": "t.pth"})
    hook = distillation_hook_from_cfg(cfg)
    assert isinstance(hook, DistillationHook) and hook.temperature == 4.0
    cfg.merge_from_dict({"secure_inference.distill.teacher_checkpoint": None})
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        distillation_hook_from_cfg(cfg)


def test_distilled_training_run(cls_cfg, tmp_path):
    """One in-process epoch with distillation from a saved baseline checkpoint."""
    from secure_inference.mmlab.runner import prepare_training
    root = tmp_path
    data = tt.make_cls_data(root / "data")
    config = tt.cls_config(root / "tiny.py", data)
    cfg = load_task_config(config)
    teacher = build_task_model(cfg)
    torch.save({"state_dict": teacher.state_dict(), "meta": {}}, root / "teacher.pth")
    _, model, runner = prepare_training(
        config, work_dir=str(root / "work"),
        cfg_options={"secure_inference.distill.enabled": True,
                     "secure_inference.distill.teacher_checkpoint": str(root / "teacher.pth"),
                     "default_hooks.checkpoint.interval": 100})
    runner.train()
    kd = runner.message_hub.get_scalar("train/loss_kd").data[0]
    assert len(kd) == 3 and all(np.isfinite(kd))


# --------------------------------------------------------------------------- configs, runtime

EXPECTED = {
    "classification/resnet18_cifar100.py": ([3, 32, 32], [], "CIFAR100"),
    "classification/resnet18_cifar100_brelu_finetune.py": ([3, 32, 32], [], "CIFAR100"),
    "classification/resnet50_in1k_avgpool_finetune.py": ([3, 224, 224], ["maxpool_to_avgpool"],
                                                         "ImageNet"),
    "classification/resnet50_in1k_brelu_finetune.py": ([3, 224, 224], ["maxpool_to_avgpool"],
                                                       "ImageNet"),
    "segmentation/deeplabv3_mnv2_ade20k_brelu_finetune.py": ([3, 512, 512], ["relu6_to_relu"],
                                                              "ADE20KDataset"),
    "segmentation/deeplabv3_r50_voc12aug_brelu_finetune.py": ([3, 512, 512],
                                                               ["maxpool_to_avgpool"],
                                                               "PascalVOCDataset"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_configs(name, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/datasets")
    cfg = load_task_config(CONFIGS / name)
    shape, convert, dataset = EXPECTED[name]
    si = cfg.secure_inference
    assert list(si.input_shape) == shape and conversions_of(cfg) == convert
    assert si.distortion_data.type == dataset
    assert str(si.distortion_data.data_root).startswith("/datasets/")
    # the distortion split is the training images through a deterministic pipeline
    steps = [t["type"] for t in si.distortion_data.pipeline]
    assert not any(s.startswith("Random") or s == "PhotoMetricDistortion" for s in steps)
    assert cfg.model.get("pretrained") is None          # nothing downloads
    sched = cfg.param_scheduler if isinstance(cfg.param_scheduler, list) else [cfg.param_scheduler]
    lr = cfg.optim_wrapper.optimizer.lr
    if "cifar100_brelu" in name:
        assert lr == 5e-3 and cfg.train_cfg.max_epochs == 120
        assert sched[0].type == "LinearLR" and sched[0].end == 5
        assert list(sched[1].milestones) == [30, 60, 90] and sched[1].gamma == 0.25
    elif "in1k" in name:
        assert lr == 5e-3 and cfg.train_cfg.max_epochs == 25
        assert list(sched[0].milestones) == [12, 18, 22] and sched[0].gamma == 0.25
    elif "ade20k" in name:
        assert lr == 5e-4 and cfg.train_cfg.max_iters == 40000
        assert sched[0].type == "LinearLR" and sched[0].end == 1000
        assert sched[1].type == "PolyLR" and sched[1].end == 40000
    elif "voc12aug" in name:
        assert lr == 5e-4 and cfg.train_cfg.max_iters == 20000
        assert sched[0].type == "PolyLR" and sched[0].end == 20000


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reference_configs_build_offline(name):
    cfg = load_task_config(CONFIGS / name)
    model = prepare_model(build_task_model(cfg), cfg, None)
    kinds = {s.kind for s in find_relu_sites(model, [3, 64, 64])}
    assert kinds == {"ReLU"}                    # no ReLU6 left; no functional activations
    if "maxpool_to_avgpool" in conversions_of(cfg):
        assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_package_config_lookup_without_pkg_resources():
    """The pkg_resources-free replacements (used when setuptools >= 81 lacks it)."""
    from secure_inference.mmlab import config_utils
    patch_mmengine_package_lookup()
    for is_installed, get_installed_path in (
            (config_utils._is_installed, config_utils._get_installed_path),
            (__import__("mmengine.config.config", fromlist=["x"]).is_installed,
             __import__("mmengine.config.config", fromlist=["x"]).get_installed_path)):
        assert is_installed("mmsegmentation") and is_installed("mmpretrain")
        assert Path(get_installed_path("mmsegmentation")).name == "mmseg"
        assert (Path(get_installed_path("mmpretrain")) / ".mim" / "configs").is_dir()
        assert not is_installed("surely-not-an-installed-package")
    assert config_utils._module_of("mmsegmentation") == "mmseg"


def test_configure_runtime_cpu_ddp_and_amp(cls_cfg):
    cfg = cls_cfg.copy()
    configure_runtime(cfg, launcher="pytorch", work_dir="w")
    if not torch.cuda.is_available():
        assert cfg.model_wrapper_cfg["device_ids"] is None
        assert cfg.model_wrapper_cfg["type"] == "MMDistributedDataParallel"
        assert cfg.env_cfg["dist_cfg"]["backend"] == "gloo"
        with pytest.raises(RuntimeError, match="CUDA"):
            configure_runtime(cfg.copy(), amp=True)
    else:
        configure_runtime(cfg, amp=True)
        assert cfg.optim_wrapper.type == "AmpOptimWrapper"


def test_unknown_conversion_is_rejected(cls_cfg):
    cfg = cls_cfg.copy()
    cfg.merge_from_dict({"secure_inference.convert": ["gelu_to_relu"]})
    with pytest.raises(ValueError, match="unknown conversions"):
        conversions_of(cfg)


def test_cli_help(capsys):
    for tool in ("train", "test"):
        module = load_script(f"mmlab_tools/{tool}.py", f"tool_{tool}")
        with pytest.raises(SystemExit) as e:
            module.parse_args(["--help"])
        assert e.value.code == 0
        assert "--relu-spec-file" in capsys.readouterr().out


# --------------------------------------------------------------------------- distortion data

def test_distortion_inputs_classification(cls_cfg, tmp_path):
    from PIL import Image
    from secure_inference.mmlab.datasets import build_distortion_dataset, distortion_inputs
    data = tt.make_cls_data(tmp_path / "data")
    cfg = load_task_config(tt.cls_config(tmp_path / "tiny.py", data))
    model = build_task_model(cfg).eval()
    batches = list(distortion_inputs(cfg, model, num_samples=5, batch_size=2))
    n = tt.CLS_SIZE
    assert [tuple(b.shape) for b in batches] == [(2, 3, n, n), (2, 3, n, n), (1, 3, n, n)]
    again = torch.cat(list(distortion_inputs(cfg, model, num_samples=5, batch_size=3)))
    assert torch.equal(torch.cat(batches), again)                       # deterministic
    # independent reference: the first training image, BGR as loaded, normalised by the config
    first = build_distortion_dataset(cfg).get_data_info(0)["img_path"]
    bgr = np.asarray(Image.open(first).convert("RGB"), dtype=np.float32)[..., ::-1]
    mean = np.array(cfg.data_preprocessor["mean"], dtype=np.float32)
    std = np.array(cfg.data_preprocessor["std"], dtype=np.float32)
    ref = torch.from_numpy(((bgr - mean) / std).transpose(2, 0, 1).copy())
    assert torch.allclose(batches[0][0], ref, atol=1e-5)
    assert "train" in Path(first).parts


def test_distortion_inputs_segmentation_match_input_shape(tmp_path):
    from secure_inference.mmlab.datasets import distortion_inputs
    data = tt.make_seg_data(tmp_path / "data", count=3, size=80)  # larger: resized + cropped
    cfg = load_task_config(tt.seg_config(tmp_path / "tiny_seg.py", data))
    model = build_task_model(cfg).eval()
    batches = list(distortion_inputs(cfg, model, batch_size=2))
    shape = tuple(cfg.secure_inference.input_shape)
    assert [tuple(b.shape[1:]) for b in batches] == [shape, shape]
    assert sum(b.shape[0] for b in batches) == 3                        # the training images
    with torch.no_grad():
        assert model(batches[0], mode="tensor").shape[1] == 150
