"""Every command line answers --help (exit 0, its flags listed) without loading torch or
mmengine, through each of its paths: ``secure_inference.cli.X.main``, the research/ or
mmlab_tools/ script, and the installed console script. No timings here (machines are noisy):
"torch is not imported" is what keeps --help well under a second."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "mmengine", "mmcv", "torchvision", "mmpretrain", "mmseg")

# module -> (script path, console script, text its --help must show)
CLIS = {
    "extract_block_sizes": ("research/extract_block_sizes.py", "si-extract", "--num_samples"),
    "knapsack_patch_size_extractor": ("research/knapsack_patch_size_extractor.py", "si-knapsack",
                                      "--block_size_spec_file_name"),
    "server": ("research/secure_inference/server.py", "si-server", "--max-batch"),
    "client": ("research/secure_inference/client.py", "si-client", "--images"),
    "crypto_provider": ("research/secure_inference/crypto_provider.py", "si-crypto-provider",
                        "--config-file"),
    "make_certificates": ("research/secure_inference/make_certificates.py", "si-certificates",
                          "init-ca"),
    "calibrate": ("research/calibrate.py", "si-calibrate", "--margin"),
    "compare_methods": ("research/compare_methods.py", "si-compare", "--distill-weight"),
    "mmlab_train": ("mmlab_tools/train.py", "si-train", "--relu-spec-file"),
    "mmlab_test": ("mmlab_tools/test.py", "si-test", "--relu-spec-file"),
}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("name", sorted(CLIS))
@pytest.mark.processes
def test_main_help_loads_no_torch(name):
    proc = _python(f"""
        import json, sys
        from secure_inference.cli.{name} import main
        try:
            main(["--help"])
            code = "returned"
        except SystemExit as exc:
            code = exc.code
        print(json.dumps({{"code": code, "loaded": sorted(m for m in {HEAVY!r}
                                                          if m in sys.modules)}}),
              file=sys.stderr)
    """)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}, proc.stderr[-2000:]
    assert CLIS[name][2] in proc.stdout and "usage:" in proc.stdout


@pytest.mark.parametrize("name", sorted(CLIS))
@pytest.mark.processes
def test_script_help_loads_no_torch(name):
    script, _, text = CLIS[name]
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert text in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("name", sorted(CLIS))
@pytest.mark.processes
def test_console_script_help(name):
    _, command, text = CLIS[name]
    exe = Path(sys.executable).parent / command
    if not exe.exists():
        pytest.skip(f"{command} is not installed (pip install -e . creates it)")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and text in proc.stdout, proc.stderr[-2000:]


def test_cfg_options_parse_as_mmengine_does():
    from mmengine.config import DictAction

    from secure_inference.cli.mmlab_train import parse_args
    values = ["train_cfg.max_epochs=10", "a.b=[1,2,(3,4)]", "c=True", "d=x,y", "e=None",
              "f=0.5", "g=text"]
    reference = argparse.ArgumentParser()
    reference.add_argument("--cfg-options", nargs="+", action=DictAction)
    expected = reference.parse_args(["--cfg-options", *values]).cfg_options
    assert parse_args(["cfg.py", "--cfg-options", *values]).cfg_options == expected
    assert expected["train_cfg.max_epochs"] == 10 and expected["d"] == ["x", "y"]
    assert parse_args(["cfg.py"]).cfg_options is None


def test_no_sys_path_edits_in_scripts():
    offenders = []
    for folder in ("research", "mmlab_tools", "benchmark"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if "sys.path.insert" in text or "sys.path.append" in text:
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []



# what setuptools' default editable install does: the library is found by an import hook that
# runs after the path search, and research/ (the script's folder) comes first on sys.path
EDITABLE_DEFAULT = """
import importlib.machinery, runpy, sys
from pathlib import Path
root, script = Path(sys.argv[1]), sys.argv[2]
sys.path[:] = [str(root / "research")] + [p for p in sys.path[1:]
                                          if Path(p or ".").resolve() != root]

class EditableHook:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] != "secure_inference":
            return None
        parent = root.joinpath(*name.split(".")[:-1])
        return importlib.machinery.PathFinder.find_spec(name, [str(parent)])

sys.meta_path.append(EditableHook)
sys.argv = [script, "--help"]
runpy.run_path(str(root / "research" / script), run_name="__main__")
"""


@pytest.mark.processes
@pytest.mark.parametrize("script", ["knapsack_patch_size_extractor.py", "extract_block_sizes.py",
                                    "compare_methods.py"])
def test_research_scripts_say_what_to_do_when_their_folder_shadows_the_library(script, tmp_path):
    """With the library behind an import hook that runs after the path search (setuptools'
    default editable mode), `secure_inference` is the namespace folder
    research/secure_inference/: the script stops with the reinstall command instead of an
    AttributeError deep inside (what a user of `pip install -e .` saw)."""
    # a user's own environment: without the project venv's start-up hook (which would import
    # the real library before the script's folder could shadow it)
    proc = subprocess.run([sys.executable, "-c", EDITABLE_DEFAULT, str(ROOT), script],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, SI_NO_STARTUP_HOOK="1"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "editable_mode=compat" in proc.stderr and "Traceback" not in proc.stderr
