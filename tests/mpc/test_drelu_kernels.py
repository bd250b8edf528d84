"""The DReLU's element-wise CPU kernels (secure_inference.mpc.protocols.drelu_kernels) against
plain-Python integer references written from the protocol's definition: the masked input of
the opening (exact and shifted), the combination of the two opened shares with its width
check, and the output shares of the bit and of the fused product, at the ring's edges
(wrap-around modulo 2^64, the largest and smallest int64) and at widths 1 … 64."""
from __future__ import annotations

import random

import pytest
import torch

from secure_inference.mpc.protocols import drelu_kernels as DK

M64 = 1 << 64


def _i64(v: int) -> int:
    v %= M64
    return v - M64 if v >= 1 << 63 else v


def _edge_values(rng: random.Random, n: int) -> list[int]:
    edges = [0, 1, -1, (1 << 63) - 1, -(1 << 63), (1 << 62), -(1 << 62) - 1]
    return edges + [_i64(rng.randrange(M64)) for _ in range(n - len(edges))]


@pytest.mark.parametrize("bits,k", [(64, 0), (27, 0), (24, 0), (1, 0), (27, 5), (40, 24),
                                    (63, 1), (2, 62)])
def test_mask_input_equals_the_definition(bits, k):
    rng = random.Random(bits * 100 + k)
    x = _edge_values(rng, 60)
    r = [rng.randrange(1 << bits) for _ in x]
    got = DK.mask_input(torch.tensor(x), torch.tensor([_i64(v) for v in r]), bits, k)
    mod = 1 << bits
    # t = the low ℓ bits of the 64-bit pattern shifted right by k (t = x for ℓ = 64, k = 0)
    want = [_i64((((v % M64) >> k) + rv) % mod) for v, rv in zip(x, r)]
    assert got.tolist() == want


def test_mask_input_writes_over_r_and_checks_arguments():
    x = torch.arange(5, dtype=torch.int64)
    r = torch.zeros(5, dtype=torch.int64)
    assert DK.mask_input(x, r, 27, 0) is r and r.tolist() == list(range(5))
    with pytest.raises(ValueError):
        DK.mask_input(x, torch.zeros(4, dtype=torch.int64), 27, 0)
    with pytest.raises(ValueError):
        DK.mask_input(x.to(torch.int32), r, 27, 0)
    with pytest.raises(ValueError):
        DK.mask_input(x, r, 65, 0)
    with pytest.raises(ValueError):
        DK.mask_input(x, torch.zeros(10, dtype=torch.int64)[::2], 27, 0)


def _le_bytes(v: int, nb: int) -> list[int]:
    return list((v % M64).to_bytes(8, "little")[:nb])


@pytest.mark.parametrize("bits", [1, 2, 7, 8, 9, 24, 27, 32, 33, 63, 64])
def test_combine_opened_equals_the_definition(bits):
    rng = random.Random(bits)
    n, nb, mod = 50, (bits + 7) // 8, 1 << bits
    mine = [rng.randrange(mod) for _ in range(n)]
    other = [rng.randrange(mod) for _ in range(n)]
    mine[:3], other[:3] = [mod - 1, 0, mod - 1], [mod - 1, 0, 1]
    beta = [rng.randrange(2) for _ in range(n)]
    data = torch.tensor([b for v in other for b in _le_bytes(v, nb)], dtype=torch.uint8)
    status, xlow, g = DK.combine_opened(torch.tensor([_i64(v) for v in mine]), data, bits,
                                        torch.tensor(beta))
    assert status == DK.OK
    xhat = [(a + b) % mod for a, b in zip(mine, other)]
    assert xlow.tolist() == [v % (1 << (bits - 1)) for v in xhat]
    assert g.tolist() == [1 ^ (v >> (bits - 1)) ^ b for v, b in zip(xhat, beta)]


@pytest.mark.parametrize("bits", [1, 9, 27, 33, 63])
def test_combine_opened_flags_an_element_wider_than_the_ring(bits):
    """A received element with any bit at or above ℓ (inside its ⌈ℓ/8⌉ bytes) is refused."""
    nb = (bits + 7) // 8
    if 8 * nb == bits:
        pytest.skip("every byte pattern is a valid element")
    n = 9
    zeros = torch.zeros(n, dtype=torch.int64)
    for pos in (0, 4, 8):
        for bit in range(bits, 8 * nb):
            data = torch.zeros(n * nb, dtype=torch.uint8)
            data[pos * nb + bit // 8] = 1 << (bit % 8)
            status, _, _ = DK.combine_opened(zeros, data, bits, zeros)
            assert status == DK.TOO_WIDE
    status, _, _ = DK.combine_opened(zeros, torch.zeros(n * nb, dtype=torch.uint8), bits,
                                     zeros)
    assert status == DK.OK


def test_combine_opened_checks_its_lengths():
    z = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError):
        DK.combine_opened(z, torch.zeros(15, dtype=torch.uint8), 27, z)
    with pytest.raises(ValueError):
        DK.combine_opened(z, torch.zeros(16, dtype=torch.uint8), 27, z[:3])


@pytest.mark.parametrize("j", [0, 1])
def test_drelu_output_equals_the_definition(j):
    rng = random.Random(j)
    s = _edge_values(rng, 40)
    g = [rng.randrange(2) for _ in s]
    got = DK.drelu_output(j, torch.tensor(g), torch.tensor(s))
    assert got.tolist() == [_i64(j * gi + (1 - 2 * gi) * si) for gi, si in zip(g, s)]


@pytest.mark.parametrize("with_index", [False, True])
def test_mul_output_equals_the_definition(with_index):
    rng = random.Random(int(with_index))
    n = 12
    m = 30 if with_index else n
    s, g = _edge_values(rng, n), [rng.randrange(2) for _ in range(n)]
    sz, mask, v = (_edge_values(rng, m) for _ in range(3))
    index = [rng.randrange(n) for _ in range(m)] if with_index else list(range(n))
    if with_index:
        index[:2] = [0, n - 1]
    got = DK.mul_output(torch.tensor(g), torch.tensor(s), torch.tensor(sz), torch.tensor(mask),
                        torch.tensor(v), torch.tensor(index) if with_index else None)
    want = []
    for i in range(m):
        vs = sz[i] - mask[i] * s[index[i]]
        want.append(_i64(v[i] - vs if g[index[i]] else vs))
    assert got.tolist() == want


def test_mul_output_checks_its_lengths():
    z = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError):
        DK.mul_output(z, z, z, z, torch.zeros(5, dtype=torch.int64), None)
    with pytest.raises(ValueError):
        DK.mul_output(z, z, z, z, z, torch.zeros(3, dtype=torch.int64))
