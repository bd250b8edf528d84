"""The torch ChaCha20 keystream against RFC 8439's test vector and OpenSSL's ChaCha20
(``cryptography``), on the CPU and, where present, on CUDA."""
from __future__ import annotations

import os

import pytest
import torch

from secure_inference.mpc.chacha import BLOCK_BYTES, keystream, keystream_reference


def test_rfc8439_block_function_vector():
    """RFC 8439 §2.3.2: key 00..1f, nonce 00 00 00 09 00 00 00 4a 00 00 00 00, counter 1."""
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a00000000")
    expected = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e")
    assert bytes(keystream(key, 64, nonce=nonce, counter=1).numpy()) == expected
    assert keystream_reference(key, 64, nonce=nonce, counter=1) == expected


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 65, 1000, BLOCK_BYTES * (1 << 16) + 17])
def test_equals_openssl_for_random_keys_and_lengths(nbytes):
    key, nonce = os.urandom(32), os.urandom(12)
    counter = int.from_bytes(os.urandom(2), "little")
    got = bytes(keystream(key, nbytes, nonce=nonce, counter=counter).numpy())
    assert got == keystream_reference(key, nbytes, nonce=nonce, counter=counter)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="32 bytes"):
        keystream(bytes(16), 10)
    with pytest.raises(ValueError, match="12 bytes"):
        keystream(bytes(32), 10, nonce=bytes(8))
    with pytest.raises(ValueError, match="wrap"):
        keystream(bytes(32), 128, counter=(1 << 32) - 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_equals_the_cpu_stream():
    key = os.urandom(32)
    n = 10 * BLOCK_BYTES * (1 << 16) + 5
    assert torch.equal(keystream(key, n, "cuda").cpu(), keystream(key, n))
