"""Ring encoding, local truncation, AES-CTR streams and pairwise randomness."""
import math

import numpy as np
import pytest
import torch

from secure_inference.mpc import prg
from secure_inference.mpc.ring import (decode, encode, reciprocal_fixed, truncate_share,
                                       truncation_error_probability)
from secure_inference.mpc.harness import run_in_process

M64 = 1 << 64


def to_signed(v: int) -> int:
    v %= M64
    return v - M64 if v >= 1 << 63 else v


def random_ring(n: int) -> torch.Tensor:
    return prg.private_stream().ring((n,))


def test_encode_decode_roundtrip_and_edges():
    x = torch.tensor([0.0, 1.0, -1.0, 0.5, -0.25, 1e-6, -3.75, 12345.678, -2.0 ** 40])
    for f in (8, 12, 16, 20):
        enc = encode(x, f)
        assert enc.dtype == torch.int64
        assert torch.allclose(decode(enc, f), x.double(), atol=2.0 ** -(f + 1), rtol=0)
    assert encode(torch.tensor([1.0]), 16).item() == 1 << 16
    assert encode(torch.tensor([-1.5]), 16).item() == -(3 << 15)
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="too large"):
        encode(torch.tensor([2.0 ** 50]), 16)


def test_local_truncation_is_floor_within_one_lsb():
    n, f = 50_000, 16
    x = prg.private_stream().below((n,), 1 << 41) - (1 << 40)   # |x| < 2^40
    x0 = random_ring(n)
    x1 = x - x0
    t = truncate_share(x0, f, 0) + truncate_share(x1, f, 1)
    want = torch.div(x, 1 << f, rounding_mode="floor")
    # each element fails catastrophically (off by about 2^(64-f)) with probability at most
    # 2^(41-64), so 50,000 elements see one in about 0.6% of runs: allow up to 3 (a chance of
    # about 1e-9 to see more), and require every other element to be within one LSB
    off = (t - want).abs()
    wrong = off > 1
    assert int(wrong.sum()) <= 3
    assert bool((off[wrong] > 1 << (64 - f - 2)).all())
    assert int(off[~wrong].max()) <= 1
    # edge values: 0, ±1, ±2^f, largest allowed magnitude
    edges = torch.tensor([0, 1, -1, 1 << f, -(1 << f), (1 << 40) - 1, -(1 << 40)])
    e0 = random_ring(edges.numel())
    te = truncate_share(e0, f, 0) + truncate_share(edges - e0, f, 1)
    assert int((te - torch.div(edges, 1 << f, rounding_mode="floor")).abs().max()) <= 1


def test_truncation_failure_rate_respects_documented_bound():
    """For |x| < 2^l the failure probability is at most 2^(l+1-64); make it measurable (l=58)."""
    n, f, l = 200_000, 16, 58
    x = prg.private_stream().below((n,), 1 << (l + 1)) - (1 << l)
    x0 = random_ring(n)
    t = truncate_share(x0, f, 0) + truncate_share(x - x0, f, 1)
    wrong = ((t - torch.div(x, 1 << f, rounding_mode="floor")).abs() > 1).double().mean().item()
    bound = truncation_error_probability(l)
    assert bound == 2.0 ** -5
    assert 0 < wrong <= bound * 1.1


def test_truncation_rejects_bad_arguments():
    with pytest.raises(ValueError):
        truncate_share(torch.zeros(2, dtype=torch.int64), 16, 2)
    with pytest.raises(ValueError):
        truncate_share(torch.zeros(2, dtype=torch.int64), 64, 0)


def test_reciprocal_fixed_precision():
    for d in (3, 7, 9, 49, 100, 12345):
        m, k = reciprocal_fixed(d, 16)
        assert abs(m / 2 ** k - 1 / d) * d <= 2.0 ** -17 + 1e-15


def test_streams_are_deterministic_per_identifier_and_independent_across():
    key = prg.fresh_key()
    a = prg.derive_stream(key, "layer1\x00mask\x000").ring((1000,))
    b = prg.derive_stream(key, "layer1\x00mask\x000").ring((1000,))
    c = prg.derive_stream(key, "layer1\x00mask\x001").ring((1000,))
    d = prg.derive_stream(prg.fresh_key(), "layer1\x00mask\x000").ring((1000,))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    # a 128-bit key works too
    k16 = prg.fresh_key()[:16]
    assert torch.equal(prg.KeyStream(k16).ring((4,)), prg.KeyStream(k16).ring((4,)))
    with pytest.raises(ValueError):
        prg.KeyStream(b"short")


@pytest.mark.parametrize("high", [2, 3, 67, 256, 1000, 2 ** 32 + 15])
def test_below_is_in_range_and_uniform(high):
    n = 60_000
    v = prg.private_stream().below((n,), high)
    assert int(v.min()) >= 0 and int(v.max()) < high
    bins = min(high, 64)
    counts = torch.bincount((v * bins // high) if high <= 2 ** 40 else v % bins,
                            minlength=bins).double()
    # expected counts per bin (high need not be a multiple of bins)
    edges = np.array([math.ceil(i * high / bins) for i in range(bins + 1)], dtype=np.float64)
    expected = np.diff(edges) / high * n
    chi2 = float(((counts.numpy() - expected) ** 2 / expected).sum())
    # chi-square with bins-1 dof: mean bins-1, sd sqrt(2(bins-1)); 6 sd is a p < 1e-6 threshold
    assert chi2 < (bins - 1) + 6 * math.sqrt(2 * (bins - 1))


def test_below_full_ring_range_and_same_stream_same_values():
    key = prg.fresh_key()
    high = 2 ** 64 - 1  # rejection of one word in 2^64; values ≥ 2^63 come back negative
    v1 = prg.derive_stream(key, "x").below((1000,), high)
    v2 = prg.derive_stream(key, "x").below((1000,), high)
    assert torch.equal(v1, v2)
    assert bool((v1 != -1).all())  # 2^64 - 1 ≡ -1 is outside [0, 2^64 - 1)
    with pytest.raises(ValueError):
        prg.private_stream().below((3,), 0)


def test_private_random_differs_between_calls():
    s1, s2 = prg.private_stream().ring((64,)), prg.private_stream().ring((64,))
    assert not torch.equal(s1, s2)


def _pair_draws(p):
    other = {0: 1, 1: 0, 2: 0}[p.role]
    out = {}
    with p.scope("layer"):
        order = ["a", "b"] if p.role == 0 else ["b", "a"]  # different call order per party
        for tag in order:
            out[tag] = p.pair_random(other, (8,), tag=tag)
        out["a2"] = p.pair_random(other, (8,), tag="a")  # second draw of the same tag
        out["small"] = p.pair_random(other, (1000,), tag="s", high=67)
        out["bytes"] = p.pair_random(other, (16,), tag="u8", dtype=torch.uint8)
    with p.scope("other-layer"):
        out["a_other"] = p.pair_random(other, (8,), tag="a")
    out["private"] = p.private_random((8,))
    return out


def test_pair_random_identical_at_both_holders_regardless_of_call_order():
    r0, r1, r2 = run_in_process(_pair_draws)
    for k in ("a", "b", "a2", "small", "bytes", "a_other"):
        assert torch.equal(r0[k], r1[k]), k      # the P0-P1 key
    assert not torch.equal(r0["a"], r2["a"])       # P2 drew from the P0-P2 key
    assert not torch.equal(r0["a"], r0["a2"]) and not torch.equal(r0["a"], r0["a_other"])
    assert not torch.equal(r0["private"], r1["private"])
    assert int(r0["small"].max()) < 67 and r0["bytes"].dtype == torch.uint8


def test_fresh_session_keys_differ():
    first = run_in_process(_pair_draws)[0]["a"]
    second = run_in_process(_pair_draws)[0]["a"]
    assert not torch.equal(first, second)
