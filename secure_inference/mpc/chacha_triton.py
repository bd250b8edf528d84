"""ChaCha20 keystream blocks as one Triton kernel: the GPU path of :func:`.chacha.keystream`.

Why: the torch implementation in :mod:`.chacha` is correct on every device but launches about
a thousand small element-wise kernels per chunk (10 double rounds x 8 quarter rounds x 12
operations, each reading and writing the whole state from memory). Here one program keeps
``BLOCKS`` ChaCha20 states in registers for all 20 rounds and writes each keystream word once:
the cost becomes the 64 output bytes per block, which is what a GPU is good at.

The kernel computes exactly RFC 8439's block function on unsigned 32-bit words (wrapping
additions, logical shifts), so its bytes equal ``cryptography``'s ChaCha20 and the torch
implementation; the tests compare all three, on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``) and on CUDA where present.

Triton is optional: :func:`available` says whether this module can run on a device, and
:func:`.chacha.keystream` falls back to the torch implementation otherwise.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["available", "blocks", "BLOCKS_PER_PROGRAM"]

BLOCKS_PER_PROGRAM = 256        # ChaCha20 blocks per Triton program (one per thread)


def _triton_installed() -> bool:
    """Whether the triton package can be imported (it ships with CUDA builds of torch;
    CPU-only installs usually lack it). Checked without importing it."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the Triton kernel can compute blocks on ``device``: a CUDA device with Triton
    installed, or any device under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if device.type != "cuda" and not _interpreting():
        return False
    return _triton_installed()


def blocks(key_words: tuple[int, ...], nonce_words: tuple[int, int, int], first: int,
           count: int, device: torch.device) -> torch.Tensor:
    """``count`` keystream blocks from block counter ``first`` as their 64 little-endian bytes
    each: a uint8 tensor ``[count * 64]`` on ``device`` (the caller checks the counter range)."""
    if not _triton_installed():
        raise RuntimeError("Triton is not installed: use secure_inference.mpc.chacha.keystream")
    kernel = _kernel()
    params = torch.tensor([*key_words, first, *nonce_words], dtype=torch.int64, device=device)
    # uint32 words stored through an int32 buffer: same bits, and int32 has every torch op
    out = torch.empty(count * 16, dtype=torch.int32, device=device)
    if count:
        grid = (-(-count // BLOCKS_PER_PROGRAM),)
        kernel[grid](params, out, count, BLOCKS=BLOCKS_PER_PROGRAM)
    return out.view(torch.uint8)


@functools.cache
def _kernel():
    """The compiled-on-first-launch Triton kernel (its module imports Triton)."""
    from .chacha_triton_kernel import chacha20_kernel
    return chacha20_kernel
