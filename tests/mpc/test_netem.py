"""Network profiles: the estimate's arithmetic, the emulated link's schedule (a fake clock:
no timing in tests), and a secure run whose report carries the estimates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from secure_inference.mpc.local import run_local
from secure_inference.mpc.netem import (NETWORKS, EmulatedLink, NetworkProfile,
                                        estimate_seconds, network_profile)


class _FakeLink:
    def __init__(self, sizes):
        self.sizes = list(sizes)
        self.closed = False

    def recv(self, timeout):
        return b"x" * self.sizes.pop(0)

    def close(self):
        self.closed = True


class _Clock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def now(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_emulated_link_delivers_as_bandwidth_and_delay_say():
    profile = NetworkProfile("test", 8e6, 0.010)          # 1 MB/s, 5 ms one way
    clock = _Clock()
    link = EmulatedLink(_FakeLink([996, 1996]), profile, clock=clock.now, sleep=clock.sleep)
    link.recv(1.0)                                        # 1000 bytes on the wire: 1 ms
    assert clock.t == pytest.approx(0.001 + 0.005)
    link.recv(1.0)      # arrives at 6 ms, link free: 2000 bytes → 2 ms, + 5 ms
    assert clock.t == pytest.approx(0.006 + 0.002 + 0.005)
    link.close()                                          # everything else is the link's
    assert link._inner.closed


def test_emulated_link_queues_frames_behind_each_other():
    profile = NetworkProfile("test", 8e6, 0.0)
    clock = _Clock()
    link = EmulatedLink(_FakeLink([996, 996]), profile, clock=clock.now,
                        sleep=lambda s: None)               # the receiver does not wait
    link.recv(1.0)
    link.recv(1.0)                                        # both arrived at t = 0
    assert link._free_at == pytest.approx(0.002)          # the second waited for the first


def test_profiles_and_the_estimate():
    assert network_profile("lan") is NETWORKS["LAN"]
    p = network_profile("100:40")
    assert p.bandwidth_bps == 100e6 and p.rtt_s == pytest.approx(0.040)
    assert estimate_seconds(p, 1.0, 12.5e6, 10) == pytest.approx(1.0 + 1.0 + 0.4)
    with pytest.raises(ValueError, match="unknown network"):
        network_profile("carrier-pigeon")


def test_report_carries_the_estimates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    res = run_local(model, torch.randn(2, 3, 8, 8), in_process=True, batch_size=2,
                    network="1000:1")
    rep = res.report
    nets = rep["networks"]
    per = rep["per_image"]
    rounds = (rep["online"]["rounds"] + rep["preprocess"]["rounds"]) / 2
    assert nets["rounds_per_image"] == rounds > 0
    wan = nets["WAN-40ms"]
    assert wan["seconds_per_image"] == pytest.approx(
        per["seconds_preprocess_and_online"] + 8 * per["bytes_preprocess_and_online"] / 100e6
        + rounds * 0.040)
    assert rep["meta"]["emulated_network"].startswith("1000Mbit-1ms")
    assert "totals over all images" in rep["what"]["layers"]
