"""Cryptographic randomness: AES-CTR streams under pairwise keys, and private OS randomness.

Correlated randomness. Two parties that share a 128- or 256-bit key draw *identical* tensors
by construction: every draw is addressed by an identifier (the runtime uses
``scope path / tag / occurrence``), and the stream for an identifier is AES-256-CTR with
counter 0 under the sub-key ``HMAC-SHA256(key, identifier)``. Different identifiers give
independent streams, so what one code path draws never shifts what another draws; only draws
with the *same* identifier are numbered in call order.

Private randomness. :func:`private_stream` expands a fresh ``os.urandom(32)`` key with AES-CTR
(one key per call), i.e. OS randomness stretched by a PRG; nothing is seeded or reproducible.

Uniform integers in ``[0, high)`` are exactly uniform: 64-bit words at or above the largest
multiple of ``high`` below 2^64 are rejected and the stream continues (both key holders reject
the same words, so they still agree). The bias is therefore zero, not merely ≤ 2^-40.
"""
from __future__ import annotations

import hashlib
import hmac
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
_ZERO_NONCE = bytes(16)


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


class KeyStream:
    """An AES-256-CTR keystream under one key, read sequentially."""

    def __init__(self, key: bytes):
        if len(key) not in (16, 32):
            raise ValueError(f"AES keys are 16 or 32 bytes, got {len(key)}")
        if len(key) == 16:  # stretch a 128-bit key to the 256-bit cipher deterministically
            key = hashlib.sha256(b"secure-inference/aes128->256" + key).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the stream."""
        return self._enc.update(bytes(nbytes))

    def ring(self, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform ring elements (int64, all 2^64 values equally likely)."""
        shape = _as_shape(shape)
        n = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(self.read(8 * n), dtype=np.int64).reshape(shape)
        return torch.from_numpy(arr.copy()).to(device)

    def bytes_tensor(self, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform uint8 values."""
        shape = _as_shape(shape)
        n = int(np.prod(shape, dtype=np.int64))
        arr = np.frombuffer(self.read(n), dtype=np.uint8).reshape(shape)
        return torch.from_numpy(arr.copy()).to(device)

    def below(self, shape, high: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Exactly uniform integers in ``[0, high)`` for ``1 <= high <= 2^64`` (int64 tensor).

        Values ≥ 2^63 (only possible when high > 2^63) come back as their two's-complement
        int64 representative, i.e. as ring elements.
        """
        if not 1 <= high <= 2 ** 64:
            raise ValueError(f"high must be in [1, 2^64], got {high}")
        shape = _as_shape(shape)
        n = int(np.prod(shape, dtype=np.int64))
        if high & (high - 1) == 0:  # power of two: mask, no rejection needed
            words = np.frombuffer(self.read(8 * n), dtype=np.uint64)
            out = words & np.uint64((high - 1) & (2 ** 64 - 1)) if high < 2 ** 64 else words
        else:
            limit = np.uint64((2 ** 64 // high) * high)  # accept words < limit
            out = np.empty(n, dtype=np.uint64)
            filled = 0
            while filled < n:
                need = n - filled
                words = np.frombuffer(self.read(8 * (need + need // 8 + 8)), dtype=np.uint64)
                ok = words[words < limit][:need]
                out[filled:filled + ok.size] = ok
                filled += ok.size
            out %= np.uint64(high)
        return torch.from_numpy(out.view(np.int64).reshape(shape).copy()).to(device)


def derive_stream(key: bytes, identifier: str) -> KeyStream:
    """The stream addressed by ``identifier`` under a pair key (sub-key = HMAC-SHA256)."""
    sub = hmac.new(key, identifier.encode("utf-8"), hashlib.sha256).digest()
    return KeyStream(sub)


def private_stream() -> KeyStream:
    """A fresh stream under an ``os.urandom`` key, known to nobody else."""
    return KeyStream(os.urandom(KEY_BYTES))


def fresh_key() -> bytes:
    """A new random 256-bit key from the OS."""
    return os.urandom(KEY_BYTES)
