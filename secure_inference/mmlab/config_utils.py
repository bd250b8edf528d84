"""Config helpers for the finetuning tools: package-config lookup, CPU fixes, task options.

``patch_mmengine_package_lookup`` makes ``_base_ = ['mmpretrain::…']`` / ``mmseg::…`` work
with setuptools ≥ 81 (which no longer ships ``pkg_resources``, used by mmengine 0.10 to find
a package's installed configs). The replacement uses ``importlib``/``importlib.metadata``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

_patched = False

# Conversions a config may request in ``secure_inference.convert`` (applied in this order).
KNOWN_CONVERSIONS = ("maxpool_to_avgpool", "relu6_to_relu")


def _is_installed(package: str) -> bool:
    """``mmengine.utils.is_installed`` without pkg_resources."""
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec(package.replace("-", "_"))
        return spec is not None and spec.origin is not None


def _module_of(package: str) -> str:
    """The top-level import name of a distribution (``mmsegmentation`` → ``mmseg``)."""
    try:
        top = importlib.metadata.distribution(package).read_text("top_level.txt") or ""
    except importlib.metadata.PackageNotFoundError:
        top = ""
    names = [line.strip() for line in top.splitlines() if line.strip()]
    if names:
        return names[0]
    for module, dists in importlib.metadata.packages_distributions().items():
        if package in dists:
            return module
    return package.replace("-", "_")


def _get_installed_path(package: str) -> str:
    """``mmengine.utils.get_installed_path`` without pkg_resources."""
    for name in (package, _module_of(package)):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin is not None:
            return os.path.dirname(spec.origin)
    raise importlib.metadata.PackageNotFoundError(
        f"package '{package}' is not installed; cannot resolve '{package}::' config paths")


def pkg_resources_available() -> bool:
    return importlib.util.find_spec("pkg_resources") is not None


def patch_mmengine_package_lookup() -> bool:
    """Make mmengine's ``pkg::path`` config lookup work without ``pkg_resources``.

    Applied only where ``pkg_resources`` is missing; returns True if the patch was applied.
    """
    global _patched
    if _patched:
        return True
    if pkg_resources_available():
        return False
    import mmengine.config.config as config_module
    import mmengine.utils as utils_module
    import mmengine.utils.package_utils as package_utils
    for module in (config_module, utils_module, package_utils):
        if hasattr(module, "is_installed"):
            module.is_installed = _is_installed
        if hasattr(module, "get_installed_path"):
            module.get_installed_path = _get_installed_path
    _patched = True
    return True


def load_task_config(path: str | os.PathLike, cfg_options: dict | None = None):
    """Read an MMLab config (``pkg::`` bases resolved) with ``cfg_options`` merged in."""
    from mmengine.config import Config
    patch_mmengine_package_lookup()
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def task_options(cfg) -> dict[str, Any]:
    """The config's ``secure_inference`` entry as a plain dict (empty when absent)."""
    entry = cfg.get("secure_inference", None) or {}
    return entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)


def conversions_of(cfg) -> list[str]:
    """Architecture conversions requested by ``secure_inference.convert``, validated."""
    convert = task_options(cfg).get("convert", None) or []
    if isinstance(convert, str):
        convert = [convert]
    convert = list(convert)
    unknown = [c for c in convert if c not in KNOWN_CONVERSIONS]
    if unknown:
        raise ValueError(f"secure_inference.convert names unknown conversions {unknown}; "
                         f"known: {list(KNOWN_CONVERSIONS)}")
    return convert


def input_shape_from_cfg(cfg) -> tuple[int, int, int]:
    """``secure_inference.input_shape`` as (C, H, W); required to apply a block spec."""
    shape = task_options(cfg).get("input_shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError("the config needs secure_inference = dict(input_shape=[C, H, W], ...) "
                         f"to place Block-ReLUs (got input_shape={shape!r})")
    return tuple(int(s) for s in shape)  # type: ignore[return-value]
