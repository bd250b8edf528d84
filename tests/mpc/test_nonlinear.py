"""ReLU, Block-ReLU, Block-ReLU6, max pooling and SelectShare on shares, against plaintext
references (secure_inference.BlockReLU, BlockReLU6, torch max_pool2d), with exact byte and round
counts, in process and over real loopback TCP between three processes."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secure_inference import BlockReLU, BlockReLU6, block_costs
from secure_inference.mpc.protocols import drelu as D
from secure_inference.mpc.protocols import relu as R
from secure_inference.mpc.ring import decode, encode
from secure_inference.mpc.stats import merge_stats
from secure_inference.mpc.harness import run_in_process, run_local_processes

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
FRAC = 16


def _share(x: torch.Tensor):
    x0 = torch.randint(I64_MIN, I64_MAX, x.shape, dtype=torch.int64)
    return x0, x - x0


def _run(op, x: torch.Tensor, scope: str, **kw):
    """Run op(party, shares, **kw) in process on a fresh sharing of x; returns (result, stats)."""
    x0, x1 = _share(x)
    shape = tuple(x.shape)

    def fn(party):
        out = op(party, [x0, x1, party.placeholder(shape)][party.role], **kw)
        return out, party.stats

    res = run_in_process(fn, timeout=60)
    assert res[2][0].device.type == "meta" and res[2][0].shape == res[0][0].shape
    return res[0][0] + res[1][0], merge_stats([r[1] for r in res], scope)


# ------------------------------------------------------------------ ReLU / select

def test_relu_random_and_edges_with_exact_costs():
    lo, hi = D.EXACT.valid_range()
    edges = torch.tensor([0, 1, -1, 2, -2, lo, hi - 1, 1 << 40, -(1 << 40), 12345, -12345])
    x = torch.cat([edges, torch.randint(lo, hi - 1, (500,)), torch.randint(-100, 100, (200,))])
    got, st = _run(R.relu, x, "relu")
    assert torch.equal(got, torch.clamp(x, min=0))
    assert st["bytes"] == R.relu_bytes(x.numel()) and st["rounds"] == D.ROUNDS
    assert R.relu_bytes(10 ** 6) / 10 ** 6 == pytest.approx(199.2)
    assert R.relu_bytes(1) <= 536


def test_relu_with_approximate_drelu_errs_by_less_than_2_to_k():
    cfg = D.DReLUConfig.approximate(max_abs_bits=30, drop_bits=10)
    x = torch.cat([torch.randint(-(1 << 29), 1 << 29, (500,)), torch.randint(-4096, 4096, (500,))])
    got, st = _run(R.relu, x, "relu", config=cfg)
    ref = torch.clamp(x, min=0)
    assert int((got - ref).abs().max()) < (1 << 10)
    assert bool(((got == ref) | ((x >= 0) & (x < 1024) & (got == 0))).all())
    assert st["bytes"] == R.relu_bytes(x.numel(), cfg) < R.relu_bytes(x.numel())


def test_select_share():
    n = 300
    d = torch.randint(-1000, 1000, (n,))
    d[:3] = torch.tensor([0, -1, 1])
    a, b = torch.randint(I64_MIN, I64_MAX, (n,)), torch.randint(I64_MIN, I64_MAX, (n,))
    shares = [_share(t) for t in (d, a, b)]

    def fn(party):
        if party.role == 2:
            return R.select_share(party, *(party.placeholder((n,)),) * 3)
        return R.select_share(party, *(s[party.role] for s in shares))

    r0, r1, r2 = run_in_process(fn, timeout=60)
    assert r2.device.type == "meta"
    assert torch.equal(r0 + r1, torch.where(d >= 0, a, b))


def test_select_bit_with_shared_drelu_bit():
    n = 200
    d = torch.randint(-1000, 1000, (n,))
    a, b = torch.randint(I64_MIN, I64_MAX, (n,)), torch.randint(I64_MIN, I64_MAX, (n,))
    shares = [_share(t) for t in (d, a, b)]

    def fn(party):
        if party.role == 2:
            ph = party.placeholder((n,))
            return R.select_bit(party, D.drelu(party, ph), ph, ph), party.stats
        dd, aa, bb = (s[party.role] for s in shares)
        return R.select_bit(party, D.drelu(party, dd), aa, bb), party.stats

    res = run_in_process(fn, timeout=60)
    assert torch.equal(res[0][0] + res[1][0], torch.where(d >= 0, a, b))
    st = merge_stats([r[1] for r in res], "select_bit")
    assert st["bytes"] == 40 * n and st["rounds"] == 1


# ------------------------------------------------------------------ Block-ReLU

SIZES = [[0, 1], [1, 1], [3, 3], [2, 4], [3, 3], [1, 3], [8, 8], [1, 1], [0, 0], [5, 2]]


def _fixed_point_input(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(shape, generator=g, dtype=torch.float64) * 2.0
    return encode(real, FRAC)


def _plain_block_relu(x_int: torch.Tensor, sizes) -> torch.Tensor:
    """secure_inference.BlockReLU on the decoded values (float64: patch sums are exact)."""
    return encode(BlockReLU(np.array(sizes))(decode(x_int, FRAC)), FRAC)


@pytest.mark.parametrize("hw", [(7, 9), (6, 6), (1, 5)])
def test_block_relu_matches_reference_module(hw):
    shape = (2, len(SIZES), *hw)
    x = _fixed_point_input(shape, seed=hw[0] * 10 + hw[1])
    # patches whose sum is exactly zero (kept by neither the plaintext nor the secure version)
    x[0, 2, :3, :3] = 0
    x[0, 2, 0, 0], x[0, 2, 0, 1] = 5, -5
    x[1, 3, :1, :4] = torch.tensor([[1, -1, 2, -2]])
    got, st = _run(R.block_relu, x, "block_relu", block_sizes=SIZES)
    assert torch.equal(got, _plain_block_relu(x, SIZES))
    plan = R.block_relu_plan(shape, SIZES)
    assert plan.decisions == shape[0] * int(block_costs(np.array(SIZES), *hw).sum())
    assert st["bytes"] == R.block_relu_bytes(shape, SIZES) == D.mul_drelu_bytes(plan.decisions,
                                                                                 plan.pixels)
    assert st["rounds"] == D.ROUNDS


def test_block_relu_3x3_bytes_per_pixel_target_and_identity_is_free():
    shape = (1, 16, 33, 33)
    per_pixel = R.block_relu_bytes(shape, [[3, 3]] * 16) / (16 * 33 * 33)
    assert per_pixel <= 83
    assert R.block_relu_bytes((1, 64, 96, 96), [[3, 3]] * 64) / (64 * 96 * 96) == \
        pytest.approx(24 + 175.2 / 9)
    x = _fixed_point_input((1, 3, 4, 4))
    got, st = _run(R.block_relu, x, "block_relu", block_sizes=[[0, 1]] * 3)
    assert torch.equal(got, x) and st["bytes"] == 0


def test_block_relu_all_relu_channels_equal_relu():
    x = _fixed_point_input((2, 3, 5, 4), seed=3)
    got, _ = _run(R.block_relu, x, "block_relu", block_sizes=[[1, 1]] * 3)
    assert torch.equal(got, torch.clamp(x, min=0))


def test_block_relu_approximate_config():
    cfg = D.DReLUConfig.approximate(max_abs_bits=28, drop_bits=4)
    shape = (1, len(SIZES), 6, 7)
    x = _fixed_point_input(shape, seed=9)
    got, st = _run(R.block_relu, x, "block_relu", block_sizes=SIZES, config=cfg)
    ref = _plain_block_relu(x, SIZES)
    # patches whose sum lies in (0, 2^4] may be dropped; here sums are far from that
    assert torch.equal(got, ref)
    assert st["bytes"] == R.block_relu_bytes(shape, SIZES, cfg)


def test_block_relu_rejects_bad_block_sizes():
    x = torch.zeros((1, 2, 3, 3), dtype=torch.int64)
    with pytest.raises(ValueError, match="rows"):
        R.block_relu_plan(x.shape, [[1, 1]] * 3)
    with pytest.raises(ValueError, match="N, C, H, W"):
        R.block_relu_plan((2, 3, 3), [[1, 1]] * 2)


# ------------------------------------------------------------------ Block-ReLU6

def _plain_block_relu6(x_int: torch.Tensor, sizes) -> torch.Tensor:
    """secure_inference.BlockReLU6 on the decoded values (float64: sums and means are exact)."""
    return encode(BlockReLU6(np.array(sizes))(decode(x_int, FRAC).double()), FRAC)


def _around_six(shape, seed: int) -> torch.Tensor:
    """Fixed-point values in [-3, 10]: many patches fall below 0, inside [0, 6] and above 6."""
    g = torch.Generator().manual_seed(seed)
    return encode(torch.rand(shape, generator=g, dtype=torch.float64) * 13 - 3, FRAC)


SIX = 6 << FRAC


@pytest.mark.parametrize("hw", [(7, 9), (6, 6), (1, 5)])
def test_block_relu6_matches_reference_module_with_exact_costs(hw):
    shape = (2, len(SIZES), *hw)
    x = _around_six(shape, seed=hw[0] * 10 + hw[1])
    h, w = min(3, hw[0]), min(3, hw[1])        # channel 2: 3x3 patches
    n = h * w
    # patch sums exactly at the thresholds and one unit beside them: [S > 0], [S > 6·n·2^f]
    x[0, 2, :h, :w] = 0
    x[0, 2, 0, 0], x[0, 2, 0, w - 1] = 5, -5                      # S = 0: zeroed
    x[1, 2, :h, :w] = SIX
    if hw[1] >= 6:
        x[1, 2, :h, w:2 * w] = SIX
        x[1, 2, 0, w] += 1                                        # S = 6·n·2^f + 1: set to 6
        x[0, 2, :h, w:2 * w] = 0
        x[0, 2, 0, w] = 1                                         # S = 1: kept
    x[1, 2, 0, 0] -= 7                                            # S = 6·n·2^f − 7: kept
    x[1, 6, :, :] = SIX                                           # 8x8 (clipped): mean 6
    x[1, 6, 0, 0], x[1, 6, 0, 1] = SIX + 5, SIX - 5               # S = 6·n·2^f: kept
    got, st = _run(R.block_relu6, x, "block_relu6", block_sizes=SIZES)
    want = _plain_block_relu6(x, SIZES)
    assert torch.equal(got, want)
    assert torch.equal(got[1, 6], x[1, 6]) and got[1, 6, 0, 0] == SIX + 5   # not set to 6
    assert torch.equal(got[0, 2, :h, :w], torch.zeros(h, w, dtype=torch.int64))
    if hw[1] >= 6:
        assert bool((got[1, 2, :h, w:2 * w] == SIX).all())
        assert torch.equal(got[0, 2, :h, w:2 * w], x[0, 2, :h, w:2 * w])
    kept = (got[1, 2, :h, :w] == x[1, 2, :h, :w]).all()
    assert bool(kept) and n * SIX - 7 > 0
    plan = R.block_relu_plan(shape, SIZES)
    assert plan.decisions == shape[0] * int(block_costs(np.array(SIZES), *hw).sum())
    assert st["bytes"] == R.block_relu6_bytes(shape, SIZES) == \
        D.mul_drelu_bytes(2 * plan.decisions, 2 * plan.pixels)
    assert st["rounds"] == D.ROUNDS
    # the reference does all three things somewhere: zero, pass, six
    real = decode(x, FRAC)
    assert bool((want == 0).any() and (want == SIX).any() and ((want == x) & (real > 0)
                                                                & (real != 6)).any())


def test_block_relu6_one_by_one_is_relu6_and_identity_is_free():
    x = torch.cat([torch.tensor([0, 1, -1, SIX, SIX - 1, SIX + 1, 1 << 40, -(1 << 40)]),
                   _around_six((300,), 1)]).view(2, 2, 1, -1)
    got, st = _run(R.block_relu6, x, "block_relu6", block_sizes=[[1, 1]] * 2)
    assert torch.equal(got, x.clamp(0, SIX))
    n = x.numel()
    assert st["bytes"] == D.mul_drelu_bytes(2 * n, 2 * n) == R.block_relu6_bytes(x.shape,
                                                                               [[1, 1]] * 2)
    # the bytes of the clamp layer that computes ReLU6 without a spec
    from secure_inference.mpc.protocols import activations as A
    from secure_inference.mpc.protocols import pwl
    assert st["bytes"] == A.piecewise_linear_bytes(n, pwl.clamp_pwl(0, 6))
    got, st = _run(R.block_relu6, x, "block_relu6", block_sizes=[[0, 1]] * 2)
    assert torch.equal(got, x) and st["bytes"] == 0


def test_block_relu6_bytes_per_pixel():
    shape = (1, 64, 96, 96)
    assert R.block_relu6_bytes(shape, [[3, 3]] * 64) / (64 * 96 * 96) == \
        pytest.approx(48 + 2 * 175.2 / 9)
    assert R.block_relu6_bytes(shape, [[1, 1]] * 64) / (64 * 96 * 96) == pytest.approx(398.4)
    assert R.block_relu6_bytes(shape, [[2, 2]] * 64) == \
        R.block_relu_bytes((2,) + shape[1:], [[2, 2]] * 64)   # two decisions, two payloads


def test_block_relu6_after_a_linear_layer_and_approximate_config():
    x = _around_six((3, 4), 7)
    got, _ = _run(R.block_relu6, x, "block_relu6", block_sizes=[[1, 1], [0, 1], [2, 2], [1, 1]])
    assert torch.equal(got, _plain_block_relu6(x[:, :, None, None],
                                               [[1, 1], [0, 1], [2, 2], [1, 1]])[:, :, 0, 0])
    cfg = D.DReLUConfig.approximate(max_abs_bits=28, drop_bits=4)
    shape = (1, len(SIZES), 6, 7)
    x = _around_six(shape, 9)
    got, st = _run(R.block_relu6, x, "block_relu6", block_sizes=SIZES, config=cfg)
    # sums within 2^4 units above a threshold may be decided low; none is here
    assert torch.equal(got, _plain_block_relu6(x, SIZES))
    assert st["bytes"] == R.block_relu6_bytes(shape, SIZES, cfg) < R.block_relu6_bytes(shape,
                                                                                       SIZES)


def test_block_patch_counts_follow_the_plan_order():
    plan = R.block_relu_plan((2, 3, 5, 4), [[2, 3], [0, 1], [5, 5]])
    counts = R.block_patch_counts(plan)
    assert counts.numel() == plan.decisions
    # group (2, 3) first: per image a 3x2 grid of patches; then (5, 4): the whole map
    one = [6, 2, 6, 2, 3, 1]
    assert counts.tolist() == one + one + [20, 20]


# ------------------------------------------------------------------ max pooling

@pytest.mark.parametrize("kernel,stride,padding,hw", [
    (3, 2, 1, (9, 8)), (2, 2, 0, (6, 6)), (3, 1, 0, (5, 7)), ((2, 3), (1, 2), (1, 1), (5, 6))])
def test_max_pool_matches_torch(kernel, stride, padding, hw):
    shape = (2, 3, *hw)
    x = _fixed_point_input(shape, seed=sum(hw))
    x[0, 0, 0, :3] = torch.tensor([7, 7, 7])  # ties
    got, st = _run(R.max_pool2d, x, "max_pool", kernel_size=kernel, stride=stride, padding=padding)
    ref = F.max_pool2d(x.double(), kernel, stride, padding).to(torch.int64)
    assert torch.equal(got, ref)
    assert st["bytes"] == R.max_pool_bytes(shape, kernel, stride, padding)
    plan = R.max_pool_plan(shape, kernel, stride, padding)
    assert st["rounds"] == D.ROUNDS * len(plan.levels)


def test_max_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="half the kernel"):
        R.max_pool_plan((1, 1, 5, 5), 2, 2, 2)
    with pytest.raises(ValueError, match="does not fit"):
        R.max_pool_plan((1, 1, 2, 2), 3, 1, 0)


# ------------------------------------------------------------------ real TCP, three processes


@pytest.mark.processes
def test_all_nonlinear_protocols_over_loopback_tcp_processes():
    sizes = [[3, 3], [0, 1], [1, 1], [2, 2]]
    shape = (1, 4, 6, 5)
    x = _fixed_point_input(shape, seed=42)
    x0, x1 = _share(x)
    ops = [(D.drelu, {}), (R.relu, {}), (R.block_relu, {"block_sizes": sizes}),
           (R.max_pool2d, {"kernel_size": 3, "stride": 2, "padding": 1}),
           (R.block_relu6, {"block_sizes": sizes})]
    res = run_local_processes(functools.partial(R.run_on_shares, shares=(x0, x1), ops=ops),
                              tls=False, timeout=60, wall_timeout=240)
    (d0, r0, b0, m0, s0), (d1, r1, b1, m1, s1) = res[0][0], res[1][0]
    assert res[2][0] == [None] * 5
    assert torch.equal(s0 + s1, _plain_block_relu6(x, sizes))
    assert torch.equal(d0 + d1, D.plain_drelu(x))
    assert torch.equal(r0 + r1, torch.clamp(x, min=0))
    assert torch.equal(b0 + b1, _plain_block_relu(x, sizes))
    assert torch.equal(m0 + m1, F.max_pool2d(x.double(), 3, 2, 1).to(torch.int64))
    stats = [r[1] for r in res]
    assert merge_stats(stats, "drelu")["bytes"] == D.drelu_bytes(x.numel())
    assert merge_stats(stats, "relu")["bytes"] == R.relu_bytes(x.numel())
    assert merge_stats(stats, "block_relu")["bytes"] == R.block_relu_bytes(shape, sizes)
    assert merge_stats(stats, "max_pool")["bytes"] == R.max_pool_bytes(shape, 3, 2, 1)
    assert merge_stats(stats, "block_relu6")["bytes"] == R.block_relu6_bytes(shape, sizes)


# ------------------------------------------------------------------ CUDA (skipped without a GPU)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nonlinear_protocols_on_cuda():
    sizes = [[3, 3], [0, 1], [1, 1], [2, 5]]
    shape = (2, 4, 7, 6)
    x = _fixed_point_input(shape, seed=5)
    x0, x1 = _share(x)
    approx = D.DReLUConfig.approximate(30, 6)

    def fn(party):
        inp = [x0.cuda(), x1.cuda(), party.placeholder(shape)][party.role]
        outs = (D.drelu(party, inp), R.relu(party, inp), R.block_relu(party, inp, sizes),
                R.max_pool2d(party, inp, 3, 2, 1), D.drelu(party, inp, approx),
                R.block_relu6(party, inp, sizes))
        return [o.cpu() if o.device.type == "cuda" else None for o in outs]

    res = run_in_process(fn, timeout=120, device="cuda")
    d, r, b, m, a, b6 = (u + v for u, v in zip(res[0], res[1]))
    assert torch.equal(b6, _plain_block_relu6(x, sizes))
    assert torch.equal(d, D.plain_drelu(x))
    assert torch.equal(r, torch.clamp(x, min=0))
    assert torch.equal(b, _plain_block_relu(x, sizes))
    assert torch.equal(m, F.max_pool2d(x.double(), 3, 2, 1).to(torch.int64))
    assert bool(((a == d) | ((x >= 0) & (x < 64))).all())
