"""Block specs: which block size every channel of every site uses, and how they reach a model.

A spec is a plain dict ``{site_name: np.ndarray int32 [C, 2]}`` (the pickle format the
original research code used). Sites absent from the dict keep their ordinary activation.
Pickles are read with a restricted unpickler: only numpy arrays/dtypes, dicts, lists,
strings and numbers are rebuilt; any other global is refused before it can run.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .brelu import BlockReLU, as_block_sizes, block_costs
from .sites import ReluSite, find_relu_sites, sites_by_name

Spec = dict[str, np.ndarray]


class SpecError(ValueError):
    """A block spec that does not fit the model, or a spec file that cannot be trusted."""


# --------------------------------------------------------------------------- validation

def validate_spec(spec: Mapping[str, object], sites: Sequence[ReluSite]) -> Spec:
    """Check every entry against the model's sites; returns the spec as int32 arrays."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"a block spec must be a dict of site name -> [C, 2] array, "
                        f"got {type(spec).__name__}")
    by_name = sites_by_name(sites)
    out: Spec = {}
    for name, value in spec.items():
        if not isinstance(name, str):
            raise SpecError(f"spec keys must be site names (str), got {name!r}")
        if name not in by_name:
            close = [n for n in by_name if n.split("#")[0] == name.split("#")[0]]
            hint = f" (sites of that module: {close})" if close else ""
            raise SpecError(f"spec names site '{name}', which the model does not have{hint}; "
                            f"known sites: {len(by_name)}, e.g. {list(by_name)[:3]}")
        site = by_name[name]
        try:
            out[name] = as_block_sizes(value, channels=site.channels)
        except ValueError as e:
            raise SpecError(f"site '{name}' ({site.channels} channels): {e}") from None
    return out


def count_drelus(spec: Mapping[str, np.ndarray], sites: Sequence[ReluSite]) -> dict[str, int]:
    """DReLUs per image for each site under ``spec`` (absent sites: all ReLU), plus 'total'."""
    checked = validate_spec(spec, sites)
    counts: dict[str, int] = {}
    for site in sites:
        if site.name in checked:
            counts[site.name] = int(block_costs(checked[site.name], site.height, site.width).sum())
        else:
            counts[site.name] = site.num_relus
    counts["total"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------- applying

class MultiSiteActivation(nn.Module):
    """Stands in for an activation module called at several sites of one forward.

    The k-th call after the owning (parent) module starts its forward goes to ``sites[k]``;
    the parent's forward pre-hook resets the counter, and the counter wraps around, so an
    interrupted forward cannot shift later ones.
    """

    def __init__(self, sites: Sequence[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self._next_call = 0

    def reset_calls(self) -> None:
        self._next_call = 0

    def skip_call(self) -> None:
        """Advance to the next site without computing (a caller that substitutes this call)."""
        self._next_call = (self._next_call + 1) % len(self.sites)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._next_call
        self._next_call = (k + 1) % len(self.sites)
        return self.sites[k](x)


class _ResetCalls:
    """Forward pre-hook of a parent module resetting its MultiSiteActivation child (picklable)."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, args) -> None:
        child = getattr(module, self.attr, None)
        if isinstance(child, MultiSiteActivation):
            child.reset_calls()


def _split_path(path: str) -> tuple[str, str]:
    parent, _, attr = path.rpartition(".")
    return parent, attr


def apply_block_spec(model: nn.Module, spec: Mapping[str, object],
                     input_shape: Sequence[int]) -> nn.Module:
    """Replace exactly the sites named in ``spec`` by Block-ReLUs (in place); returns ``model``.

    A module called at several sites becomes a :class:`MultiSiteActivation` whose unnamed calls
    keep the original activation. ReLU6 sites are refused (convert them with
    :func:`secure_inference.conversions.relu6_to_relu` first: Block-ReLU has no upper clip).
    """
    sites = find_relu_sites(model, input_shape)
    checked = validate_spec(spec, sites)
    by_module: dict[str, list[ReluSite]] = {}
    for site in sites:
        by_module.setdefault(site.module_path, []).append(site)
    for name in checked:
        site = sites_by_name(sites)[name]
        if site.functional:
            raise SpecError(f"site '{name}' is a functional {site.kind} call inside "
                            f"'{site.module_path}'; only activation modules can be replaced. "
                            "Make it an nn.ReLU module in the model definition.")
        if site.kind == "ReLU6":
            raise SpecError(f"site '{name}' is a ReLU6; convert the model with "
                            "secure_inference.relu6_to_relu(model) before applying a spec")
    modules = dict(model.named_modules())
    touched = {sites_by_name(sites)[n].module_path for n in checked}
    for path in touched:
        calls = by_module[path]
        original = modules[path]
        if isinstance(original, MultiSiteActivation):
            per_call = list(original.sites)
        else:
            per_call = [original] * len(calls)
        replaced = [BlockReLU(checked[s.name]) if s.name in checked else per_call[i]
                    for i, s in enumerate(calls)]
        parent_path, attr = _split_path(path)
        parent = modules[parent_path] if parent_path else model
        if len(calls) == 1:
            new = replaced[0]
        else:
            new = MultiSiteActivation(replaced)
            if not isinstance(original, MultiSiteActivation):
                parent.register_forward_pre_hook(_ResetCalls(attr))
        setattr(parent, attr, new)
    _move_like(model, touched)
    return model


def _move_like(model: nn.Module, paths) -> None:
    """Put new Block-ReLU buffers on the device of the model's parameters."""
    for p in model.parameters():
        for path in paths:
            model.get_submodule(path).to(p.device)
        return


def extract_block_spec(model: nn.Module, input_shape: Sequence[int]) -> Spec:
    """The spec currently applied to ``model`` (sites that are Block-ReLUs)."""
    spec: Spec = {}
    modules = dict(model.named_modules())
    for site in find_relu_sites(model, input_shape):
        module = modules.get(site.module_path)
        if isinstance(module, MultiSiteActivation):
            module = module.sites[site.call_index]
        if isinstance(module, BlockReLU):
            spec[site.name] = module.block_sizes.cpu().numpy().astype(np.int32)
    return spec


# --------------------------------------------------------------------------- files

class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays, dtypes and scalars; every other global is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles carry array bytes as latin-1 text
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED or (
                module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise SpecError(f"refusing to unpickle {module}.{name}: a block spec holds only "
                        "arrays, dicts, lists, strings and numbers")


def _check_plain(obj, where: str = "spec") -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "iufb":
            raise SpecError(f"{where}: array of dtype {obj.dtype} is not allowed")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, (str, int, float, bool, np.generic, type(None))):
        raise SpecError(f"{where}: {type(obj).__name__} is not allowed in a block spec")


def safe_unpickle(data: bytes):
    """Unpickle ``data`` allowing only plain containers and numpy arrays."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except SpecError:
        raise
    except Exception as e:  # malformed pickles raise many exception types
        raise SpecError(f"not a valid block-spec pickle: {type(e).__name__}: {e}") from None
    _check_plain(obj)
    return obj


def _as_spec_dict(obj, source: str) -> Spec:
    if not isinstance(obj, dict):
        raise SpecError(f"{source}: expected a dict of site name -> [C, 2] array, "
                        f"got {type(obj).__name__}")
    out: Spec = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise SpecError(f"{source}: site names must be strings, got {name!r}")
        try:
            out[name] = as_block_sizes(value)
        except ValueError as e:
            raise SpecError(f"{source}: site '{name}': {e}") from None
    return out


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_spec(spec: Mapping[str, object], path: str | os.PathLike) -> None:
    """Write a spec as a pickle (``.pickle``/``.pkl``) or JSON (``.json``) file."""
    clean = _as_spec_dict(dict(spec), "spec")
    if str(path).endswith(".json"):
        atomic_write_bytes(path, spec_to_json(clean).encode())
    else:
        atomic_write_bytes(path, pickle.dumps(clean, protocol=4))


def load_spec(path: str | os.PathLike) -> Spec:
    """Read a spec file (pickle via the restricted unpickler, or JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"block spec file not found: {path}")
    data = path.read_bytes()
    if path.suffix == ".json":
        return spec_from_json(data.decode())
    return _as_spec_dict(safe_unpickle(data), str(path))


def spec_to_json(spec: Mapping[str, np.ndarray]) -> str:
    """JSON text ``{"site": [[h, w], ...]}`` for people and other tools."""
    return json.dumps({k: np.asarray(v).astype(int).tolist() for k, v in spec.items()}, indent=1)


def spec_from_json(text: str) -> Spec:
    """Inverse of :func:`spec_to_json`."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"block spec JSON is malformed: {e}") from None
    return _as_spec_dict({k: np.asarray(v) for k, v in obj.items()}
                         if isinstance(obj, dict) else obj, "JSON spec")
