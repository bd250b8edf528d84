"""Block specs: which block size every channel of every site uses, and how they reach a model.

A spec is a plain dict ``{site_name: np.ndarray int32 [C, 2]}`` (the pickle format the
original research code used). Sites absent from the dict keep their ordinary activation; a
named ReLU site becomes a Block-ReLU, a named ReLU6 site a Block-ReLU6
(:mod:`secure_inference.brelu`).
Pickles are read with a restricted unpickler: only numpy arrays/dtypes, dicts, lists,
strings and numbers are rebuilt; any other global is refused before it can run, and every
array's shape and dtype are checked from the pickle before its memory is allocated (limits:
:func:`load_spec`).
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
from torch import nn

from .brelu import BLOCK_MODULES, INT32_MAX, BlockActivation, as_block_sizes, block_costs
from .multisite import MultiSiteActivation  # defined there; importable from here as before
from .sites import ReluSite, find_relu_sites, sites_by_name
from .widths import CALIBRATION_KEY, Calibration, CalibrationError

Spec = dict[str, np.ndarray]


class BlockSpec(dict):
    """A block spec ``{site_name: int32 [C, 2]}`` that may carry its :class:`Calibration`.

    It is a plain dict of the sites (everything that takes a spec takes it); ``calibration``
    (None for an uncalibrated spec) holds the recorded DReLU input ranges the compiler turns
    into comparison widths. Spec files store it under the reserved key
    :data:`~secure_inference.widths.CALIBRATION_KEY`; files without it load as before.
    """

    def __init__(self, sites: Mapping[str, np.ndarray] | None = None,
                 calibration: Calibration | None = None) -> None:
        super().__init__(sites or {})
        if calibration is not None and not isinstance(calibration, Calibration):
            raise TypeError(f"calibration must be a Calibration, got {type(calibration).__name__}")
        self.calibration = calibration

    def __reduce__(self):
        return (BlockSpec, (dict(self), self.calibration))


def spec_calibration(spec: Mapping | None) -> Calibration | None:
    """The :class:`Calibration` a spec carries (None for plain dicts and uncalibrated specs)."""
    return getattr(spec, "calibration", None)


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
    """DReLUs per image for each site under ``spec`` (absent sites: their original activation),
    plus 'total'. A ReLU6 site costs two DReLUs per patch (per value when absent)."""
    checked = validate_spec(spec, sites)
    counts: dict[str, int] = {}
    for site in sites:
        if site.name in checked:
            patches = int(block_costs(checked[site.name], site.height, site.width).sum())
            counts[site.name] = site.drelus_per_patch * patches
        else:
            counts[site.name] = site.num_drelus
    counts["total"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------- applying

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
    """Replace exactly the sites named in ``spec`` by Block-ReLUs (ReLU sites) or Block-ReLU6s
    (ReLU6 sites), in place; returns ``model``.

    A module called at several sites becomes a :class:`MultiSiteActivation` whose unnamed calls
    keep the original activation. A ReLU6 site's ``[1, 1]`` rows stay ReLU6 and its identity
    rows pass the value unchanged (:class:`~secure_inference.brelu.BlockReLU6`).
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
    modules = dict(model.named_modules())
    touched = {sites_by_name(sites)[n].module_path for n in checked}
    for path in touched:
        calls = by_module[path]
        original = modules[path]
        if isinstance(original, MultiSiteActivation):
            per_call = list(original.sites)
        else:
            per_call = [original] * len(calls)
        replaced = [BLOCK_MODULES[s.activation](checked[s.name]) if s.name in checked
                    else per_call[i] for i, s in enumerate(calls)]
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
    """The spec currently applied to ``model`` (sites that are Block-ReLUs or Block-ReLU6s)."""
    spec: Spec = {}
    modules = dict(model.named_modules())
    for site in find_relu_sites(model, input_shape):
        module = modules.get(site.module_path)
        if isinstance(module, MultiSiteActivation):
            module = module.sites[site.call_index]
        if isinstance(module, BlockActivation):
            spec[site.name] = module.block_sizes.cpu().numpy().astype(np.int32)
    return spec


# --------------------------------------------------------------------------- files

# Limits of a spec file, checked before anything of the announced size is allocated. A block
# spec holds one [h, w] row per channel; real networks have a few thousand channels per site.
MAX_SPEC_FILE_BYTES = 64 * 2**20
"""Largest spec file (pickle or JSON) :func:`load_spec` reads."""
MAX_SPEC_CHANNELS = 2**20
"""Most rows (channels) one site's array may have."""
MAX_SPEC_TOTAL_CHANNELS = 2**21
"""Most rows all arrays of one spec file may have together."""
_MAX_PICKLE_OPCODES = 2**20  # bounds the unpickler's stack and memo (a memo index sizes it)
_MAX_NESTING = 32


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: the type argument of ``_reconstruct``.

    Called directly (``ndarray(shape, dtype)`` would allocate the shape at once), it only
    records the request; the size is checked when the spec is finished.
    """

    def __call__(self, shape=None, dtype=None, buffer=None, offset=0, strides=None, order=None):
        if offset or strides is not None:
            raise SpecError("refusing numpy.ndarray(...) with an offset or strides in a block spec")
        return _PendingArray(shape=shape, dtype=dtype, data=buffer, fortran=order == "F")


_NDARRAY = _NdarrayToken()


class _PendingArray:
    """An array a pickle asked for, kept as its header (shape, dtype, data) until checked.

    Nothing of the announced shape is allocated while unpickling; :meth:`build` checks the
    header against the spec limits and only then makes the array from the file's bytes.
    """

    def __init__(self, shape=None, dtype=None, data=None, fortran: bool = False) -> None:
        self.shape, self.dtype, self.data, self.fortran = shape, dtype, data, fortran

    def __setstate__(self, state) -> None:  # ndarray.__setstate__'s arguments, only recorded
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, rawdata)
        if not (isinstance(state, tuple) and len(state) == 4):
            raise SpecError("not a valid block-spec pickle: malformed array state")
        self.shape, self.dtype, self.fortran, self.data = state

    def build(self, where: str, rows_so_far: int) -> np.ndarray:
        """Check the header (``where`` names the site in errors), then make the array."""
        dtype, shape = self.dtype, self.shape
        if not isinstance(dtype, np.dtype) or dtype.kind not in "iu" or dtype.itemsize > 8 \
                or dtype.subdtype is not None or dtype.names is not None:
            raise SpecError(f"{where}: array of dtype {dtype} is not allowed; a block spec holds "
                            "integer arrays [C, 2]")
        if not (isinstance(shape, tuple)
                and all(isinstance(n, (int, np.integer)) and n >= 0 for n in shape)):
            raise SpecError(f"{where}: array shape {shape!r} is not a tuple of sizes")
        if len(shape) != 2 or shape[1] != 2:
            raise SpecError(f"{where}: array of shape {tuple(int(n) for n in shape)} is not "
                            "[C, 2] (one [h, w] row per channel)")
        rows = int(shape[0])
        if rows > MAX_SPEC_CHANNELS:
            raise SpecError(f"{where}: array announces {rows} channels, more than the limit of "
                            f"{MAX_SPEC_CHANNELS} channels per site (MAX_SPEC_CHANNELS); refused "
                            "before allocating it")
        if rows_so_far + rows > MAX_SPEC_TOTAL_CHANNELS:
            raise SpecError(f"{where}: the spec's arrays announce more than the limit of "
                            f"{MAX_SPEC_TOTAL_CHANNELS} channels in all sites together "
                            "(MAX_SPEC_TOTAL_CHANNELS); refused before allocating them")
        if self.data is None:
            raise SpecError(f"{where}: array of shape {(rows, 2)} carries no data")
        if not isinstance(self.data, (bytes, bytearray)):
            raise SpecError(f"{where}: array data is a {type(self.data).__name__}, not bytes")
        need = rows * 2 * dtype.itemsize
        if len(self.data) != need:
            raise SpecError(f"{where}: array data has {len(self.data)} bytes, shape {(rows, 2)} "
                            f"of {dtype} needs {need}")
        flat = np.frombuffer(self.data, dtype=dtype, count=rows * 2)
        return flat.reshape((rows, 2), order="F" if self.fortran else "C").copy()


def _reconstruct(subtype, shape, typecode) -> _PendingArray:
    """``numpy ... _reconstruct``: numpy's pickles start every array as an empty one."""
    if subtype is not _NDARRAY:
        raise SpecError(f"refusing to rebuild an array of type {subtype!r} in a block spec")
    if not (isinstance(shape, tuple) and 0 in shape):
        raise SpecError(f"refusing numpy _reconstruct of a non-empty shape {shape!r} "
                        "(numpy pickles start from an empty array)")
    return _PendingArray()


def _frombuffer(buffer, dtype, shape, order) -> _PendingArray:
    """``numpy ... _frombuffer`` (protocol-5 pickles): recorded, checked when finished."""
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytes(buffer)
    return _PendingArray(shape=shape, dtype=dtype, data=buffer, fortran=order == "F")


def _latin1_encode(text, encoding="utf-8", errors="strict") -> bytes:
    """``_codecs.encode`` as numpy's protocol-2 pickles use it: array bytes as latin-1 text."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in (
            "latin1", "latin-1", "iso-8859-1"):
        raise SpecError("refusing _codecs.encode other than of text to latin-1 in a block spec")
    return text.encode("latin-1", errors)


def _empty_bytes(*args) -> bytes:
    """``bytes()`` as protocols 0-2 write empty bytes; ``bytes(n)`` would allocate n zeros."""
    if args:
        raise SpecError("refusing bytes(...) with arguments in a block spec")
    return b""


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays, dtypes and scalars; every other global is refused.

    Arrays come out as :class:`_PendingArray` headers; :func:`safe_unpickle` checks and builds
    them, so an announced shape never allocates memory before it is checked.
    """

    _RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"),
                    ("numpy._core.multiarray", "_reconstruct")}
    _FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
    _SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key == ("numpy", "ndarray"):
            return _NDARRAY
        if key in self._RECONSTRUCT:
            return _reconstruct
        if key in self._FROMBUFFER:
            return _frombuffer
        if key == ("_codecs", "encode"):
            return _latin1_encode
        if key in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return _empty_bytes
        if key in self._SCALAR:
            return _checked_scalar(super().find_class(module, name))
        if key == ("numpy", "dtype") or (module == "numpy.dtypes" and name.isidentifier()
                                         and name.endswith("DType")):
            return super().find_class(module, name)
        raise SpecError(f"refusing to unpickle {module}.{name}: a block spec holds only "
                        "arrays, dicts, lists, strings and numbers")


def _checked_scalar(scalar):
    """numpy's ``scalar(dtype, bytes)`` for plain numbers only (bytes from the file)."""
    def make(dtype, data=None):
        if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and dtype.itemsize <= 16
                and isinstance(data, bytes) and len(data) == dtype.itemsize):
            raise SpecError(f"refusing a numpy scalar of dtype {dtype} in a block spec")
        return scalar(dtype, data)
    return make


def _scan_opcodes(data: bytes) -> None:
    """Bound the unpickler's own memory before it runs: opcode count and memo indices."""
    import pickletools
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(data)):
            if count >= _MAX_PICKLE_OPCODES:
                raise SpecError(f"not a valid block-spec pickle: more than {_MAX_PICKLE_OPCODES} "
                                "pickle operations")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg < _MAX_PICKLE_OPCODES:
                raise SpecError(f"not a valid block-spec pickle: memo index {arg} is beyond "
                                f"{_MAX_PICKLE_OPCODES}")
    except SpecError:
        raise
    except Exception as e:  # pickletools raises ValueError (and others) on malformed input
        raise SpecError(f"not a valid block-spec pickle: {type(e).__name__}: {e}") from None


def _finish(obj, where: str, depth: int, counts: list[int]):
    """Check the unpickled object is plain data and build its arrays (rows counted)."""
    counts[1] += 1
    if depth > _MAX_NESTING or counts[1] > _MAX_PICKLE_OPCODES:
        raise SpecError(f"{where}: nested or repeated too deeply for a block spec")
    if isinstance(obj, _PendingArray):
        arr = obj.build(where, counts[0])
        counts[0] += arr.shape[0]
        return arr
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise SpecError(f"{where}: key {type(k).__name__} is not allowed in a block spec")
            sub = f"site {k!r}" if depth == 0 else f"{where}[{k!r}]"
            out[k] = _finish(v, sub, depth + 1, counts)
        return out
    if isinstance(obj, (list, tuple)):
        items = [_finish(v, f"{where}[{i}]", depth + 1, counts) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (str, int, float, bool, np.generic, type(None))):
        return obj
    raise SpecError(f"{where}: {type(obj).__name__} is not allowed in a block spec")


def safe_unpickle(data: bytes):
    """Unpickle ``data`` allowing only plain containers, numbers and integer arrays [C, 2].

    Every array's shape and dtype are checked against :data:`MAX_SPEC_CHANNELS` and
    :data:`MAX_SPEC_TOTAL_CHANNELS` from the pickle's header before its memory is allocated.
    """
    if len(data) > MAX_SPEC_FILE_BYTES:
        raise SpecError(f"block-spec pickle of {len(data)} bytes is larger than the limit of "
                        f"{MAX_SPEC_FILE_BYTES} bytes (MAX_SPEC_FILE_BYTES)")
    _scan_opcodes(data)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except SpecError:
        raise
    except Exception as e:  # malformed pickles raise many exception types
        raise SpecError(f"not a valid block-spec pickle: {type(e).__name__}: {e}") from None
    return _finish(obj, "spec", 0, [0, 0])


def _as_spec_dict(obj, source: str) -> BlockSpec:
    if not isinstance(obj, dict):
        raise SpecError(f"{source}: expected a dict of site name -> [C, 2] array, "
                        f"got {type(obj).__name__}")
    out = BlockSpec()
    if CALIBRATION_KEY in obj:
        obj = dict(obj)
        try:
            out.calibration = Calibration.from_plain(obj.pop(CALIBRATION_KEY), source)
        except CalibrationError as e:
            raise SpecError(str(e)) from None
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


def save_spec(spec: Mapping[str, object], path: str | os.PathLike,
              calibration: Calibration | None = None) -> None:
    """Write a spec as a pickle (``.pickle``/``.pkl``) or JSON (``.json``) file.

    A calibrated spec (``calibration``, default: the one ``spec`` carries) is written as the
    plain dict of sites plus the reserved key ``__calibration__`` holding plain numbers, so the
    file stays readable by the restricted unpickler and by other tools."""
    clean = _as_spec_dict(dict(spec), "spec")
    calibration = calibration if calibration is not None else spec_calibration(spec)
    if str(path).endswith(".json"):
        atomic_write_bytes(path, spec_to_json(clean, calibration).encode())
    else:
        plain: dict = dict(clean)
        if calibration is not None:
            plain[CALIBRATION_KEY] = calibration.to_plain()
        atomic_write_bytes(path, pickle.dumps(plain, protocol=4))


def load_spec(path: str | os.PathLike) -> BlockSpec:
    """Read a spec file (pickle via the restricted unpickler, or JSON) as a :class:`BlockSpec`
    (its ``calibration`` set when the file carries one).

    Limits, checked before memory of the announced size is spent: the file is at most
    :data:`MAX_SPEC_FILE_BYTES` (64 MiB); each site's array is integer [C, 2] with
    C <= :data:`MAX_SPEC_CHANNELS` (2**20), all sites together <= :data:`MAX_SPEC_TOTAL_CHANNELS`
    (2**21) rows; every block size is an integer in [0, 2**31 - 1] (no silent int32 wrap).
    Anything else is a :class:`SpecError` naming the site (and channel and value).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"block spec file not found: {path}")
    too_big = (f"{path}: more than {MAX_SPEC_FILE_BYTES} bytes, the limit for a block spec "
               "file (MAX_SPEC_FILE_BYTES); is this the right file?")
    if path.stat().st_size > MAX_SPEC_FILE_BYTES:
        raise SpecError(too_big)
    chunks, total = [], 0
    with path.open("rb") as f:  # in pieces: read(n) would reserve n bytes up front
        while chunk := f.read(2**20):
            total += len(chunk)
            if total > MAX_SPEC_FILE_BYTES:  # the file grew since stat
                raise SpecError(too_big)
            chunks.append(chunk)
    data = b"".join(chunks)
    if path.suffix == ".json":
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            raise SpecError(f"{path}: a JSON block spec must be UTF-8 text ({e})") from None
        return spec_from_json(text)
    return _as_spec_dict(safe_unpickle(data), str(path))


def spec_to_json(spec: Mapping[str, np.ndarray], calibration: Calibration | None = None) -> str:
    """JSON text ``{"site": [[h, w], ...]}`` for people and other tools (plus
    ``"__calibration__": {...}`` for a calibrated spec)."""
    obj: dict = {k: np.asarray(v).astype(int).tolist() for k, v in spec.items()}
    calibration = calibration if calibration is not None else spec_calibration(spec)
    if calibration is not None:
        obj[CALIBRATION_KEY] = calibration.to_plain()
    return json.dumps(obj, indent=1)


def _json_rows(name: str, rows) -> np.ndarray:
    """One site's ``[[h, w], ...]`` from JSON, checked row by row (ragged rows named)."""
    where = f"JSON spec: site '{name}'"
    if not isinstance(rows, list):
        raise SpecError(f"{where}: expected a list of [h, w] rows, got {type(rows).__name__}")
    if len(rows) > MAX_SPEC_CHANNELS:
        raise SpecError(f"{where}: {len(rows)} rows is more than the limit of "
                        f"{MAX_SPEC_CHANNELS} channels per site (MAX_SPEC_CHANNELS)")
    for c, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2):
            shown = json.dumps(row) if not isinstance(row, (list, dict)) or len(row) < 8 \
                else f"a {type(row).__name__} of {len(row)} items"
            raise SpecError(f"{where}: channel {c}: expected a row [h, w] of two integers, "
                            f"got {shown}")
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
                    or not 0 <= v <= INT32_MAX or (isinstance(v, float) and not v.is_integer()):
                shown = json.dumps(v) if not isinstance(v, (list, dict)) else type(v).__name__
                raise SpecError(f"{where}: channel {c} has block size {shown}; block sizes must "
                                f"be integers >= 0 and <= {INT32_MAX} ([0, 1] marks identity)")
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def spec_from_json(text: str) -> BlockSpec:
    """Inverse of :func:`spec_to_json`; malformed, ragged or nested input is a SpecError."""
    if len(text) > MAX_SPEC_FILE_BYTES:
        raise SpecError(f"block spec JSON of {len(text)} characters is larger than the limit of "
                        f"{MAX_SPEC_FILE_BYTES} (MAX_SPEC_FILE_BYTES)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"block spec JSON is malformed: {e}") from None
    except RecursionError:
        raise SpecError("block spec JSON is nested too deeply to read; a block spec is "
                        '{"site": [[h, w], ...]} (three levels)') from None
    except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
        raise SpecError(f"block spec JSON has a value that cannot be read: {e}") from None
    if not isinstance(obj, dict):
        raise SpecError(f"JSON spec: expected a dict of site name -> [C, 2] array, "
                        f"got {type(obj).__name__}")
    return _as_spec_dict({k: (v if k == CALIBRATION_KEY else _json_rows(k, v))
                          for k, v in obj.items()}, "JSON spec")
