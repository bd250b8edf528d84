"""pair_small's two implementations (secure_inference.mpc.protocols.pair_random): the torch
path a party off the CPU uses gives exactly the values of the host (numba) path for the same
stream, including the redraws of rejected words, however the stream is read; both equal a
plain-Python reference."""
from __future__ import annotations

import pytest
import torch

from secure_inference.mpc import prg
from secure_inference.mpc.protocols.pair_random import small_host, small_torch
from secure_inference.mpc.protocols.zp import BLOCK

KEY = bytes(range(32))


class Reader:
    """One pair stream read in order, as Party.pair_stream gives it; records the size of every
    read. ``poison``: byte positions of the stream set to 0xFF (16-bit words of 0xFFFF are at or
    above every limit: forced redraws, also of redrawn words)."""

    def __init__(self, cipher: str, poison: tuple[int, ...] = (), torch_on_cpu: bool = False):
        ident = "scope\x00tag\x000"
        if torch_on_cpu:
            import hashlib
            import hmac
            sub = hmac.new(KEY, ident.encode(), hashlib.sha256).digest()
            self.stream = prg.ChaChaStream(sub, torch_on_cpu=True)
        else:
            self.stream = prg.derive_stream(KEY, ident, cipher)
        self.poison, self.pos = poison, 0
        self.sizes: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        out = self.stream.bytes_tensor(nbytes)
        for i in self.poison:
            if self.pos <= i < self.pos + nbytes:
                out[i - self.pos] = 255
        self.pos += nbytes
        self.sizes.append(nbytes)
        return out


def _reference(read: Reader, count: int, high: int) -> list[int]:
    """The documented rule in plain Python: the stream's 16-bit words in order; rejected
    positions (ascending) take the next words until every one is accepted."""
    limit = (65536 // high) * high

    def words(n: int) -> list[int]:
        raw = bytes(read(2 * n).numpy())
        return [int.from_bytes(raw[2 * i:2 * i + 2], "little") for i in range(n)]

    first = words(count)
    out = [w % high for w in first]
    bad = [i for i, w in enumerate(first) if w >= limit]
    while bad:
        more = words(len(bad))
        for i, w in zip(bad, more):
            out[i] = w % high
        bad = [i for i, w in zip(bad, more) if w >= limit]
    return out


POISON = (0, 1, 6, 7, 2000, 2001, 2002, 2003)   # words 0, 3, and the first redraws (n = 1000)


@pytest.mark.parametrize("cipher", prg.CIPHERS)
@pytest.mark.parametrize("high,count", [(67, 1000), (200, 5000), (255, 3), (256, 70), (2, 1),
                                        (67, 0), (66 * 67, 3000), (1 << 15, 500)])
def test_torch_path_equals_host_path(cipher, high, count):
    host, tch = Reader(cipher, poison=POISON), Reader(cipher, poison=POISON)
    a, b = small_host(host, count, high), small_torch(tch, count, high, "cpu")
    assert a.dtype == b.dtype == torch.int16 and a.shape == (count,)
    assert torch.equal(a, b)
    assert host.pos == tch.pos                      # the same bytes read: both holders agree
    assert a.tolist() == _reference(Reader(cipher, poison=POISON), count, high)
    if count >= 4 and 65536 % high:                 # (a power of two rejects nothing)
        assert host.pos > 2 * count                 # the poisoned words were redrawn
    if count == 1000 and high == 67:
        assert len(host.sizes) >= 3                 # ... and a poisoned redraw redrawn again


def test_torch_path_over_several_blocks_with_natural_rejections():
    """More than one host block (BLOCK words each) and high = 200: about 0.2% of words are
    redrawn, the torch ChaCha20 on the CPU standing in for a GPU party's stream; the host
    reads the stream in blocks, the torch path in one piece: the same values."""
    count = BLOCK + 1234
    host, tch = Reader("chacha20"), Reader("chacha20", torch_on_cpu=True)
    a, b = small_host(host, count, 200), small_torch(tch, count, 200, "cpu")
    assert torch.equal(a, b) and host.pos == tch.pos
    assert len(host.sizes) > 2 and len(tch.sizes) < len(host.sizes)   # blocks vs one piece
    assert int(a.min()) == 0 and int(a.max()) == 199
    assert a.tolist() == _reference(Reader("chacha20"), count, 200)


def test_values_do_not_depend_on_how_the_stream_is_read(monkeypatch):
    """The device path in small pieces (as if 2^24 were 1000) gives the same values."""
    from secure_inference.mpc.protocols import pair_random
    count = 5000
    whole = small_torch(Reader("aes", poison=POISON), count, 67, "cpu")
    monkeypatch.setattr(pair_random, "_DEVICE_PIECE", 1000)
    pieces = Reader("aes", poison=POISON)
    assert torch.equal(small_torch(pieces, count, 67, "cpu"), whole)
    assert pieces.sizes[:5] == [2000] * 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_path_on_cuda_equals_host_path():
    def on_cuda(draws):
        return lambda n: draws(n).cuda()
    host, tch = Reader("chacha20", poison=(0, 1)), Reader("chacha20", poison=(0, 1))
    a = small_host(host, BLOCK + 77, 67)
    b = small_torch(on_cuda(tch), BLOCK + 77, 67, "cuda")
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())


@pytest.mark.parametrize("cipher", prg.CIPHERS)
def test_keystream_tensors_are_the_cipher_output_however_read(cipher):
    """bytes_tensor (AES: encrypted straight into the tensor, in pieces of at most 1 MiB) and
    read give the cipher's keystream itself, in order, whatever the read sizes."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    ident = "scope\x00tag\x000"
    sub = hmac.new(KEY, ident.encode(), hashlib.sha256).digest()
    sizes = [0, 1, 15, 16, 17, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 5, 7]
    total = sum(sizes) * 2
    if cipher == "aes":
        enc = Cipher(algorithms.AES(sub), modes.CTR(bytes(16))).encryptor()
    else:
        enc = Cipher(algorithms.ChaCha20(sub, bytes(16)), mode=None).encryptor()
    want = enc.update(bytes(total))
    stream = prg.derive_stream(KEY, ident, cipher)
    got = b""
    for n in sizes:
        t = stream.bytes_tensor(n)
        assert t.dtype == torch.uint8 and t.numel() == n and t.is_contiguous()
        got += bytes(t.numpy()) + stream.read(n)
    assert got == want
