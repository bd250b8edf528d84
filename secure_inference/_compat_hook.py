"""When to apply :mod:`secure_inference.mmlab.compat`: as soon as torch is there, without
importing it.

``import secure_inference`` must stay cheap (a command line parses its arguments, and answers
``--help``, before torch loads), yet the fixes have to be in place before torchvision or an
MMLab package loads and before a checkpoint is read. So:

* torch already imported: the fixes are applied at once;
* otherwise an import hook applies them right after torch finishes importing, or right before
  torchvision / an MMLab package starts importing (whichever comes first), once per process.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType

# packages whose import needs the fixes in place first (torchvision's op schemas, the
# mmcv.ops stand-in, mmengine's checkpoint globals)
BEFORE = frozenset({"torchvision", "mmcv", "mmengine", "mmseg", "mmpretrain", "mmdet"})

_lock = threading.RLock()



def apply() -> dict[str, bool]:
    """Apply the fixes now (imports torch); returns which ones were applied."""
    _uninstall()
    from .mmlab import compat
    return compat.apply_all()


class _ThenApply(importlib.abc.Loader):
    """torch's own loader, followed by :func:`apply` once torch's module has executed."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self._loader   # torch sees its own loader
        self._loader.exec_module(module)
        try:
            apply()
        except Exception as exc:  # noqa: BLE001 - never break torch's own import
            # raising here would leave a half-imported torch behind; the package that needed
            # the fix fails later with its own error, this says why
            import warnings
            warnings.warn(f"secure_inference could not apply its compatibility fixes: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Applies the fixes around the first import of torch, torchvision or an MMLab package."""

    def find_spec(self, name, path=None, target=None):
        if "." in name or (name != "torch" and name not in BEFORE):
            return None
        with _lock:
            if not _uninstall():
                return None                 # another thread got here first
        if name != "torch":
            apply()                         # imports torch, then fixes, then `name` loads
            return None
        for finder in sys.meta_path:        # the spec torch would get without this hook
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenApply(spec.loader)
        return spec


_finder = _Finder()


def _uninstall() -> bool:
    """Remove the hook; True if it was installed."""
    with _lock:
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
            return True
        return False


def install() -> None:
    """Apply the fixes now if torch is loaded, else when torch (or a package above) loads."""
    if "torch" in sys.modules or any(name in sys.modules for name in BEFORE):
        apply()
        return
    with _lock:
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
