"""The compatibility layer: each fix is needed here and works (proved in fresh interpreters)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300,
                          env=None if env is None else dict(os.environ, **env))


@pytest.mark.processes
def test_torchvision_fails_without_the_fix_and_imports_with_it():
    from secure_inference.mmlab import compat
    if compat.torchvision_ops_loadable():
        pytest.skip("torchvision's C++ ops load here: the fix is not needed")
    bare = run_python("import torchvision", env={"SI_NO_STARTUP_HOOK": "1"})  # no venv hook
    assert bare.returncode != 0 and "torchvision::nms" in bare.stderr
    fixed = run_python("""
        import secure_inference, torchvision, torch
        m = torchvision.models.resnet18().eval()
        print(m(torch.randn(1, 3, 32, 32)).shape)
        try:
            torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)
        except RuntimeError as e:
            print("ops-error")
    """)
    assert fixed.returncode == 0, fixed.stderr
    assert "torch.Size([1, 1000])" in fixed.stdout
    assert "ops-error" in fixed.stdout      # the C++ ops still raise their usual error


@pytest.mark.processes
def test_mmseg_models_import_needs_the_mmcv_ops_standin():
    from secure_inference.mmlab import compat
    if compat.mmcv_ops_available():
        pytest.skip("compiled mmcv ops present: the stand-in is not used")
    bare = run_python("""
        import sys, secure_inference, torch  # torch loaded: the fixes are applied
        del sys.modules["mmcv.ops"]  # undo the stand-in, keep the torchvision fix
        import mmseg.models
    """)
    assert bare.returncode != 0 and "mmcv" in bare.stderr and "KeyError" not in bare.stderr
    fixed = run_python("import secure_inference, mmseg.models; print('ok')")
    assert fixed.returncode == 0, fixed.stderr


def test_point_sample_standin_matches_grid_sample_semantics():
    import mmcv.ops
    from mmcv.ops import point_sample
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    centre_of_pixel = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 4]]])  # (x, y) normalised
    assert point_sample(x, centre_of_pixel).item() == pytest.approx(x[0, 0, 1, 2].item())
    with pytest.raises(ModuleNotFoundError, match="compiled ops"):
        from mmcv.ops import DeformConv2d  # noqa: F401
    assert getattr(mmcv.ops, "__secure_inference_standin__", False)


@pytest.mark.processes
def test_mmengine_checkpoint_loads_safely_and_unsafe_globals_stay_refused(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer
    hist = HistoryBuffer()
    hist.update(1.0)
    hist.update(2.0)
    ckpt = {"meta": {"epoch": 1, "hist": hist, "arr": np.arange(3)},
            "state_dict": {"w": torch.ones(2)}}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    bare = run_python(f"import torch; torch.load({str(path)!r}, weights_only=True)",
                      env={"SI_NO_STARTUP_HOOK": "1"})   # without the venv's start-up hook
    assert bare.returncode != 0 and "HistoryBuffer" in bare.stderr
    # a fresh process that has not created a HistoryBuffer yet loads it too
    fresh = run_python(f"import secure_inference, torch; "
                       f"print(torch.load({str(path)!r}, weights_only=True)['meta']['epoch'])")
    assert fresh.returncode == 0 and fresh.stdout.strip() == "1", fresh.stderr
    loaded = torch.load(path, weights_only=True)
    assert loaded["meta"]["hist"].current() == 2.0
    torch.save({"evil": subprocess.Popen}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)unsupported global|weights_only"):
        torch.load(tmp_path / "evil.pth", weights_only=True)


class GetattrExploit:
    def __reduce__(self):
        return (getattr, (np_array_for_exploit, "tofile"))


np_array_for_exploit = None


def test_checkpoint_getattr_is_limited_to_history_buffer_statistics(tmp_path):
    import numpy as np
    global np_array_for_exploit
    np_array_for_exploit = np.zeros(2)
    torch.save({"x": GetattrExploit()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="refusing getattr"):
        torch.load(tmp_path / "evil.pth", weights_only=True)


@pytest.mark.processes
def test_package_import_is_cheap_and_torch_still_gets_the_fixes():
    """``import secure_inference`` loads no torch (the CLIs parse arguments first); the fixes
    come with torch, whichever package loads it first."""
    out = run_python("""
        import sys, secure_inference
        assert "torch" not in sys.modules and "mmengine" not in sys.modules
        import torch
        from secure_inference.mmlab import compat
        assert compat._applied["mmengine_safe_globals"], compat._applied
        assert torch.__spec__.loader is torch.__loader__
        assert secure_inference.load_spec is secure_inference.spec.load_spec
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.processes
def test_torchvision_imports_first_in_the_project_venv(tmp_path):
    """The venv's start-up hook (secure_inference.venv_hook, written by make install) lets a
    user import torchvision before secure_inference; without the hook's line the same
    interpreter fails on this machine's CUDA torchvision beside CPU torch."""
    from secure_inference import venv_hook
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running in a virtual environment")
    assert (venv_hook.site_packages() / venv_hook.PTH_NAME).read_text() == venv_hook.PTH_LINE
    out = run_python("""
        import torchvision, torchvision.models, sys
        assert "secure_inference" in sys.modules      # installed at start-up, torch after it
        print(torchvision.models.resnet18(num_classes=3).fc.out_features)
    """)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr[-2000:]
    off = run_python("import sys; print('secure_inference' in sys.modules)",
                     env={venv_hook.DISABLE_ENV: "1"})
    assert off.stdout.strip() == "False", off.stderr[-2000:]
    # the hook itself, written into a fresh folder, is one line that the site module runs
    path = venv_hook.install(tmp_path)
    assert path.read_text().startswith("import ") and path.read_text().count("\n") == 1
    assert venv_hook.remove(tmp_path) and not path.exists()
