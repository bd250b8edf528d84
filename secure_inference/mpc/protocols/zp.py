"""Wire encodings of the DReLU: values mod 67 packed five per 4-byte word (67^5 < 2^31, 6.4 bits
a value) and ℓ-bit ring elements in ⌈ℓ/8⌉ little-endian bytes. Every decoder refuses malformed
input (a word out of range, nonzero padding, a value wider than ℓ bits) with
:class:`~..errors.ProtocolError` before using it. The CPU paths run numba kernels
(:mod:`.compare_kernels`); the torch versions serve other devices and are their reference.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ..errors import ProtocolError
from . import compare_kernels as K

__all__ = ["P", "BLOCK", "zp_packed_bytes", "pack_zp", "unpack_zp", "checked_words",
           "pack_elements", "pack_bytes", "unpack_elements", "i64", "all_ones", "require_little_endian"]

P = 67                      # PrivateCompare field (a prime above ℓ + 2 for every ℓ ≤ 64)
_ZP_GROUP = 5               # values mod 67 per packed word: 67^5 = 1,350,125,107 < 2^31
_ZP_WORD_BYTES = 4
_ZP_WORD_LIMIT = P ** _ZP_GROUP
_I64_MIN = -(1 << 63)
BLOCK = 1 << 18             # elements per block in packing and sampling loops
_DEVICE_BLOCK = 1 << 22     # words per block when packing on a GPU (few kernel launches)


def i64(v: int) -> int:
    """The int64 (two's complement) representative of an integer modulo 2^64."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def all_ones(bits: int) -> int:
    """2^bits − 1 as an int64 constant (−1 for 64 bits)."""
    return i64((1 << bits) - 1)


def zp_packed_bytes(count: int) -> int:
    """Bytes of ``count`` values mod 67 on the wire (five per 4-byte word)."""
    return _ZP_WORD_BYTES * -(-count // _ZP_GROUP)


def require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("the DReLU wire encodings assume a little-endian machine")


def pack_zp(v: torch.Tensor) -> torch.Tensor:
    """Pack values in [0, 67) (any shape, flattened) five per 4 bytes; returns uint8."""
    require_little_endian()
    if v.device.type != "cpu":
        return _pack_zp_torch(v)
    flat = v.reshape(-1).contiguous().numpy()
    words = np.zeros(-(-flat.size // _ZP_GROUP), dtype=np.int32)
    K.pack_values(flat, words)
    return torch.from_numpy(words).view(torch.uint8)


def _pack_zp_torch(v: torch.Tensor) -> torch.Tensor:
    """:func:`pack_zp` in torch operations (any device; the reference for the CPU kernel)."""
    flat = v.reshape(-1)
    words = -(-flat.numel() // _ZP_GROUP)
    pad = words * _ZP_GROUP - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(words, _ZP_GROUP)
    packed = torch.empty(words, dtype=torch.int32, device=flat.device)
    step = BLOCK if flat.device.type == "cpu" else _DEVICE_BLOCK
    for a in range(0, words, step):
        blk = g[a:a + step].to(torch.int32)
        acc = blk[:, 4].clone()
        for i in (3, 2, 1, 0):  # Horner: Σ v_i 67^i < 67^5 < 2^31
            acc.mul_(P).add_(blk[:, i])
        packed[a:a + step] = acc
    return packed.view(torch.uint8)


def _zp_words(data: torch.Tensor, count: int, source: str) -> torch.Tensor:
    """The int32 words of a packed message of ``count`` values, after the length check."""
    require_little_endian()
    words = -(-count // _ZP_GROUP)
    if data.dtype != torch.uint8 or data.numel() != words * _ZP_WORD_BYTES:
        raise ProtocolError(f"{source}: expected {words * _ZP_WORD_BYTES} bytes of packed Z_67 "
                            f"values, got {data.numel()} ({data.dtype})")
    if data.storage_offset() % _ZP_WORD_BYTES or not data.is_contiguous():
        data = data.clone()
    return data.view(torch.int32)


def checked_words(data: torch.Tensor, count: int, source: str) -> np.ndarray:
    """The int32 words (numpy, CPU) of a packed message of ``count`` values mod 67, after
    its length, range and padding checks (:class:`ProtocolError` on any failure)."""
    words = _zp_words(data, count, source).numpy()
    err = K.check_words(words, count)
    if err == K.WORD_OUT_OF_RANGE:
        raise ProtocolError(f"{source}: packed Z_67 word out of range (malformed message)")
    if err == K.NONZERO_PADDING:
        raise ProtocolError(f"{source}: nonzero padding in packed Z_67 values")
    return words


def unpack_zp(data: torch.Tensor, count: int, *, source: str = "peer") -> torch.Tensor:
    """Inverse of :func:`pack_zp` for ``count`` values (int16); refuses anything malformed."""
    if data.device.type != "cpu":
        return _unpack_zp_torch(data, count, source=source)
    words = checked_words(data, count, source)
    out = np.empty(count, dtype=np.int16)
    K.unpack_words(words, out)
    return torch.from_numpy(out)


def _unpack_zp_torch(data: torch.Tensor, count: int, *, source: str = "peer") -> torch.Tensor:
    """:func:`unpack_zp` in torch/numpy operations (the reference for the CPU kernel)."""
    words = -(-count // _ZP_GROUP)
    w_all = _zp_words(data, count, source)
    if bool(((w_all < 0) | (w_all >= _ZP_WORD_LIMIT)).any()):
        raise ProtocolError(f"{source}: packed Z_67 word out of range (malformed message)")
    if w_all.device.type == "cpu":  # numpy divides by a constant much faster than torch
        w_np = w_all.numpy()
        digits_np = np.empty((words, _ZP_GROUP), dtype=np.int16)
        for a in range(0, words, BLOCK):
            w = w_np[a:a + BLOCK]
            for i in range(_ZP_GROUP):
                q = w // P
                digits_np[a:a + BLOCK, i] = w - q * P
                w = q
        digits = torch.from_numpy(digits_np)
    else:
        digits = torch.empty((words, _ZP_GROUP), dtype=torch.int16, device=data.device)
        for a in range(0, words, _DEVICE_BLOCK):
            w = w_all[a:a + _DEVICE_BLOCK]
            for i in range(_ZP_GROUP):
                q = torch.div(w, P, rounding_mode="floor")
                digits[a:a + _DEVICE_BLOCK, i] = w - q * P
                w = q
    flat = digits.view(-1)
    if bool((flat[count:] != 0).any()):
        raise ProtocolError(f"{source}: nonzero padding in packed Z_67 values")
    return flat[:count]


def pack_elements(v: torch.Tensor, bits: int) -> torch.Tensor:
    """ℓ-bit ring elements (int64, flattened) as ⌈ℓ/8⌉ little-endian bytes each (uint8)."""
    require_little_endian()
    nb = (bits + 7) // 8
    raw = v.reshape(-1).contiguous().view(torch.uint8)
    if nb == 8:
        return raw
    return raw.view(-1, 8)[:, :nb].reshape(-1)


def pack_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` ℓ-bit ring elements on the wire."""
    return count * ((bits + 7) // 8)


def unpack_elements(data: torch.Tensor, count: int, bits: int, *,
                    source: str = "peer") -> torch.Tensor:
    """Inverse of :func:`pack_elements`; checks each value is below 2^ℓ."""
    require_little_endian()
    nb = (bits + 7) // 8
    if data.dtype != torch.uint8 or data.numel() != count * nb:
        raise ProtocolError(f"{source}: expected {count * nb} bytes of {bits}-bit elements, got "
                            f"{data.numel()} ({data.dtype})")
    if nb == 8:
        v = data.clone().view(torch.int64)
    else:
        full = torch.zeros((count, 8), dtype=torch.uint8, device=data.device)
        full[:, :nb] = data.view(count, nb)
        v = full.view(torch.int64).view(count)
    if bits < 64 and bool(((v >> bits) != 0).any()):
        raise ProtocolError(f"{source}: element wider than {bits} bits (malformed message)")
    return v
