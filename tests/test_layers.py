"""The import contracts (.importlinter) hold, and they break when a base module imports upward.

`make test` runs `lint-imports` on the tree; these tests also prove that the contracts can
fail: a copy of the package in which ``secure_inference.sites`` imports
``secure_inference.spec`` again (the cycle the refactor removed) must be rejected.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / ".importlinter"

pytest.importorskip("importlinter")


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """Run lint-imports with ROOT/.importlinter on the package found first in package_parent."""
    code = ("import sys\nfrom importlinter.cli import lint_imports_command\n"
            "sys.exit(lint_imports_command())")
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    return subprocess.run([sys.executable, "-c", code, "--config", str(CONFIG), "--no-cache"],
                          cwd=package_parent, env=env, capture_output=True, text=True,
                          timeout=120)


def _package_copy(tmp_path: Path) -> Path:
    dest = tmp_path / "secure_inference"
    shutil.copytree(ROOT / "secure_inference", dest,
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    return dest


@pytest.mark.processes
def test_contracts_hold_on_the_package():
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "broken" in res.stdout and " 0 broken" in res.stdout


@pytest.mark.parametrize("module, line", [
    ("sites.py", "from . import spec  # noqa: F401\n"),                       # sites -> spec cycle
    ("spec.py", "from .mmlab import finetune  # noqa: F401\n"),               # base -> mmlab
    ("checkpoints.py", "from . import models  # noqa: F401\n"),               # base -> dispatch
    ("mmlab/finetune.py", "from .. import models  # noqa: F401\n"),           # models <-> mmlab
])


@pytest.mark.processes
def test_an_upward_import_breaks_a_contract(tmp_path, module, line):
    pkg = _package_copy(tmp_path)
    path = pkg / module
    text = path.read_text()
    marker = "from __future__ import annotations\n"
    assert marker in text
    path.write_text(text.replace(marker, marker + line, 1))
    res = _lint_imports(tmp_path)
    assert res.returncode != 0, res.stdout
    assert "BROKEN" in res.stdout
