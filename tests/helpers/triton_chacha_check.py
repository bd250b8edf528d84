"""Run as a script under ``TRITON_INTERPRET=1``: the Triton ChaCha20 kernel, executed by
Triton's interpreter on the CPU, against OpenSSL's ChaCha20 and the torch implementation.

Triton decides at import time whether its kernels are interpreted, so this runs in its own
process (tests/mpc/test_chacha_triton.py starts it). Prints one line per case; exits 1 on the
first mismatch."""
from __future__ import annotations

import os
import sys

import torch

from secure_inference.mpc import chacha, chacha_triton, prg

CASES = [  # (bytes, first block counter)
    (0, 0), (1, 0), (63, 3), (64, 0), (65, 1),
    (chacha_triton.BLOCKS_PER_PROGRAM * chacha.BLOCK_BYTES + 17, 12345),  # two programs
    (640 * chacha.BLOCK_BYTES, (1 << 32) - 640),                           # the last blocks
]


def main() -> int:
    if not chacha_triton.available(torch.device("cpu")):
        print("the Triton kernel is not available under TRITON_INTERPRET=1")
        return 1
    for nbytes, counter in CASES:
        key, nonce = os.urandom(32), os.urandom(12)
        got = chacha.keystream(key, nbytes, "cpu", nonce=nonce, counter=counter, method="triton")
        ok = (got.dtype == torch.uint8 and got.shape == (nbytes,)
              and bytes(got.numpy()) == chacha.keystream_reference(key, nbytes, nonce=nonce,
                                                                   counter=counter)
              and torch.equal(got, chacha.keystream(key, nbytes, nonce=nonce, counter=counter,
                                                    method="torch")))
        print(f"{nbytes} bytes from block {counter}: {'ok' if ok else 'MISMATCH'}")
        if not ok:
            return 1
    # a stream read in pieces (draws start inside blocks) through the kernel, against OpenSSL
    key = os.urandom(32)
    kernel, ssl = prg.ChaChaStream(key, torch_on_cpu=True), prg.ChaChaStream(key)
    for shape in [(3,), (1000,), (7, 9), (0,), (4096,)]:
        if not torch.equal(kernel.ring(shape), ssl.ring(shape)):
            print(f"stream draw {shape}: MISMATCH")
            return 1
        if not torch.equal(kernel.below(shape, 67), ssl.below(shape, 67)):
            print(f"stream draw below 67 {shape}: MISMATCH")
            return 1
    print("stream draws: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
