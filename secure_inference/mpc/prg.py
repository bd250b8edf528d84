"""Cryptographic randomness: keystreams under pairwise keys, and private OS randomness.

Correlated randomness. Two parties that share a 128- or 256-bit key draw *identical* tensors
by construction: every draw is addressed by an identifier (the runtime uses
``scope path / tag / occurrence``), and the stream for an identifier is the keystream of the
session's cipher under the sub-key ``HMAC-SHA256(key, identifier)``, from counter 0.
Different identifiers give independent streams, so what one code path draws never shifts what
another draws; only draws with the *same* identifier are numbered in call order.

Two ciphers (the session setting ``prg``; all three parties must choose the same one, and
:func:`~.party.check_program` refuses a session where they differ):

* ``aes`` (default): AES-256-CTR, counter block 0, through ``cryptography`` on the CPU; a
  party on a GPU copies the bytes over.
* ``chacha20``: ChaCha20 (RFC 8439, nonce 0, block counter 0), i.e. exactly
  ``Cipher(algorithms.ChaCha20(subkey, bytes(16)), mode=None)``. A CPU party draws it with
  ``cryptography``; any other party computes it with :func:`.chacha.keystream` on its own
  device, so the random bytes never cross the host. Both give the same bits, so parties on
  different devices agree.

Private randomness. :func:`private_stream` expands a fresh ``os.urandom(32)`` key with the
cipher (one key per call), i.e. OS randomness stretched by a PRG; nothing is seeded or
reproducible.

Uniform integers in ``[0, high)`` are exactly uniform: 64-bit words at or above the largest
multiple of ``high`` below 2^64 are rejected and the stream continues (both key holders reject
the same words, so they still agree). The bias is therefore zero, not merely ≤ 2^-40. The
sampling is torch operations on the draw's device (one host sync per round of rejection, for
the count), identical on every device.
"""
from __future__ import annotations

import hashlib
import hmac
import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import chacha
from .options import CIPHERS, DEFAULT_CIPHER

__all__ = ["KEY_BYTES", "CIPHERS", "DEFAULT_CIPHER", "cipher_code", "cipher_name", "Stream",
           "KeyStream", "AesStream", "ChaChaStream", "derive_stream", "private_stream",
           "fresh_key", "check_cipher"]

KEY_BYTES = 32
_ZERO_NONCE = bytes(16)
_SIGN = -(1 << 63)              # int64 with only the top bit set
# The plaintext of every keystream read (the keystream is the encryption of zero bytes): one
# shared, read-only buffer, sliced, instead of a fresh bytes(n) per read (which costs more than
# the cipher: every large allocation is new pages to fault in).
_ZEROS = memoryview(bytes(1 << 20))
_AES_SPARE = 15                 # update_into needs block_size − 1 spare bytes of output room


def _zeros(nbytes: int):
    """``nbytes`` zero bytes (a read-only view for up to 1 MiB)."""
    return _ZEROS[:nbytes] if nbytes <= len(_ZEROS) else bytes(nbytes)


def check_cipher(cipher: str) -> str:
    """``cipher`` if it is one of :data:`CIPHERS`, else a ValueError naming them."""
    if cipher not in CIPHERS:
        raise ValueError(f"prg must be one of {', '.join(CIPHERS)}, got {cipher!r}")
    return cipher


def cipher_code(cipher: str) -> int:
    """The small integer that stands for ``cipher`` in the session header (aes = 0)."""
    return CIPHERS.index(check_cipher(cipher))


def cipher_name(code: int) -> str:
    """The cipher of a header code (an unknown code is shown as such, for error messages)."""
    return CIPHERS[code] if 0 <= code < len(CIPHERS) else f"unknown({code})"


def _as_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(s) for s in shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _host_tensor(data: bytes) -> torch.Tensor:
    """``data`` as a fresh uint8 CPU tensor (an empty one for no bytes)."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _unsigned_below(words: torch.Tensor, limit: int) -> torch.Tensor:
    """Mask of ``words`` (int64 holding uint64) that are < ``limit`` as unsigned numbers,
    for 2^63 <= limit < 2^64: flipping the top bit turns unsigned order into signed order."""
    return (words ^ _SIGN) < limit - (1 << 63)


def _unsigned_mod(words: torch.Tensor, high: int) -> torch.Tensor:
    """``words`` (int64 holding uint64 u) as u mod ``high`` (int64), for non-power-of-two
    3 <= high < 2^64, where words >= high only occur if high < 2^63 (the rejection limit)."""
    if high > 1 << 63:          # the limit is high itself: every accepted word is already < high
        return words
    r = torch.remainder(words, high)          # in [0, high): the value of the signed word
    c = (1 << 64) % high                      # a negative word is u − 2^64: add 2^64 mod high
    t = r - (high - c)                        # r + c − high, without overflow
    return torch.where(words < 0, torch.where(t >= 0, t, t + high), r)


class Stream:
    """A keystream read sequentially, and the tensors drawn from it.

    Subclasses give :meth:`read` (the next bytes, on the host) and :meth:`_tensor` (the next
    bytes as a uint8 tensor on a device); every draw below is built on :meth:`_tensor`, so a
    cipher that can run on a device draws there."""

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the stream."""
        raise NotImplementedError

    def _tensor(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The next ``nbytes`` bytes as a fresh contiguous uint8 tensor on ``device``."""
        return _host_tensor(self.read(nbytes)).to(device)

    def _words(self, n: int, device: torch.device) -> torch.Tensor:
        """The next ``n`` little-endian 64-bit words (int64 holding uint64)."""
        return self._tensor(8 * n, device).view(torch.int64)

    def ring(self, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform ring elements (int64, all 2^64 values equally likely)."""
        shape = _as_shape(shape)
        return self._words(_numel(shape), torch.device(device)).reshape(shape)

    def bytes_tensor(self, shape, device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform uint8 values."""
        shape = _as_shape(shape)
        return self._tensor(_numel(shape), torch.device(device)).reshape(shape)

    def below(self, shape, high: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Exactly uniform integers in ``[0, high)`` for ``1 <= high <= 2^64`` (int64 tensor).

        Values ≥ 2^63 (only possible when high > 2^63) come back as their two's-complement
        int64 representative, i.e. as ring elements. Non-powers of two: each round reads
        ``need + need // 8 + 8`` words and keeps the first ``need`` below the limit.
        """
        if not 1 <= high <= 2 ** 64:
            raise ValueError(f"high must be in [1, 2^64], got {high}")
        shape = _as_shape(shape)
        n = _numel(shape)
        device = torch.device(device)
        if high & (high - 1) == 0:  # power of two: mask, no rejection needed
            words = self._words(n, device)
            return (words & (high - 1) if high < 1 << 64 else words).reshape(shape)
        limit = (2 ** 64 // high) * high  # accept words < limit (unsigned)
        pieces, filled = [], 0
        while filled < n:
            need = n - filled
            words = self._words(need + need // 8 + 8, device)
            ok = words[_unsigned_below(words, limit)][:need]
            pieces.append(ok)
            filled += ok.numel()    # the host sync: how many were accepted
        out = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64, device=device)
        return _unsigned_mod(out, high).reshape(shape)


class KeyStream(Stream):
    """An AES-256-CTR keystream under one key (counter block 0), drawn on the CPU."""

    def __init__(self, key: bytes):
        if len(key) not in (16, 32):
            raise ValueError(f"AES keys are 16 or 32 bytes, got {len(key)}")
        if len(key) == 16:  # stretch a 128-bit key to the 256-bit cipher deterministically
            key = hashlib.sha256(b"secure-inference/aes128->256" + key).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the stream."""
        return self._enc.update(_zeros(nbytes))

    def _tensor(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """The next bytes, encrypted straight into a new tensor (no copy of them)."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=device)
        buf = torch.empty(nbytes + _AES_SPARE, dtype=torch.uint8)
        view = buf.numpy()
        done = 0
        while done < nbytes:
            m = min(nbytes - done, len(_ZEROS))
            wrote = self._enc.update_into(_ZEROS[:m], view[done:done + m + _AES_SPARE])
            if wrote != m:      # CTR mode encrypts every byte at once; anything else is a bug
                raise RuntimeError(f"AES-CTR wrote {wrote} of {m} keystream bytes")
            done += m
        out = buf[:nbytes]
        return out if device.type == "cpu" else out.to(device)


AesStream = KeyStream


class ChaChaStream(Stream):
    """The ChaCha20 keystream (RFC 8439, nonce 0, counter 0) under a 32-byte key.

    On the CPU it comes from ``cryptography`` (OpenSSL's C); on any other device from
    :func:`.chacha.keystream` computed there. Reads continue from the current byte position
    whichever way they are drawn: both produce the same bytes. ``torch_on_cpu=True`` computes
    CPU draws with the torch implementation too (tests compare the two on any machine)."""

    def __init__(self, key: bytes, *, torch_on_cpu: bool = False):
        if len(key) != 32:
            raise ValueError(f"ChaCha20 keys are 32 bytes, got {len(key)}")
        self._key = key
        self._torch_on_cpu = torch_on_cpu
        self._pos = 0                  # bytes read so far
        self._enc = None               # the CPU cipher, positioned at _enc_pos
        self._enc_pos = -1

    def read(self, nbytes: int) -> bytes:
        """The next ``nbytes`` bytes of the stream (computed on the CPU)."""
        if self._enc is None or self._enc_pos != self._pos:
            block, skip = divmod(self._pos, chacha.BLOCK_BYTES)
            nonce = block.to_bytes(4, "little") + bytes(12)   # cryptography: counter ‖ nonce
            self._enc = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
            self._enc.update(_zeros(skip))
        out = self._enc.update(_zeros(nbytes))
        self._pos += nbytes
        self._enc_pos = self._pos
        return out

    def _tensor(self, nbytes: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu" and not self._torch_on_cpu:
            return _host_tensor(self.read(nbytes))
        block, skip = divmod(self._pos, chacha.BLOCK_BYTES)
        out = chacha.keystream(self._key, skip + nbytes, device, counter=block)
        self._pos += nbytes
        return out[skip:].clone() if skip else out


_STREAMS = {"aes": KeyStream, "chacha20": ChaChaStream}


def derive_stream(key: bytes, identifier: str, cipher: str = DEFAULT_CIPHER) -> Stream:
    """The stream addressed by ``identifier`` under a pair key (sub-key = HMAC-SHA256)."""
    sub = hmac.new(key, identifier.encode("utf-8"), hashlib.sha256).digest()
    return _STREAMS[check_cipher(cipher)](sub)


def private_stream(cipher: str = DEFAULT_CIPHER) -> Stream:
    """A fresh stream under an ``os.urandom`` key, known to nobody else."""
    return _STREAMS[check_cipher(cipher)](os.urandom(KEY_BYTES))


def fresh_key() -> bytes:
    """A new random 256-bit key from the OS."""
    return os.urandom(KEY_BYTES)
