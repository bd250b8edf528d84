"""Package attributes loaded on first use: ``import secure_inference`` (and its ``mpc``
subpackage) stay torch-free until a name that needs torch is read."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``: each name of
    ``exports`` (submodule → names) is imported from its submodule when first read and then
    kept in ``namespace`` (the package's ``globals()``)."""
    source = {name: module for module, names in exports.items() for name in names}

    def getattr_(name: str) -> Any:
        module = source.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(source))

    return getattr_, dir_
