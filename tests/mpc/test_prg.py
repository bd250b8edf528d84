"""The keystreams of secure_inference.mpc.prg: AES-CTR draws unchanged (known answers captured
before the stream interface existed), ChaCha20 from ``cryptography`` and from torch
bit-identical for every kind of draw (awkward sizes, reads across blocks and chunks,
rejection sampling), and both equal to a Python-integer reference of the sampling rule."""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from secure_inference.mpc import chacha, prg

KEY = bytes(range(32))
M64 = 1 << 64
CHUNK_BYTES = chacha.BLOCK_BYTES * (1 << 16)   # chacha.keystream computes this much per pass


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:32]


# ---------------------------------------------------------------- AES: known answers

def test_aes_ring_and_bytes_known_answers():
    s = prg.derive_stream(KEY, "layer1\x00mask\x000")
    assert s.ring((3,)).tolist() == [4512695136720711053, -152678504846950486,
                                     6063102777042797777]
    assert _digest(s.ring((1000,))) == "e729ec77661e4de1bd675257cd116d2c"
    s = prg.derive_stream(KEY, "kat-bytes", "aes")
    assert s.bytes_tensor((5,)).tolist() == [243, 115, 10, 97, 95]
    assert _digest(s.bytes_tensor((777,))) == "ab1a5961130ea550bef635e34b5cb669"
    assert prg.derive_stream(KEY, "r").read(16).hex() == "295d054e7174a42dd1e229f11b0fc10a"
    assert prg.KeyStream(bytes(range(16))).read(16).hex() == "2e5e116c2b0a967131c211c5a6a8ef01"


AES_BELOW = {   # high: (first four values, digest of the next 5000)
    67: ([27, 32, 48, 47], "0b7b87ff58440eaf014d370776d11f76"),
    2: ([1, 1, 0, 0], "f718a0f7b02f688e1207d9f5e050f88f"),
    256: ([26, 188, 160, 137], "7b02eca045b39a9960635c411ad864ee"),
    3: ([0, 0, 1, 2], "3fed770e74ef788c8cf24f3878a963f5"),
    1 << 40: ([474312007443, 437239666526, 867971611688, 387230072739],
              "61356bdc35c10cec969655c03dbb833b"),
    (1 << 63) + 1: ([3473376734687309918, 262477042828324319, 2056964908393142832,
                     4406608570601152322], "90d995045bc822a905b4c93dcc5b8b39"),
    3 << 62: ([3870095641171716226, 6696226408162764139, 5613540338388607391,
               463089850585275192], "25ad1eb5ebaca50786b6bd4f0ac89434"),
    1 << 64: ([-5685818417612321035, -8160805538146305515, 6501861426014825162,
               4363804192442869205], "d9d0236ff758712d4f21332bb6ba2d5a"),
    1: ([0, 0, 0, 0], "e7e2dcff542de95352682dc186432e98"),
}


@pytest.mark.parametrize("high", list(AES_BELOW), ids=str)
def test_aes_below_known_answers(high):
    first, digest = AES_BELOW[high]
    s = prg.derive_stream(KEY, f"kat-below-{high}")
    assert s.below((4,), high).tolist() == first
    assert _digest(s.below((5000,), high)) == digest


# ---------------------------------------------------------------- the sampling rule

def _reference_below(stream: prg.Stream, n: int, high: int) -> list[int]:
    """prg's documented rule in Python integers, from the stream's raw bytes: powers of two
    mask one word each; otherwise rounds of need + need // 8 + 8 words, keeping the first
    ``need`` below the largest multiple of ``high`` under 2^64."""
    def words(k):
        return list(struct.unpack(f"<{k}Q", stream.read(8 * k)))
    if high & (high - 1) == 0:
        out = [w % high for w in words(n)]
    else:
        limit, out = (M64 // high) * high, []
        while len(out) < n:
            need = n - len(out)
            out += [w % high for w in words(need + need // 8 + 8) if w < limit][:need]
    return [v - M64 if v >= 1 << 63 else v for v in out]


HIGHS = [3, 67, 255, 1 << 40, (1 << 40) + 1, (1 << 62) + 5, (1 << 63) - 1, 1 << 63,
         (1 << 63) + 1, 3 << 62, M64 - 1, 1 << 64]


@pytest.mark.parametrize("cipher", prg.CIPHERS)
@pytest.mark.parametrize("high", HIGHS, ids=str)
def test_below_follows_the_rule_exactly(cipher, high):
    """Incl. heavy rejection: half the words for 2^63 + 1, a quarter for 3·2^62."""
    ident = f"below-{high}"
    got = prg.derive_stream(KEY, ident, cipher).below((2000,), high).tolist()
    assert got == _reference_below(prg.derive_stream(KEY, ident, cipher), 2000, high)


def test_rejection_happens_and_both_holders_skip_the_same_words():
    """With high = 2^63 + 1 about half the words are rejected: the second value must come
    from beyond the first two words (else nothing was rejected and the test is vacuous)."""
    s = prg.derive_stream(KEY, "reject", "chacha20")
    raw = struct.unpack("<64Q", prg.derive_stream(KEY, "reject", "chacha20").read(512))
    high = (1 << 63) + 1
    got = [v % M64 for v in s.below((8,), high).tolist()]
    assert got == [w for w in raw if w < high][:8]
    assert sum(w >= high for w in raw[:16]) >= 2


# ---------------------------------------------------------------- ChaCha20

def _subkey(identifier: str) -> bytes:
    return hmac.new(KEY, identifier.encode(), hashlib.sha256).digest()


def test_chacha_stream_is_cryptographys_chacha20_under_the_hmac_subkey():
    enc = Cipher(algorithms.ChaCha20(_subkey("id"), bytes(16)), mode=None).encryptor()
    want = enc.update(bytes(1000))
    assert prg.derive_stream(KEY, "id", "chacha20").read(1000) == want
    torch_side = prg.ChaChaStream(_subkey("id"), torch_on_cpu=True).bytes_tensor(1000)
    assert bytes(torch_side.numpy()) == want
    assert prg.derive_stream(KEY, "id", "chacha20").read(32) != prg.derive_stream(
        KEY, "id", "aes").read(32)


def _pair(ident: str) -> tuple[prg.ChaChaStream, prg.ChaChaStream]:
    """The same stream drawn by OpenSSL and by torch (on the CPU)."""
    return prg.ChaChaStream(_subkey(ident)), prg.ChaChaStream(_subkey(ident), torch_on_cpu=True)


SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 1000, CHUNK_BYTES // 8 + 3]   # the last: > one chunk


@pytest.mark.parametrize("n", SIZES)
def test_chacha_torch_equals_openssl_for_ring_and_bytes(n):
    ssl, tch = _pair(f"sizes-{n}")
    assert torch.equal(ssl.bytes_tensor((n,)), tch.bytes_tensor((n,)))
    assert torch.equal(ssl.ring((n,)), tch.ring((n,)))         # continues mid-block
    assert torch.equal(ssl.bytes_tensor((3, 5)), tch.bytes_tensor((3, 5)))


@pytest.mark.parametrize("high", [2, 3, 67, 256, 1 << 40, (1 << 63) + 1, 3 << 62, 1 << 64],
                         ids=str)
@pytest.mark.parametrize("n", [0, 1, 5, 1000])
def test_chacha_torch_equals_openssl_for_below(high, n):
    ssl, tch = _pair(f"below-{high}-{n}")
    ssl.read(13), tch.read(13)                                 # start at an odd offset
    a, b = ssl.below((n,), high), tch.below((n,), high)
    assert torch.equal(a, b) and a.shape == (n,)
    assert torch.equal(ssl.below((2, 3), high), tch.below((2, 3), high))


def test_chacha_reads_continue_across_host_and_torch_draws():
    """Interleaved host reads and torch draws of one stream are one keystream."""
    s = prg.ChaChaStream(_subkey("mix"), torch_on_cpu=True)
    parts = [s.read(5), bytes(s.bytes_tensor(70).numpy()), s.read(64), s.ring(3).numpy().tobytes(),
             s.read(1), bytes(s.bytes_tensor(200).numpy())]
    assert b"".join(parts) == chacha.keystream_reference(_subkey("mix"), 5 + 70 + 64 + 24 + 1 + 200)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chacha_on_cuda_equals_the_cpu_draws():
    for n in (0, 1, 9, 1000, CHUNK_BYTES // 8 + 3):
        cpu, gpu = prg.ChaChaStream(_subkey(f"cuda-{n}")), prg.ChaChaStream(_subkey(f"cuda-{n}"))
        assert torch.equal(cpu.ring(n), gpu.ring(n, "cuda").cpu())
        assert torch.equal(cpu.bytes_tensor(n), gpu.bytes_tensor(n, "cuda").cpu())
        for high in (67, (1 << 63) + 1, 3 << 62, 1 << 40):
            on_gpu = gpu.below(n, high, "cuda")
            assert on_gpu.device.type == "cuda"
            assert torch.equal(cpu.below(n, high), on_gpu.cpu())


# ---------------------------------------------------------------- choices and private streams

def test_private_streams_are_fresh_for_both_ciphers(monkeypatch):
    for cipher in prg.CIPHERS:
        assert not torch.equal(prg.private_stream(cipher).ring(8), prg.private_stream(cipher).ring(8))
    calls = []
    real = os.urandom
    monkeypatch.setattr(prg.os, "urandom", lambda n: calls.append(n) or real(n))
    prg.private_stream("chacha20").ring(4)
    assert calls == [prg.KEY_BYTES]       # keyed from the OS, nothing seeded


def test_unknown_cipher_and_bad_keys_are_refused():
    with pytest.raises(ValueError, match="aes, chacha20"):
        prg.derive_stream(KEY, "x", "chacha")
    with pytest.raises(ValueError, match="32 bytes"):
        prg.ChaChaStream(bytes(16))
    assert [prg.cipher_name(prg.cipher_code(c)) for c in prg.CIPHERS] == list(prg.CIPHERS)
    assert prg.cipher_code("aes") == 0     # keeps an AES session's header as it was
