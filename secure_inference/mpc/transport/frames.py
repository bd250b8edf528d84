"""Frames: one tensor per frame, checked against what the receiver expects.

Frame layout (little endian)::

    u32  length of everything after this field
    2s   magic b"SI"     u8 version     u8 dtype code     u8 ndim     3 pad bytes
    u32  CRC32 of the sender's scope path (catches parties that are out of step)
    i64  sender's logical clock (Lamport; the receiver uses it to count rounds)
    i64 × ndim   shape
    payload      prod(shape) × itemsize bytes, C order

The receiver states what it expects (dtype, shape, scope) and :func:`decode_frame` refuses
anything else with a :class:`~secure_inference.mpc.errors.ProtocolError`, as well as frames
over the length limit, frames whose length disagrees with their header, and unknown
magic/version/dtype. Bytes from the network are treated as hostile: nothing is unpickled,
sizes are checked before allocating.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ProtocolError
from ..options import DEFAULT_MAX_FRAME

__all__ = ["MAGIC", "VERSION", "DEFAULT_MAX_FRAME", "MAX_NDIM", "PREFIX", "DTYPE_CODES",
           "scope_hash", "Frame", "frame_parts", "encode_frame", "assemble", "decode_frame",
           "split_prefix"]

MAGIC = b"SI"
VERSION = 1
MAX_NDIM = 8
PREFIX = struct.Struct("<I")
_HEADER = struct.Struct("<2sBBB3xIq")


DTYPE_CODES: dict[torch.dtype, int] = {torch.int64: 1, torch.uint8: 2, torch.int32: 3,
                                       torch.int8: 4, torch.float64: 5, torch.bool: 6}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_NP_DTYPES = {torch.int64: np.int64, torch.uint8: np.uint8, torch.int32: np.int32,
              torch.int8: np.int8, torch.float64: np.float64, torch.bool: np.bool_}


def scope_hash(path: str) -> int:
    """CRC32 of a scope path, carried in every frame to detect parties out of step."""
    return zlib.crc32(path.encode("utf-8"))


@dataclass
class Frame:
    """A decoded frame."""

    tensor: torch.Tensor
    clock: int
    payload_bytes: int
    frame_bytes: int


def frame_parts(x: torch.Tensor, scope: int, clock: int,
                max_frame: int = DEFAULT_MAX_FRAME) -> tuple[bytes, torch.Tensor]:
    """The two parts of one tensor's frame: its length prefix, header and shape (bytes), and
    its payload as a flat contiguous uint8 tensor on ``x``'s device (a view of ``x`` where
    it is already contiguous: not a copy). Checks dtype, rank and the frame size limit."""
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot send dtype {x.dtype}; allowed: {sorted(map(str, DTYPE_CODES))}")
    if x.ndim > MAX_NDIM:
        raise ValueError(f"cannot send a tensor with {x.ndim} dimensions (max {MAX_NDIM})")
    if x.device.type == "meta":
        raise TypeError("cannot send a meta (shape-only) tensor: this party holds no data here")
    payload = x.detach().contiguous().reshape(-1)
    if payload.numel() <= 1:   # a size-1 or empty dimension may keep any stride: make it 1
        payload = torch.empty(payload.shape, dtype=payload.dtype,
                              device=payload.device).copy_(payload)
    payload = payload if payload.dtype == torch.uint8 else payload.view(torch.uint8)
    head = _HEADER.size + 8 * x.ndim
    length = head + payload.numel()
    if length > max_frame:
        raise ValueError(f"frame of {length} bytes exceeds the {max_frame}-byte limit; "
                         "split the tensor or raise max_frame on every party")
    header = bytearray(PREFIX.size + head)
    PREFIX.pack_into(header, 0, length)
    _HEADER.pack_into(header, PREFIX.size, MAGIC, VERSION, DTYPE_CODES[x.dtype], x.ndim, scope,
                      clock)
    struct.pack_into(f"<{x.ndim}q", header, PREFIX.size + _HEADER.size, *x.shape)
    return bytes(header), payload


def encode_frame(x: torch.Tensor, scope: int, clock: int, max_frame: int = DEFAULT_MAX_FRAME,
                 alloc: Callable[[int], torch.Tensor] | None = None) -> memoryview:
    """Serialise one tensor, length prefix included, into one new buffer (the payload is
    copied once: later in-place changes to ``x`` do not affect the frame).

    The buffer is allocated uninitialised (every byte is written here) and the payload is
    copied by torch, which releases the GIL: the links' I/O threads keep moving bytes while a
    large frame is built (a zero-filled ``bytearray`` plus a copy under the GIL took 2.5 times
    as long and stalled them). ``alloc(n)`` supplies the n-byte uint8 buffer (a link's
    recycled one, :meth:`SocketLink.frame_buffer`)."""
    header, payload = frame_parts(x, scope, clock, max_frame)
    return assemble(header, payload, 0, alloc)


def assemble(header: bytes, payload: torch.Tensor, skip: int,
              alloc: Callable[[int], torch.Tensor] | None) -> memoryview:
    """The bytes of ``header + payload`` from position ``skip`` on, in one new buffer (the
    payload copied by torch, also device -> host)."""
    total = len(header) + payload.numel() - skip
    buf = alloc(total) if alloc is not None else torch.empty(total, dtype=torch.uint8)
    frame = memoryview(buf.numpy())
    head = header[skip:]
    frame[:len(head)] = head
    rest = payload[max(0, skip - len(header)):]
    if rest.numel():
        buf[len(head):].copy_(rest)
    return frame


def decode_frame(body: bytes, *, dtype: torch.dtype, shape: tuple[int, ...], scope: int,
                 scope_name: str, peer: int, device: torch.device | str = "cpu") -> Frame:
    """Parse and check a frame body (without its length prefix) against what the protocol expects."""
    where = f"frame from party {peer} (scope '{scope_name}')"
    if len(body) < _HEADER.size:
        raise ProtocolError(f"{where}: truncated header ({len(body)} bytes)")
    magic, version, code, ndim, got_scope, clock = _HEADER.unpack_from(body, 0)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"{where}: bad magic/version {magic!r}/{version}: not a "
                            "secure-inference frame or a different protocol version")
    if code not in _CODE_DTYPES:
        raise ProtocolError(f"{where}: unknown dtype code {code}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"{where}: {ndim} dimensions (max {MAX_NDIM})")
    if len(body) < _HEADER.size + 8 * ndim:
        raise ProtocolError(f"{where}: truncated shape")
    got_shape = struct.unpack_from(f"<{ndim}q", body, _HEADER.size)
    got_dtype = _CODE_DTYPES[code]
    if got_scope != scope:
        raise ProtocolError(f"{where}: the sender was in a different scope (parties out of "
                            "step: they ran different protocol steps)")
    if got_dtype != dtype or tuple(got_shape) != tuple(shape):
        raise ProtocolError(f"{where}: expected {dtype} {list(shape)}, got {got_dtype} "
                            f"{list(got_shape)} (parties disagree on the protocol)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    payload = len(body) - _HEADER.size - 8 * ndim
    if any(s < 0 for s in got_shape) or payload != itemsize * int(np.prod(got_shape, dtype=np.int64)):
        raise ProtocolError(f"{where}: payload of {payload} bytes does not match shape "
                            f"{list(got_shape)} of {dtype}")
    arr = np.frombuffer(body, dtype=_NP_DTYPES[dtype], offset=_HEADER.size + 8 * ndim)
    if not arr.flags.writeable:   # a read-only buffer (bytes): copy; a frame buffer of its own
        arr = arr.copy()          # (bytearray from a link) becomes the tensor's memory as is
    tensor = torch.from_numpy(arr).reshape(shape).to(device)
    return Frame(tensor, clock, payload, len(body) + PREFIX.size)


def split_prefix(data: bytes | bytearray, max_frame: int, peer: int) -> memoryview:
    """Check a whole frame's length prefix and return its body (a view: no copy)."""
    if len(data) < PREFIX.size:
        raise ProtocolError(f"frame from party {peer}: shorter than its length prefix")
    (length,) = PREFIX.unpack_from(data, 0)
    if length > max_frame:
        raise ProtocolError(f"frame from party {peer}: {length} bytes exceeds the limit of "
                            f"{max_frame}")
    if len(data) - PREFIX.size != length:
        raise ProtocolError(f"frame from party {peer}: length prefix says {length} bytes, "
                            f"got {len(data) - PREFIX.size}")
    return memoryview(data)[PREFIX.size:]
