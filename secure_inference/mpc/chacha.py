"""ChaCha20 keystream in torch operations, on any device, bit-for-bit equal to the RFC 8439
cipher (``cryptography``'s ChaCha20 is the CPU reference it is tested against).

Why: a party on a GPU must expand its pair keys into megabytes of correlated randomness per
layer. Drawing them on the CPU and copying them over makes the non-linear layers host-bound;
ChaCha20 is additions, rotations and XORs on 32-bit words, which vectorise over blocks with
plain tensor operations. On a CUDA device with Triton installed the blocks come from one fused
kernel (:mod:`.chacha_triton`: the whole state in registers for all 20 rounds) instead of
about a thousand element-wise torch kernels per chunk. Parties on different devices still
draw identical streams because every path produces the same RFC 8439 keystream.

Layout: the state is 16 little-endian 32-bit words — the constants "expand 32-byte k", the
8 key words, the 32-bit block counter and 3 nonce words; each block is 20 rounds (10 double
rounds of 4 column and 4 diagonal quarter rounds), plus the input state, serialised little
endian. ``cryptography``'s ChaCha20 takes a 16-byte nonce whose first 4 bytes are the initial
counter (little endian) and the last 12 the RFC nonce; :func:`keystream` uses counter 0 and
nonce 0 by default, matching ``Cipher(ChaCha20(key, bytes(16)))``.

Words are held in int64 tensors with values in [0, 2^32) and masked after every addition: no
reliance on signed 32-bit overflow, which C++ (and so torch) leaves undefined.
"""
from __future__ import annotations

import struct

import torch

from . import chacha_triton

__all__ = ["keystream", "keystream_reference", "BLOCK_BYTES", "METHODS"]

BLOCK_BYTES = 64
_MASK = 0xFFFFFFFF
_CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")
_CHUNK_BLOCKS = 1 << 16          # blocks per pass: 16 words x 8 bytes x 65536 = 8 MiB state
METHODS = ("auto", "torch", "triton")


def _rotl(x: torch.Tensor, n: int) -> torch.Tensor:
    return ((x << n) | (x >> (32 - n))) & _MASK


def _quarter(s: list[torch.Tensor], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _MASK
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _MASK
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & _MASK
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _MASK
    s[b] = _rotl(s[b] ^ s[c], 7)


def _blocks(key_words: tuple[int, ...], nonce_words: tuple[int, int, int], first: int,
            count: int, device: torch.device) -> torch.Tensor:
    """``count`` keystream blocks from block counter ``first``: int64 words [count, 16]."""
    counter = (torch.arange(count, dtype=torch.int64, device=device) + first) & _MASK
    init = [torch.full((count,), v, dtype=torch.int64, device=device)
            for v in (*_CONSTANTS, *key_words)]
    init.append(counter)
    init += [torch.full((count,), v, dtype=torch.int64, device=device) for v in nonce_words]
    s = list(init)
    for _ in range(10):
        _quarter(s, 0, 4, 8, 12)
        _quarter(s, 1, 5, 9, 13)
        _quarter(s, 2, 6, 10, 14)
        _quarter(s, 3, 7, 11, 15)
        _quarter(s, 0, 5, 10, 15)
        _quarter(s, 1, 6, 11, 12)
        _quarter(s, 2, 7, 8, 13)
        _quarter(s, 3, 4, 9, 14)
    return torch.stack([(a + b) & _MASK for a, b in zip(s, init)], dim=1)


def keystream(key: bytes, nbytes: int, device: torch.device | str = "cpu", *,
              nonce: bytes = bytes(12), counter: int = 0, method: str = "auto") -> torch.Tensor:
    """The first ``nbytes`` bytes of the ChaCha20 keystream (uint8 tensor on ``device``).

    ``key``: 32 bytes; ``nonce``: 12 bytes; ``counter``: the first block's counter.
    ``method``: ``"triton"`` (the fused kernel; CUDA, or any device under
    ``TRITON_INTERPRET=1``), ``"torch"`` (element-wise torch operations in chunks of 2^16
    blocks, 4 MiB of output each, on any device) or ``"auto"``: Triton where it can run."""
    if len(key) != 32:
        raise ValueError(f"ChaCha20 keys are 32 bytes, got {len(key)}")
    if len(nonce) != 12:
        raise ValueError(f"ChaCha20 nonces are 12 bytes, got {len(nonce)}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    device = torch.device(device)
    blocks = -(-nbytes // BLOCK_BYTES)
    if counter + blocks > 1 << 32:
        raise ValueError("the 32-bit block counter would wrap: at most 256 GiB per stream")
    key_words = struct.unpack("<8I", key)
    nonce_words = struct.unpack("<3I", nonce)
    triton_here = chacha_triton.available(device)
    if method == "triton" and not triton_here:
        raise RuntimeError(f"the Triton ChaCha20 kernel cannot run on {device}: it needs a CUDA "
                           "device and the triton package (or TRITON_INTERPRET=1)")
    if method == "triton" or (method == "auto" and triton_here):
        return chacha_triton.blocks(key_words, nonce_words, counter, blocks, device)[:nbytes]
    out = torch.empty(blocks * BLOCK_BYTES, dtype=torch.uint8, device=device)
    for start in range(0, blocks, _CHUNK_BLOCKS):
        n = min(_CHUNK_BLOCKS, blocks - start)
        words = _blocks(key_words, nonce_words, counter + start, n, device)
        # little-endian bytes of each 32-bit word
        shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=device)
        raw = ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)
        out[start * BLOCK_BYTES:(start + n) * BLOCK_BYTES] = raw.reshape(-1)
    return out[:nbytes]


def keystream_reference(key: bytes, nbytes: int, *, nonce: bytes = bytes(12),
                        counter: int = 0) -> bytes:
    """The same bytes from ``cryptography``'s ChaCha20 (OpenSSL): the CPU implementation."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    full_nonce = struct.pack("<I", counter) + nonce
    enc = Cipher(algorithms.ChaCha20(key, full_nonce), mode=None).encryptor()
    return enc.update(bytes(nbytes))
