"""DReLU (masked opening + one PrivateCompare mod 67) and its approximate variant, tested
against plaintext on random and edge values, with exact byte and round counts."""
from __future__ import annotations


import numpy as np

import pytest
import torch

from secure_inference.mpc.protocols import drelu as D
from secure_inference.mpc.protocols import private_compare as PC
from secure_inference.mpc.protocols import zp as Z
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.stats import merge_stats
from secure_inference.mpc.harness import run_in_process

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1


def _rand_ring(shape, gen=None) -> torch.Tensor:
    return torch.randint(I64_MIN, I64_MAX, shape, dtype=torch.int64, generator=gen)


def _share(x: torch.Tensor, x0: torch.Tensor | None = None):
    x0 = _rand_ring(x.shape) if x0 is None else x0
    return x0, x - x0


def _run_drelu(x0, x1, config=None, default=None):
    shape = tuple(x0.shape)

    def fn(party):
        if default is not None:
            D.set_default_config(party, default)
        inp = [x0, x1, party.placeholder(shape)][party.role]
        return D.drelu(party, inp, config), party.stats

    res = run_in_process(fn, timeout=60)
    assert res[2][0].device.type == "meta" and tuple(res[2][0].shape) == shape
    return res[0][0] + res[1][0], merge_stats([r[1] for r in res], "drelu")


def _to_int(v: int, bits: int) -> int:
    return v & ((1 << bits) - 1)


# ------------------------------------------------------------------ pure helpers

@pytest.mark.parametrize("bits", [64, 63, 9, 5, 3])
def test_msb_identity_of_the_masked_opening(bits):
    """The identity step 1 rests on, checked with Python integers: for t, r in Z_2^l and
    x̂ = t + r mod 2^l, MSB(t) = MSB(x̂) ⊕ MSB(r) ⊕ [r' > x̂'] (r', x̂' the low l-1 bits);
    every pair for l ≤ 5, edge and random values above."""
    g = torch.Generator().manual_seed(bits)
    mod, half = 1 << bits, 1 << (bits - 1)
    vals = [0, 1, half - 1, half, half + 1, mod - 1, mod - 2]
    vals += [_to_int(int(v), bits) for v in _rand_ring((60,), g)]
    if bits <= 5:
        vals = list(range(mod))
    for t in vals:
        for r in vals:
            xh = (t + r) % mod
            want = t >> (bits - 1)
            got = (xh >> (bits - 1)) ^ (r >> (bits - 1)) ^ int(r % half > xh % half)
            assert got == want


def test_bit_decompose_msb_first():
    v = torch.tensor([0b1011, -1, I64_MIN])
    bitsv = D.bit_decompose(v, 64)
    assert bitsv.shape == (3, 64)
    assert bitsv[0, -4:].tolist() == [1, 0, 1, 1] and int(bitsv[0].sum()) == 3
    assert int(bitsv[1].sum()) == 64
    assert bitsv[2, 0] == 1 and int(bitsv[2].sum()) == 1


def test_zp_packing_roundtrip_and_hostile_input():
    for count in (1, 4, 5, 6, 64, 1001):
        v = torch.randint(0, 67, (count,), dtype=torch.int32)
        packed = D.pack_zp(v)
        assert packed.dtype == torch.uint8 and packed.numel() == D.zp_packed_bytes(count)
        assert torch.equal(D.unpack_zp(packed, count), v)
    assert D.zp_packed_bytes(64) == 52 and D.zp_packed_bytes(5) == 4
    good = D.pack_zp(torch.full((10,), 66, dtype=torch.int32))
    with pytest.raises(ProtocolError, match="expected"):
        D.unpack_zp(good[:-1], 10)
    bad = good.clone().view(torch.int32)
    bad[0] = 67 ** 5
    with pytest.raises(ProtocolError, match="out of range"):
        D.unpack_zp(bad.view(torch.uint8), 10)
    bad[0] = -5
    with pytest.raises(ProtocolError, match="out of range"):
        D.unpack_zp(bad.view(torch.uint8), 10)
    padded = D.pack_zp(torch.tensor([1, 2, 3, 4, 5, 6, 0, 0, 0, 7], dtype=torch.int32))
    with pytest.raises(ProtocolError, match="padding"):
        D.unpack_zp(padded, 7)


@pytest.mark.parametrize("bits", [64, 40, 7])
def test_element_packing_roundtrip_and_checks(bits):
    top = Z.all_ones(bits)
    v = _rand_ring((50,)) & top
    v[0] = top
    packed = D.pack_elements(v, bits)
    assert packed.numel() == 50 * ((bits + 7) // 8) == D.pack_bytes(50, bits)
    assert torch.equal(D.unpack_elements(packed, 50, bits), v)
    with pytest.raises(ProtocolError, match="expected"):
        D.unpack_elements(packed[:-1], 50, bits)
    if bits % 8:
        wide = D.pack_elements(torch.full((50,), 1 << bits, dtype=torch.int64), 64)
        wide = wide.view(50, 8)[:, :(bits + 7) // 8].reshape(-1)
        with pytest.raises(ProtocolError, match="wider"):
            D.unpack_elements(wide, 50, bits)


class _Rnd:
    def __init__(self, n, bits, g):
        self.s = torch.randint(1, 67, (n, bits), dtype=torch.int16, generator=g)
        self.u = torch.randint(0, 67, (n, bits), dtype=torch.int16, generator=g)
        self.shift = torch.randint(0, bits, (n,), generator=g)


@pytest.mark.parametrize("bits", [64, 16, 4])
def test_private_compare_against_plaintext(bits):
    """P2's decision equals beta XOR [x > r] on random and edge pairs, for both betas."""
    g = torch.Generator().manual_seed(100 + bits)
    top = Z.all_ones(bits)
    rand = lambda n: _rand_ring((n,), g) & top  # noqa: E731
    x = torch.cat([rand(400), torch.tensor([0, top, 0, top, 5, 5, 6, 4, 0, top])])
    r = torch.cat([rand(400), torch.tensor([0, top, top, 0, 5, 6, 5, 5, 1, top - 1])])
    x[100:150] = r[100:150]                       # equal values
    x[150:200] = (r[150:200] + 1) & top            # x = r + 1
    r[200:250] = top                               # the special case r = 2^l - 1
    n = x.numel()
    for beta_val in (0, 1, None):
        beta = torch.randint(0, 2, (n,), generator=g) if beta_val is None else \
            torch.full((n,), beta_val, dtype=torch.int64)
        xb = D.bit_decompose(x, bits)
        s0 = torch.randint(0, 67, xb.shape, dtype=torch.int16, generator=g)
        s1 = torch.remainder(xb - s0, 67)
        rnd = _Rnd(n, bits, g)
        d0 = D.private_compare_message(0, s0, r, beta, rnd, bits)
        d1 = D.private_compare_message(1, s1, r, beta, rnd, bits)
        assert d0.min() >= 0 and d0.max() < 67
        got = D.private_compare_decide(d0, d1)
        assert torch.equal(got, D.plain_private_compare(x, r, beta, bits))
        # at most one zero per element (what makes a random rotation enough to hide its position)
        assert int((torch.remainder(d0 + d1, 67) == 0).sum(1).max()) <= 1


@pytest.mark.parametrize("bits", [63, 16, 3])
def test_cpu_kernels_equal_the_torch_reference(bits):
    """The fused CPU kernels (message + packing, unpacking + decision, dealt corrections, the
    Z_67 packing) give exactly what the torch operations give, including the special row."""
    g = torch.Generator().manual_seed(bits)
    n = 777
    top = Z.all_ones(bits)
    r = _rand_ring((n,), g) & top
    r[:40] = top
    beta = torch.randint(0, 2, (n,), generator=g)
    xbits = torch.randint(0, 67, (n, bits), dtype=torch.int16, generator=g)
    rnd = _Rnd(n, bits, g)
    rnd.s, rnd.u = rnd.s.to(torch.int16), rnd.u.to(torch.int16)
    for j in (0, 1):
        want = Z._pack_zp_torch(D.private_compare_message(j, xbits, r, beta, rnd, bits))
        assert torch.equal(D.private_compare_packed(j, xbits, r, beta, rnd, bits), want)
    d0 = D.private_compare_message(0, xbits, r, beta, rnd, bits)
    d1 = D.private_compare_message(1, torch.randint(0, 67, (n, bits), dtype=torch.int16,
                                                    generator=g), r, beta, rnd, bits)
    d1[::3] = (67 - d0[::3]) % 67                    # rows with a zero sum somewhere
    got = D.private_compare_decide_packed(Z._pack_zp_torch(d0), Z._pack_zp_torch(d1), n, bits)
    assert torch.equal(got, D.private_compare_decide(d0, d1))
    assert bool(got[::3].all())
    shares0 = torch.randint(0, 67, (n * bits,), dtype=torch.int16, generator=g)
    corr = Z._unpack_zp_torch(PC.deal_corrections(r, shares0, bits), n * bits)
    assert torch.equal(torch.remainder(corr + shares0, 67).view(n, bits),
                       D.bit_decompose(r, bits, torch.int16))
    v = torch.randint(0, 67, (n * bits + 3,), dtype=torch.int16, generator=g)
    assert torch.equal(D.pack_zp(v), Z._pack_zp_torch(v))
    assert torch.equal(D.unpack_zp(D.pack_zp(v), v.numel()), Z._unpack_zp_torch(D.pack_zp(v),
                                                                                v.numel()))


def test_config_validation_and_ranges():
    assert D.EXACT.exact and D.EXACT.valid_range() == (-(1 << 63), 1 << 63)
    cfg = D.DReLUConfig.approximate(max_abs_bits=24, drop_bits=6)
    assert (cfg.ring_bits, cfg.drop_bits) == (19, 6) and not cfg.exact
    assert cfg.valid_range() == (-(1 << 24) + 64, 1 << 24)
    p = cfg.error_probability(torch.tensor([-1, 0, 63, 64, 10]))
    assert p.tolist() == [0.0, 63 / 64, 0.0, 0.0, 53 / 64]
    for bad in (dict(ring_bits=2), dict(ring_bits=65), dict(ring_bits=60, drop_bits=5),
                dict(drop_bits=-1)):
        with pytest.raises(ValueError):
            D.DReLUConfig(**bad)
    for bad_bits in ((4, 4), (5, 4)):
        with pytest.raises(ValueError):
            D.DReLUConfig.approximate(*bad_bits)


def test_cost_formula_and_targets():
    # 3 packed vectors of 63 values mod 67 (13 words), two 8-byte openings, one output share
    assert D.drelu_bytes(1) == 3 * 52 + 16 + 8 == 180
    assert D.drelu_bytes(10) == 3 * 4 * 126 + 240 == 1752
    assert D.drelu_bytes(10 ** 6) / 10 ** 6 == pytest.approx(175.2)
    assert D.drelu_bytes(1) <= 496 and D.mul_drelu_bytes(1, 1) <= 536
    assert D.drelu_bytes(0) == 0
    small = D.DReLUConfig(ring_bits=24, drop_bits=8)
    # 3 packed vectors of 5·23 values, two 3-byte openings per element, one 8-byte output share
    assert D.drelu_bytes(5, small) == 3 * D.zp_packed_bytes(115) + 2 * 5 * 3 + 40


# ------------------------------------------------------------------ the protocol (in process)

def _edge_values(lo: int, hi: int) -> list[int]:
    vals = {0, 1, -1, 2, -2, lo, hi - 1, lo + 1, hi - 2}
    for k in range(0, 63):
        for v in (1 << k, -(1 << k), (1 << k) - 1, -(1 << k) + 1):
            if lo <= v < hi:
                vals.add(v)
    return sorted(vals)


def test_exact_drelu_random_and_edge_values_and_costs():
    lo, hi = D.EXACT.valid_range()
    edges = torch.tensor(_edge_values(lo, hi), dtype=torch.int64)
    assert (lo, hi) == (I64_MIN, I64_MAX + 1)  # every int64: the whole ring
    rand = _rand_ring((1500,))
    small = torch.randint(-1000, 1000, (300,), dtype=torch.int64)
    x = torch.cat([edges, rand, small])
    # shares that wrap in every way: x0 random, x0 = 0, x0 = x, x0 = -1, x0 = 2^63 - 1, x0 = -2^63
    k = edges.numel()
    specials = [torch.zeros(k, dtype=torch.int64), edges.clone(), torch.full((k,), -1),
                torch.full((k,), I64_MAX), torch.full((k,), I64_MIN)]
    x = torch.cat([x] + [edges] * len(specials))
    x0 = torch.cat([_rand_ring((x.numel() - k * len(specials),))] + specials)
    x0, x1 = _share(x, x0)
    got, st = _run_drelu(x0, x1)
    assert torch.equal(got, D.plain_drelu(x))
    n = x.numel()
    assert st["bytes"] == D.drelu_bytes(n)
    assert st["rounds"] == D.ROUNDS
    nzp = D.zp_packed_bytes(n * 63)
    assert st["bytes_0->2"] == st["bytes_1->2"] == nzp
    assert st["bytes_0->1"] == st["bytes_1->0"] == 8 * n
    assert st["bytes_2->1"] == nzp + 8 * n
    assert "bytes_2->0" not in st  # everything P0 gets from the helper comes from the PRG


def test_single_exact_drelu_costs_180_bytes_in_3_rounds():
    for v in (5, -5):
        x0, x1 = _share(torch.tensor([v]))
        got, st = _run_drelu(x0, x1)
        assert int(got) == (v >= 0)
        assert st["bytes"] == 180 and st["rounds"] == 3


@pytest.mark.parametrize("ring_bits,drop_bits", [(20, 0), (40, 0), (30, 8), (24, 12), (44, 20)])
def test_approximate_drelu_matches_its_exact_prediction(ring_bits, drop_bits):
    """Inside its range the approximate DReLU returns exactly [floor(x/2^k) - e >= 0], e the
    carry of the shares' low k bits: wrong only for 0 <= x < 2^k when e = 1."""
    cfg = D.DReLUConfig(ring_bits, drop_bits)
    lo, hi = cfg.valid_range()
    span = 1 << drop_bits
    x = torch.cat([torch.tensor(_edge_values(lo, hi), dtype=torch.int64),
                   torch.randint(lo, hi - 1, (600,)), torch.randint(-3 * span, 3 * span, (600,))])
    x0, x1 = _share(x)
    got, st = _run_drelu(x0, x1, cfg)
    low = span - 1
    carry = ((x0 & low) + (x1 & low)) >= span if drop_bits else torch.zeros_like(x).bool()
    predicted = ((x >> drop_bits) - carry.to(torch.int64) >= 0).to(torch.int64)
    assert torch.equal(got, predicted)
    wrong = got != D.plain_drelu(x)
    assert bool(((x[wrong] >= 0) & (x[wrong] < span)).all())
    if drop_bits == 0:
        assert not wrong.any()
    assert st["bytes"] == D.drelu_bytes(x.numel(), cfg) and st["rounds"] == D.ROUNDS
    assert st["bytes"] < D.drelu_bytes(x.numel())


def test_session_default_config_is_used_and_empty_input():
    cfg = D.DReLUConfig(ring_bits=24)
    x = torch.randint(-(1 << 21), 1 << 21, (50,))
    x0, x1 = _share(x)
    got, st = _run_drelu(x0, x1, None, default=cfg)
    assert torch.equal(got, D.plain_drelu(x))
    assert st["bytes"] == D.drelu_bytes(50, cfg)
    e = torch.zeros(0, dtype=torch.int64)
    got, st = _run_drelu(e, e)
    assert got.numel() == 0 and st["bytes"] == 0


def test_output_share_of_fixed_secret_looks_uniform():
    """P0's (and P1's) share of DReLU(x) for one fixed x, over 4000 runs, is uniform bit by bit."""
    n = 4000
    x = torch.full((n,), -7, dtype=torch.int64)
    shape = (n,)
    x0, x1 = _share(x)

    def fn(party):
        return D.drelu(party, [x0, x1, party.placeholder(shape)][party.role])

    s0, s1, _ = run_in_process(fn, timeout=60)
    assert torch.equal(s0 + s1, torch.zeros(n, dtype=torch.int64))
    for share in (s0, s1):
        for bit in (0, 1, 17, 40, 63):
            frac = float(((share >> bit) & 1).double().mean())
            assert abs(frac - 0.5) < 0.05  # ~6.3 standard deviations
        assert share.unique().numel() == n  # no repeated share


def test_helper_learns_only_unbiased_masked_comparison_bits(monkeypatch):
    """P2's PrivateCompare output per DReLU is masked by a P0-P1 random bit: for one fixed
    secret it is balanced, and what P2 receives in the fused multiplication (z = v + m) is
    uniform."""
    n = 4000
    x = torch.full((n,), 123456, dtype=torch.int64)
    x0, x1 = _share(x)
    seen = []
    real = D.private_compare_decide_packed

    def spy(*args):
        out = real(*args)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(D, "private_compare_decide_packed", spy)
    got_z = []

    def fn(party):
        if party.role == 2:
            orig = party.recv

            def recv(frm, shape, dtype=torch.int64):
                t = orig(frm, shape, dtype)
                if dtype == torch.int64 and tuple(shape) == (n,):
                    got_z.append(t)
                return t
            party.recv = recv
        inp = [x0, x1, party.placeholder((n,))][party.role]
        return D.mul_drelu(party, inp, inp)

    r0, r1, _ = run_in_process(fn, timeout=60)
    assert torch.equal(r0 + r1, x)
    assert len(seen) == 1
    for bits in seen:
        assert abs(float(bits.double().mean()) - 0.5) < 0.05
    z = got_z[0] + got_z[1]
    for bit in (0, 31, 63):
        assert abs(float(((z >> bit) & 1).double().mean()) - 0.5) < 0.05


def test_malformed_helper_message_is_refused():
    """A helper that deals an out-of-range packed word makes P1 fail with a clear ProtocolError."""
    n = 3
    x0, x1 = _share(torch.tensor([1, -2, 3]))

    def fn(party):
        if party.role == 2:
            with party.scope("drelu"):
                size = D.zp_packed_bytes(n * 63)
                party.send(1, torch.full((size,), 255, dtype=torch.uint8))
                party.recv(0, (D.zp_packed_bytes(n * 63),), torch.uint8)
            return None
        return D.drelu(party, [x0, x1][party.role])

    with pytest.raises(ProtocolError, match="out of range"):
        run_in_process(fn, timeout=20)


def test_parties_with_different_configs_fail_clearly():
    """A party running another DReLU configuration is caught by the frame checks."""
    x0, x1 = _share(torch.tensor([1, 2, 3]))

    def fn(party):
        cfg = D.DReLUConfig(ring_bits=32) if party.role == 1 else D.EXACT
        return D.drelu(party, [x0, x1, party.placeholder((3,))][party.role], cfg)

    with pytest.raises(ProtocolError, match="expected"):
        run_in_process(fn, timeout=20)


def test_mul_drelu_argument_checks():
    def fn(party):
        d = torch.zeros(4, dtype=torch.int64)
        with pytest.raises(ValueError, match="same shape"):
            D.mul_drelu(party, d, torch.zeros(5, dtype=torch.int64))
        with pytest.raises(ValueError, match="one entry per payload"):
            D.mul_drelu(party, d, torch.zeros(5, dtype=torch.int64), torch.zeros(4).long())
        with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
            D.mul_drelu(party, d, torch.zeros(2, dtype=torch.int64), torch.tensor([0, 4]))
        with pytest.raises(TypeError, match="DReLUConfig"):
            D.drelu(party, d, config="exact")
        return True

    assert run_in_process(fn, timeout=20) == [True, True, True]


def test_word_reduction_kernel_matches_numpy_for_every_word():
    from secure_inference.mpc.protocols import compare_kernels as K
    words = np.arange(65536, dtype=np.uint16)
    for high in (2, 3, 63, 64, 66, 67, 255, 256):
        out = np.empty(65536, dtype=np.int16)
        bad = K.reduce_words(words, high, out)
        assert np.array_equal(out, (words % high).astype(np.int16))
        assert bad == 65536 - (65536 // high) * high
    with pytest.raises(ValueError):
        K.reduce_words(words, K.MAX_HIGH + 1, np.empty(65536, dtype=np.int16))


@pytest.mark.parametrize("bits", [26, 64])
def test_joint_compare_masks_give_the_same_message_on_every_path(bits):
    """CompareRandomness holds s and u as one draw su; the torch path (other devices: s and u
    derived from su) and the CPU kernels (su split inside them) give the same message."""
    g = torch.Generator().manual_seed(bits)
    n = 203
    top = Z.all_ones(bits)
    r = _rand_ring((n,), g) & top
    beta = torch.randint(0, 2, (n,), generator=g)
    xbits = torch.randint(0, 67, (n, bits), dtype=torch.int16, generator=g)
    su = torch.randint(0, 66 * 67, (n, bits), dtype=torch.int16, generator=g)
    su[0, :2] = torch.tensor([0, 66 * 67 - 1], dtype=torch.int16)
    rnd = PC.CompareRandomness(su, torch.randint(0, bits, (n,), generator=g))
    assert int(rnd.s.min()) >= 1 and int(rnd.s.max()) <= 66
    assert int(rnd.u.min()) >= 0 and int(rnd.u.max()) <= 66
    assert torch.equal((rnd.s - 1) * 67 + rnd.u, su.to(rnd.s.dtype))
    for j in (0, 1):
        want = Z._pack_zp_torch(D.private_compare_message(j, xbits, r, beta, rnd, bits))
        assert torch.equal(D.private_compare_packed(j, xbits, r, beta, rnd, bits), want)
        words = Z.checked_words(D.pack_zp(xbits), n * bits, "test")
        assert torch.equal(PC.private_compare_from_words(j, words, r, beta, rnd, bits), want)
