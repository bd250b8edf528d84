"""The package declares supported ranges, not the CI pins: installing it next to a user's own
torch (the GPU machine runs torch 2.11 + CUDA) must not replace that torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> dict[str, list[Requirement]]:
    code = ("import setuptools, json, sys\n"
            "captured = {}\n"
            "setuptools.setup = lambda **kw: captured.update(kw)\n"
            "exec(open('setup.py').read())\n"
            "print(json.dumps({'core': captured['install_requires'], "
            "'extras': captured['extras_require']}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    import json
    data = json.loads(out)
    reqs = {"core": [Requirement(r) for r in data["core"]]}
    for name, items in data["extras"].items():
        reqs[name] = [Requirement(r) for r in items]
    return reqs


@pytest.mark.processes
def test_no_exact_pins_and_torch_range_admits_the_gpu_machine_and_ci_versions():
    reqs = _declared()
    for group in reqs.values():
        for r in group:
            assert not any(s.operator in ("==", "===") for s in r.specifier), r
    torch = next(r for r in reqs["core"] if r.name == "torch")
    for version in ("2.11.0", "2.12.1", "2.13.0"):
        assert torch.specifier.contains(version), version
    assert not torch.specifier.contains("1.13.1")


@pytest.mark.processes
def test_ci_pins_satisfy_the_declared_ranges():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for group in _declared().values():
        for r in group:
            version = pins.get(r.name.lower().replace("_", "-"))
            assert version is not None, f"{r.name} is not pinned in constraints.txt"
            assert r.specifier.contains(version), f"{r.name} {version} outside {r.specifier}"
