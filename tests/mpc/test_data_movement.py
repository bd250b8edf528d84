"""Public data movement: ceil-mode and adaptive pooling (any output size) and reshape /
permute / transpose / flatten / chunk / split / cat on any dimension but the batch. The
compiled program in float64 must reproduce torch; the secure max over public windows is
exact with its bytes and rounds; the data movement is local (no bytes, no rounds)."""
from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secure_inference.mpc.compile import (UnsupportedOperationError, compile_model, error_bound,
                                          run_float)
from secure_inference.mpc.trace import pool_matrices
from secure_inference.mpc.protocols import drelu as D
from secure_inference.mpc.protocols import relu as R
from secure_inference.mpc.stats import merge_stats
from secure_inference.mpc.harness import run_in_process
from secure_inference.mpc import run_local

FRAC = 16


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    return got.shape == ref.shape and float((got - ref.double()).abs().max()) <= \
        1e-6 * (1 + float(ref.abs().max()))


# ------------------------------------------------------------------ public pooling matrices

@pytest.mark.parametrize("hw,out", [((7, 5), (3, 2)), ((2, 2), (7, 7)), ((1, 1), (6, 6)),
                                    ((5, 9), (5, 4)), ((13, 13), (6, 6))])
def test_adaptive_avg_pool_is_a_public_separable_map(hw, out):
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    mh, mw = pool_matrices(hw, F.adaptive_avg_pool2d, {"output_size": out})
    assert torch.allclose(mh @ x @ mw.T, F.adaptive_avg_pool2d(x, out), atol=1e-12)


@pytest.mark.parametrize("k,s,p,include,override", [
    (3, 2, 0, True, None), (3, 2, 1, True, None), (3, 2, 1, False, None), (2, 2, 0, True, 3),
    ((3, 2), (2, 1), (1, 0), False, None)])
def test_ceil_mode_avg_pool_is_a_public_separable_map(k, s, p, include, override):
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    kw = dict(kernel_size=k, stride=s, padding=p, ceil_mode=True, count_include_pad=include,
              divisor_override=override)
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    mh, mw = pool_matrices((8, 7), F.avg_pool2d, {**kw, "kernel_size": pair(k),
                                                  "stride": pair(s), "padding": pair(p)})
    assert torch.allclose(mh @ x @ mw.T, F.avg_pool2d(x, **kw), atol=1e-12)


# ------------------------------------------------------------------ secure max over windows

def _shares(x: torch.Tensor):
    x0 = torch.frombuffer(bytearray(os.urandom(8 * x.numel())), dtype=torch.int64).reshape(
        x.shape)
    return x0, x - x0


def _run(op, x, scope, **kw):
    x0, x1 = _shares(x)

    def fn(party):
        out = op(party, [x0, x1, party.placeholder(tuple(x.shape))][party.role], **kw)
        return out, party.stats

    res = run_in_process(fn, timeout=120)
    return res[0][0] + res[1][0], merge_stats([r[1] for r in res], scope)


def _ring_input(shape) -> torch.Tensor:
    x = torch.randint(-(1 << 20), 1 << 20, shape)
    x.view(-1)[:4] = 7   # ties
    return x


@pytest.mark.parametrize("kernel,stride,padding,hw", [
    (3, 2, 0, (8, 8)), (3, 2, 1, (6, 7)), (2, 2, 0, (5, 5)), (3, 1, 1, (4, 5))])
def test_ceil_mode_max_pool_matches_torch_with_exact_costs(kernel, stride, padding, hw):
    shape = (2, 3, *hw)
    x = _ring_input(shape)
    got, st = _run(R.max_pool2d, x, "max_pool", kernel_size=kernel, stride=stride,
                   padding=padding, ceil_mode=True)
    ref = F.max_pool2d(x.double(), kernel, stride, padding, ceil_mode=True).to(torch.int64)
    assert torch.equal(got, ref)
    assert st["bytes"] == R.max_pool_bytes(shape, kernel, stride, padding, ceil_mode=True)
    plan = R.max_pool_plan(shape, kernel, stride, padding, ceil_mode=True)
    assert st["rounds"] == D.ROUNDS * len(plan.levels)


@pytest.mark.parametrize("hw,out", [((7, 5), (3, 2)), ((2, 3), (5, 4)), ((6, 6), (6, 6)),
                                    ((9, 4), (1, 1))])
def test_adaptive_max_pool_matches_torch_with_exact_costs(hw, out):
    shape = (2, 2, *hw)
    x = _ring_input(shape)
    got, st = _run(R.adaptive_max_pool2d, x, "max_pool", output_size=out)
    ref = F.adaptive_max_pool2d(x.double(), out).to(torch.int64)
    assert torch.equal(got, ref)
    plan = R.adaptive_max_pool_plan(shape, out)
    assert st["bytes"] == R.plan_bytes(plan)
    assert st["rounds"] == D.ROUNDS * len(plan.levels)


def test_pool_plans_cover_every_torch_configuration():
    """The plans' windows give torch's maxima for every small configuration (plaintext)."""
    def plan_max(x, plan):
        return x.reshape(*x.shape[:2], -1)[:, :, plan.gather].amax(2).reshape(plan.out_shape)
    for h, w, k, s, p, ceil in itertools.product((5, 6, 7), (5, 8), (2, 3), (1, 2, 3), (0, 1),
                                                 (False, True)):
        if p > k // 2:
            continue
        x = torch.randn(1, 2, h, w)
        assert torch.equal(plan_max(x, R.max_pool_plan(x.shape, k, s, p, ceil_mode=ceil)),
                           F.max_pool2d(x, k, s, p, ceil_mode=ceil))
    for h, w, oh, ow in itertools.product((1, 2, 5, 7), (1, 3, 8), (1, 3, 7), (1, 4, 7)):
        x = torch.randn(1, 2, h, w)
        assert torch.equal(plan_max(x, R.adaptive_max_pool_plan(x.shape, (oh, ow))),
                           F.adaptive_max_pool2d(x, (oh, ow)))


# ------------------------------------------------------------------ compiled data movement

class _Movement(nn.Module):
    """Every data-movement construct once: channel shuffle, chunk, split, cat on H and W,
    permute, transpose, flatten of middle dims, squeeze/unsqueeze, unbind, adaptive pools
    that upsample, ceil-mode pools."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.up = nn.AdaptiveAvgPool2d((7, 5))
        self.amax = nn.AdaptiveMaxPool2d((3, 4))
        self.head = nn.Linear(8 * 3 * 4 + 8 * 7 * 5 * 2 + 4 * 4, 5)

    def forward(self, x):
        y = self.conv(x)                                   # [N, 8, 6, 6]
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        a, b = y.chunk(2, dim=1)
        y = torch.cat((b, a), dim=1)
        top, bottom = torch.split(y, [2, 4], dim=2)
        y = torch.cat([bottom, top], dim=2)
        p = F.avg_pool2d(self.pool(y), 2, ceil_mode=True)   # 6 -> 3 -> 2
        u = self.up(p)                                      # 2x2 -> 7x5: upsampling
        u = torch.cat([u, u.permute(0, 1, 3, 2).transpose(2, 3)], dim=3)
        m = self.amax(y)
        rows = torch.unbind(p.flatten(1, 2), dim=2)         # [N, 16, 2] -> 2 x [N, 16]
        s = (rows[0] - rows[1]).unsqueeze(2).unsqueeze(3).squeeze(3)
        z = torch.cat([m.flatten(1), u.reshape(n, -1), s.flatten(1)[:, :16]], dim=1)
        return self.head(z)


def test_data_movement_compiles_exactly_and_is_local():
    torch.manual_seed(0)
    model = _Movement().eval()
    program, weights = compile_model(model, (1, 3, 6, 6))
    ops = {layer.op for layer in program.layers}
    assert {"reshape", "permute", "slice", "concat", "resize", "max_pool",
            "adaptive_max_pool"} <= ops
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        assert _close(run_float(program, weights, x), model(x))


@pytest.mark.processes
def test_data_movement_runs_securely_over_tcp_with_no_bytes_of_its_own():
    torch.manual_seed(1)
    model = _Movement().eval()
    x = torch.randn(1, 3, 6, 6)
    res = run_local(model, x, None, tls=False, timeout=120)
    with torch.no_grad():
        ref = model(x).double()
    program, weights = compile_model(model, tuple(x.shape))
    bound = error_bound(program, weights, x, FRAC) + 1e-6 * (1 + ref.abs())
    assert bool(((res.outputs - ref).abs() <= bound).all())
    local = {"reshape", "permute", "slice", "concat", "resize", "flatten", "sub"}
    for layer in res.report["layers"]:
        if layer["op"] in local:
            assert layer["bytes"] == 0 and layer["rounds"] == 0, layer["name"]


@pytest.mark.parametrize("fn,words", [
    (lambda y: y.transpose(0, 1), ["transpose", "batch"]),
    (lambda y: y.chunk(2, dim=0)[0], ["chunk", "batch"]),
    (lambda y: torch.cat([y, y], dim=0), ["cat", "batch"]),
    (lambda y: y.reshape(-1, 4), ["reshape", "batch"]),
    (lambda y: y.flatten(1)[:, :4] * y.flatten(2)[:, :1, :4], ["a product", "batch"]),
])
def test_movement_across_the_batch_is_refused(fn, words):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return fn(self.conv(x))

    with pytest.raises(UnsupportedOperationError) as err:
        compile_model(M().eval(), (2, 3, 4, 4))
    for w in words:
        assert w in str(err.value), (w, str(err.value))
