"""Loading a command-line script (research/*.py, mmlab_tools/*.py) as a module, in process."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_script(relative_path: str, name: str | None = None) -> ModuleType:
    """Import the script at ``REPO/relative_path`` under ``name`` (default: derived from the path)."""
    path = REPO / relative_path
    module_name = name or "script_" + path.with_suffix("").as_posix().replace("/", "_")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
