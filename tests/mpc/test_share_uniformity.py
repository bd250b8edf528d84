"""A single party's view of a fixed secret is indistinguishable from uniform across runs.

For a fixed secret we collect one party's share over many independent sessions (fresh pair
keys each time) and test every bit position (binomial z-score) and every byte position
(256-bin chi-square) against uniform. Thresholds: |z| < 5.5 per bit and chi-square p > 1e-6
per byte: with 64 + 8 tests the chance of a false alarm is below 1e-5 per sample set, while a
genuinely biased share (negative control) fails at once.
"""
import functools

import numpy as np
import pytest
import torch
from scipy import stats as sps

from secure_inference.mpc import protocols as P
from secure_inference.mpc.ring import encode
from secure_inference.mpc.harness import run_in_process

RUNS, PER_RUN = 12, 2500


def uniformity_failures(samples: torch.Tensor) -> list[str]:
    """Bit-frequency and byte chi-square tests of int64 samples against uniform 64-bit words."""
    words = samples.reshape(-1).numpy().view(np.uint64)
    n = words.size
    failures = []
    for bit in range(64):
        ones = int(((words >> np.uint64(bit)) & np.uint64(1)).sum())
        z = (ones - n / 2) / np.sqrt(n / 4)
        if abs(z) >= 5.5:
            failures.append(f"bit {bit}: z = {z:.1f}")
    as_bytes = words.view(np.uint8).reshape(n, 8)
    for pos in range(8):
        counts = np.bincount(as_bytes[:, pos], minlength=256)
        p = sps.chisquare(counts).pvalue
        if p <= 1e-6:
            failures.append(f"byte {pos}: chi-square p = {p:.2e}")
    return failures


def _views(p, secret_client, secret_helper, x_plain, w):
    """One party's views of fixed secrets: input shares, and output shares of mul and conv."""
    n = secret_client.shape
    xs = P.share(p, secret_client if p.role == 0 else None, 0, n, scope="in-client")
    hs = P.share(p, secret_helper if p.role == 2 else None, 2, n, scope="in-helper")
    xi = P.share(p, x_plain if p.role == 0 else None, 0, x_plain.shape, scope="img")
    conv = P.conv2d(p, xi, w if p.role == 1 else None, None, weight_shape=w.shape, name="conv",
                    truncate=False)
    prod = P.mul(p, xs, xs, truncate=False)
    return {"client_input_at_P1": xs if p.role == 1 else None,
            "helper_input_at_P0": hs if p.role == 0 else None,
            "mul_output_at_P0": prod if p.role == 0 else None,
            "conv_output_at_P1": conv.reshape(-1) if p.role == 1 else None}


@pytest.fixture(scope="module")
def views():
    secret = torch.full((PER_RUN,), int(encode(torch.tensor(3.25))), dtype=torch.int64)
    helper_secret = torch.full((PER_RUN,), -(1 << 62) + 12345, dtype=torch.int64)
    x_plain = torch.full((1, 1, 50, 50), 7 << 16, dtype=torch.int64)   # fixed image
    w = torch.full((1, 1, 1, 1), 3 << 16, dtype=torch.int64)          # fixed weights
    fn = functools.partial(_views, secret_client=secret, secret_helper=helper_secret,
                           x_plain=x_plain, w=w)
    collected: dict[str, list[torch.Tensor]] = {}
    for _ in range(RUNS):  # independent sessions: fresh pair keys every run
        for res in run_in_process(fn):
            for k, v in res.items():
                if v is not None:
                    collected.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in collected.items()}


@pytest.mark.parametrize("view", ["client_input_at_P1", "helper_input_at_P0",
                                  "mul_output_at_P0", "conv_output_at_P1"])
def test_share_of_fixed_secret_is_uniform(views, view):
    samples = views[view]
    assert samples.numel() == RUNS * PER_RUN
    assert uniformity_failures(samples) == []


def test_negative_control_biased_shares_are_detected():
    from secure_inference.mpc import prg
    uniform = prg.private_stream().ring((RUNS * PER_RUN,))
    assert uniformity_failures(uniform) == []
    top_bit_cleared = uniform & ((1 << 63) - 1)          # one biased bit
    assert uniformity_failures(top_bit_cleared)
    small_noise = torch.full_like(uniform, 3 << 16) + prg.private_stream().below(uniform.shape, 256)
    assert len(uniformity_failures(small_noise)) > 50    # secret plus small noise: far from uniform
