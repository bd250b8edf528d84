"""The exact method's speed-ups against plain computations: the incremental conv update
(stride, dilation, asymmetric kernels, borders), merging of equal perturbations, NHWC rows and
BatchNorm folding (on a net with >= 16 channels, where they are on by default)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import random_images
from helpers.nets import init_net
from secure_inference import apply_block_spec, find_relu_sites
from secure_inference.distortion.api import site_candidates
from secure_inference.distortion.calls import trace_calls
from secure_inference.distortion.exact import exact_site_sums, plan_rows
from secure_inference.distortion.naive import naive_site_sums
from secure_inference.distortion.site_runner import SiteRunner
from secure_inference.distortion.site_runner import _conv_update


class WideNet(nn.Module):
    """16 channels (fast paths on by default): a stride-2 conv and a dilated conv after the
    sites, conv->BN pairs that fold, a shortcut conv, and one conv whose output is read both
    by its BN and by an add (must not fold)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.conv1 = nn.Conv2d(c, c, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(c)
        self.short = nn.Sequential(nn.Conv2d(c, c, 1, 2, bias=False), nn.BatchNorm2d(c))
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c, c, (1, 3), 1, (0, 1))
        self.bn3 = nn.BatchNorm2d(c)
        self.act3 = nn.ReLU()
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        a = self.stem(x)
        h = self.act1(self.bn1(self.conv1(a)))
        h = self.act2(self.bn2(self.conv2(h)) + self.short(a))
        r = self.conv3(h)
        h = self.act3(self.bn3(r) + 0.5 * r)
        return self.fc(h.mean(dim=(2, 3)))


def _samples(n: int = 3, hw: int = 11, seed: int = 0) -> torch.Tensor:
    return random_images(n, hw, seed)


def _float64_reference(model: nn.Module, x: torch.Tensor, site_name: str, channel: int,
                       size) -> float:
    """The distortion of one candidate, whole networks in float64 (no engine code)."""
    shape = tuple(x.shape[1:])
    site = {s.name: s for s in find_relu_sites(model, shape)}[site_name]
    rows = np.ones((site.channels, 2), np.int32)
    rows[channel] = size
    net = apply_block_spec(copy.deepcopy(model), {site_name: rows}, shape).eval().double()
    with torch.no_grad():
        y0, y1 = copy.deepcopy(model).double()(x.double()), net(x.double())
    return float((y1 - y0).pow(2).mean(dim=1).sum())


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), ((1, 3), (2, 1), (0, 1), 1), (1, 2, 0, 1),
    (3, 1, 0, 1), ((3, 5), 1, (2, 1), (1, 2)), (3, 1, "same", 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_incremental_conv_update_equals_conv(kernel, stride, padding, dilation, channels_last):
    """conv(x with one channel changed per row) == clean conv + update, for strided, dilated,
    asymmetric and unpadded convs on an odd-sized map (changes at the borders included)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 7, kernel, stride, padding, dilation)
    x = torch.randn(6, 5, 9, 11, generator=g)
    delta = torch.randn(6, 9, 11, generator=g)
    delta[:, 1:-1, 1:-1] = 0  # border-only changes: clipped windows
    delta[0] = torch.randn(9, 11, generator=g)
    chans = [0, 4, 2, 2, 1, 3]
    with torch.no_grad():
        clean = conv(x)
        if channels_last:
            clean = clean.contiguous(memory_format=torch.channels_last)
        moved = x.clone()
        moved[torch.arange(6), chans] += delta
        want = conv(moved)
        got = _conv_update(conv, clean, chans, delta)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_plan_rows_skips_zero_and_merges_equal_perturbations():
    base = torch.tensor([[[[1.0, 0.0]], [[2.0, 0.0]]],
                         [[[0.0, 3.0]], [[0.0, 0.0]]]])            # [n=2, Cc=2, 1, 2]
    pert = base.expand(4, -1, -1, -1, -1).clone()                   # [K=4, n, Cc, 1, 2]
    pert[1, 0, 0] = torch.tensor([1.0, -1.0])   # sample 0, channel 0: sizes 1 and 2 equal
    pert[2, 0, 0] = torch.tensor([1.0, -1.0])
    pert[3, 0, 0] = torch.tensor([0.5, 0.0])
    pert[1, 1, 1] = torch.tensor([-0.0, 0.0])   # -0.0 == 0.0: still a zero perturbation
    pert[2, 1, 0] = torch.tensor([1.0, -1.0])   # same values as sample 0's, other sample
    pert[3, 1, 0] = torch.tensor([1.0, -1.0])
    pert[2, 0, 1] = torch.tensor([2.0, -0.0])   # equal to base: zero
    plan = plan_rows(pert, base)
    slot = plan.slot
    assert slot.shape == (4, 2, 2)
    assert slot[0].eq(-1).all() and slot[1, 1, 1] == -1 and slot[2, 0, 1] == -1
    assert slot[1, 0, 0] == slot[2, 0, 0] != slot[3, 0, 0]
    assert slot[2, 1, 0] == slot[3, 1, 0] != slot[1, 0, 0]  # never merged across samples
    assert plan.rows == 3 == len(set(slot[slot >= 0].tolist()))
    for k, i, c in zip(*torch.nonzero(slot >= 0, as_tuple=True)):
        r = int(slot[k, i, c])
        assert (int(plan.sample[r]), int(plan.chan[r])) == (int(i), int(c))
        assert torch.equal(pert[plan.size[r], i, c], pert[k, i, c])
    assert plan_rows(pert, base, dedupe=False).rows == 5


def test_fast_paths_equal_naive_and_float64_on_wide_net():
    net = init_net(WideNet(), 0)
    x = _samples()
    shape = tuple(x.shape[1:])
    sites = find_relu_sites(net, shape)
    assert [s.name for s in sites] == ["stem.2", "act1", "act2", "act3"]
    calls = trace_calls(net, x[:1])
    for s in sites:
        sizes = site_candidates(s, max_rect=2, max_block_size=3)[0]
        chans = list(range(0, s.channels, 3))
        stats: dict = {}
        fast = exact_site_sums(net, calls, s, [x], chans, sizes, forward_batch=13, stats=stats)
        plain = exact_site_sums(net, calls, s, [x], chans, sizes, forward_batch=13,
                                channels_last=False, fold_bn=False, dedupe=False)
        naive = naive_site_sums(net, s, [x], chans, sizes, shape)
        assert naive.max() > 1e-6, s.name
        assert stats["rows_run"] <= stats["rows_nonzero"] <= stats["rows_total"]
        # float32 sums in another order (NHWC kernels, folded BN): float tolerance
        np.testing.assert_allclose(fast, naive, rtol=1e-4, atol=1e-9, err_msg=s.name)
        np.testing.assert_allclose(plain, naive, rtol=1e-5, atol=1e-9, err_msg=s.name)
        ci, k = int(np.argmax(naive.max(axis=1))), int(np.argmax(naive.max(axis=0)))
        ref = _float64_reference(net, x, s.name, chans[ci], sizes[k])
        assert fast[ci, k] == pytest.approx(ref, rel=1e-4), s.name
    runner = SiteRunner(net, calls, sites[0])
    folds = {calls[c].path: calls[b].path for c, b in runner.capture(x).folds.items()}
    # conv1 is updated incrementally (not folded); conv3's output is also read by the add
    assert folds == {"conv2": "bn2", "short.0": "short.1"}


def test_merging_finds_duplicates_with_large_blocks():
    """Large blocks that keep (or zero) a whole small map give equal perturbations: they run
    once and get the same distortion."""
    net = init_net(WideNet(), 1)
    x = _samples(2, hw=6, seed=3)
    site = find_relu_sites(net, tuple(x.shape[1:]))[2]  # act2: 3x3 map
    sizes = np.array([[1, 1], [3, 3], [3, 4], [4, 3], [0, 1], [2, 2]], np.int32)
    calls = trace_calls(net, x[:1])
    stats: dict = {}
    got = exact_site_sums(net, calls, site, [x], range(16), sizes, stats=stats)
    assert stats["rows_run"] < stats["rows_nonzero"]
    np.testing.assert_array_equal(got[:, 1], got[:, 2])  # [3,3] and [3,4] on a 3x3 map
    np.testing.assert_array_equal(got[:, 1], got[:, 3])
    naive = naive_site_sums(net, site, [x], range(16), sizes, tuple(x.shape[1:]))
    np.testing.assert_allclose(got, naive, rtol=1e-4, atol=1e-9)
