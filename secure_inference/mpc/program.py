"""The compiled program: public layers (:class:`Layer`, :class:`Program`) and the server's
:class:`Weights`. What each op does lives in the op table (:mod:`.ops`); the tracer that builds
programs from torch models in :mod:`.trace`; the analyses that run them in plaintext in
:mod:`.analysis`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .ops import DROP_ATTR, WIDTH_ATTR, layer_drelus

__all__ = ["Layer", "Program", "Weights", "UnsupportedOperationError", "FINGERPRINT_PARTS"]


class UnsupportedOperationError(ValueError):
    """The model uses an operation the secure runtime cannot compute (named in the message)."""


@dataclass
class Layer:
    """One secure layer. ``op`` names an entry of the op table :data:`.ops.OPS` (input,
    conv2d, linear, relu, block_relu, max_pool, avg_pool, global_avg_pool, add, sub,
    add_public, mul_public, concat, flatten, resize).

    ``inputs`` are indices of earlier layers; ``attrs`` the public hyperparameters;
    ``where`` the module path / function in the original model; ``shape`` the output shape
    at compile time (batch included).
    """

    name: str
    op: str
    inputs: list[int]
    attrs: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    shape: tuple[int, ...] = ()


@dataclass
class Program:
    """The public part of a compiled model: layers in execution order and the output index."""

    layers: list[Layer]
    output: int
    input_shape: tuple[int, ...]
    frac_bits: int | None = None
    """The fixed point the calibrated comparison widths were chosen for (None: no calibrated
    widths); a session at another ``frac_bits`` refuses the program."""

    def __iter__(self):
        return iter(self.layers)

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def drelus(self, batch: int | None = None) -> dict[str, int]:
        """DReLUs per layer for a batch (default: the compile-time batch)."""
        return {layer.name: layer_drelus(layer, batch) for layer in self.layers
                if layer_drelus(layer, batch)}

    def fingerprint(self) -> bytes:
        """SHA-256 of the public program (ops, names, wiring, hyperparameters, shapes without
        the batch, comparison widths): the three parties compare it before running."""
        h = hashlib.sha256()
        for layer in self.layers:
            h.update(repr((layer.name, layer.op, layer.inputs, tuple(layer.shape[1:]))).encode())
            for key in sorted(layer.attrs):
                _hash_attr(h, key, layer.attrs[key])
        h.update(repr((self.output, tuple(self.input_shape[1:]))).encode())
        if self.frac_bits is not None:   # absent for uncalibrated programs: digests unchanged
            h.update(repr(("frac_bits", self.frac_bits)).encode())
        return h.digest()

    def fingerprint_parts(self) -> dict[str, bytes]:
        """8-byte digests of the parts of the program a user sets separately, so that a
        mismatch between parties can name the part that differs (:data:`FINGERPRINT_PARTS`)."""
        parts = {name: hashlib.sha256(name.encode()) for name, _ in FINGERPRINT_PARTS}
        parts["input size"].update(repr(tuple(self.input_shape[1:])).encode())
        parts["comparison widths"].update(repr(self.frac_bits).encode())
        for layer in self.layers:
            parts["architecture"].update(repr((layer.name, layer.op, layer.inputs)).encode())
            for key in sorted(layer.attrs):
                part = ("block spec" if key in _SPEC_ATTRS else
                        "comparison widths" if key in (WIDTH_ATTR, DROP_ATTR) else
                        "architecture")
                parts[part].update(layer.name.encode())
                _hash_attr(parts[part], key, layer.attrs[key])
        parts["architecture"].update(repr(self.output).encode())
        return {name: h.digest()[:8] for name, h in parts.items()}

    def widths(self) -> dict[str, int]:
        """The comparison width of every DReLU layer (64 where none was set: the session's DReLU)."""
        return {layer.name: int(layer.attrs.get(WIDTH_ATTR, 64)) for layer in self.layers
                if layer_drelus(layer)}

    def describe(self) -> str:
        """One line per layer: name, op, inputs, output shape."""
        return "\n".join(f"{i:4d} {l.op:15s} {l.name:40s} <- {l.inputs} {list(l.shape)}"
                         for i, l in enumerate(self.layers))


def _hash_attr(h, key: str, v: Any) -> None:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        h.update(key.encode() + str(v.dtype).encode() + repr(v.shape).encode())
        h.update(np.ascontiguousarray(v).tobytes())
    else:
        h.update(repr((key, v)).encode())


_SPEC_ATTRS = ("block_sizes", "site")
FINGERPRINT_PARTS = (("architecture", "the same model (config or torchvision name)"),
                     ("block spec", "the same --spec file"),
                     ("comparison widths", "the same calibrated --spec, --drelu-width, "
                      "--drelu-margin and --frac-bits"),
                     ("input size", "the same --input-shape"))
"""The parts of a program :meth:`Program.fingerprint_parts` digests, with how a user makes
them agree."""


# name -> {'weight': float64 tensor, 'bias': float64 tensor or None}
Weights = dict[str, dict[str, torch.Tensor | None]]
