"""pair_small's two implementations (secure_inference.mpc.protocols.pair_random): the torch
path a party off the CPU uses gives exactly the values of the host (numba) path for the same
stream, including the redraws of rejected words; both equal a plain-Python reference."""
from __future__ import annotations

import pytest
import torch

from secure_inference.mpc import prg
from secure_inference.mpc.protocols.pair_random import small_host, small_torch
from secure_inference.mpc.protocols.zp import BLOCK

KEY = bytes(range(32))


class Draws:
    """Occurrences of one (scope, tag) stream, as Party.pair_random numbers them; records the
    size of every draw. ``poison``: byte positions of the first draw set to 0xFF (16-bit words
    of 0xFFFF are at or above every limit: forced redraws)."""

    def __init__(self, cipher: str, poison: tuple[int, ...] = (), torch_on_cpu: bool = False):
        self.cipher, self.poison, self.torch_on_cpu = cipher, poison, torch_on_cpu
        self.sizes: list[int] = []

    def __call__(self, nbytes: int) -> torch.Tensor:
        ident = f"scope\x00tag\x00{len(self.sizes)}"
        if self.torch_on_cpu:
            import hashlib
            import hmac
            sub = hmac.new(KEY, ident.encode(), hashlib.sha256).digest()
            out = prg.ChaChaStream(sub, torch_on_cpu=True).bytes_tensor(nbytes)
        else:
            out = prg.derive_stream(KEY, ident, self.cipher).bytes_tensor(nbytes)
        if not self.sizes:
            for i in self.poison:
                if i < nbytes:
                    out[i] = 255
        self.sizes.append(nbytes)
        return out


def _reference(draw: Draws, count: int, high: int) -> list[int]:
    """The documented rule in Python: blocks of BLOCK words, rejected positions redrawn from
    the next occurrences until accepted."""
    limit, out = (65536 // high) * high, []
    for a in range(0, count, BLOCK):
        size = min(BLOCK, count - a)
        raw = bytes(draw(2 * size).numpy())
        words = [int.from_bytes(raw[2 * i:2 * i + 2], "little") for i in range(size)]
        block = [w % high for w in words]
        bad = [i for i, w in enumerate(words) if w >= limit]
        while bad:
            raw = bytes(draw(2 * len(bad)).numpy())
            more = [int.from_bytes(raw[2 * i:2 * i + 2], "little") for i in range(len(bad))]
            for i, w in zip(bad, more):
                block[i] = w % high
            bad = [i for i, w in zip(bad, more) if w >= limit]
        out += block
    return out


@pytest.mark.parametrize("cipher", prg.CIPHERS)
@pytest.mark.parametrize("high,count", [(67, 1000), (200, 5000), (255, 3), (256, 70), (2, 1),
                                        (67, 0)])
def test_torch_path_equals_host_path(cipher, high, count):
    host, tch = Draws(cipher, poison=(0, 1, 6, 7)), Draws(cipher, poison=(0, 1, 6, 7))
    a, b = small_host(host, count, high), small_torch(tch, count, high, "cpu")
    assert a.dtype == b.dtype == torch.int16 and a.shape == (count,)
    assert torch.equal(a, b)
    assert host.sizes == tch.sizes                  # the same draws, so both holders agree
    assert a.tolist() == _reference(Draws(cipher, poison=(0, 1, 6, 7)), count, high)
    if count >= 4 and high < 256:
        assert len(host.sizes) > 1                  # the poisoned words were redrawn


def test_torch_path_over_several_blocks_with_natural_rejections():
    """More than one block (BLOCK words each) and high = 200: about 0.2% of words are redrawn
    per block, the torch ChaCha20 on the CPU standing in for a GPU party's stream."""
    count = BLOCK + 1234
    host, tch = Draws("chacha20"), Draws("chacha20", torch_on_cpu=True)
    a, b = small_host(host, count, 200), small_torch(tch, count, 200, "cpu")
    assert torch.equal(a, b) and host.sizes == tch.sizes
    assert len(host.sizes) > 2                      # two blocks plus their redraws
    assert int(a.min()) == 0 and int(a.max()) == 199


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_path_on_cuda_equals_host_path():
    def on_cuda(draws):
        return lambda n: draws(n).cuda()
    host, tch = Draws("chacha20", poison=(0, 1)), Draws("chacha20", poison=(0, 1))
    a = small_host(host, BLOCK + 77, 67)
    b = small_torch(on_cuda(tch), BLOCK + 77, 67, "cuda")
    assert b.device.type == "cuda" and torch.equal(a, b.cpu())
