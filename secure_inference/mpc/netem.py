"""Network profiles: the time a run's bytes and rounds would take on a named network, and an
emulated link that makes a local run take it.

Estimate (:func:`estimate_seconds`), per image:

    seconds = compute + bytes / bandwidth + rounds × RTT

``compute`` is the measured time on this machine's loopback (preprocessing + online),
``bytes`` every party's payload summed (as if all three links shared one link of that
bandwidth: an upper bound, the three pairs' links run in parallel on real hosts), ``rounds``
the run's sequential message rounds (online and preprocessing) amortised over the batch.

Emulation (:class:`EmulatedLink`): each party delays the frames it receives as a link of the
profile's bandwidth and one-way delay RTT/2 would: a frame that reaches the receiver at time t
is handed over at ``max(t, link free) + size / bandwidth + RTT/2`` (the link is busy with one
frame at a time). It runs on the receiving side only, so nothing on the wire changes and the
parties need not agree on it; it adds to whatever the real link costs (on loopback: ~0).
Its purpose is checking the estimate against a measured run (``run_local(network=...)``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

PREFIX_BYTES = 4   # each frame's length prefix (the body holds header, shape and payload)

__all__ = ["NetworkProfile", "NETWORKS", "network_profile", "estimate_seconds",
           "network_estimates", "EmulatedLink"]


@dataclass(frozen=True)
class NetworkProfile:
    """A network by its bandwidth (bits per second) and round-trip time (seconds)."""

    name: str
    bandwidth_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        if not (self.bandwidth_bps > 0 and self.rtt_s >= 0):
            raise ValueError(f"network {self.name!r}: bandwidth must be > 0 and RTT >= 0")

    def describe(self) -> str:
        bw = (f"{self.bandwidth_bps / 1e9:g} Gbit/s" if self.bandwidth_bps >= 1e9
              else f"{self.bandwidth_bps / 1e6:g} Mbit/s")
        return f"{self.name}: {bw}, {self.rtt_s * 1e3:g} ms RTT"


NETWORKS: dict[str, NetworkProfile] = {p.name: p for p in (
    NetworkProfile("LAN", 10e9, 0.2e-3),
    NetworkProfile("WAN-40ms", 100e6, 40e-3),
    NetworkProfile("WAN-80ms", 100e6, 80e-3),
)}
"""The profiles reports use: a 10 Gbit/s LAN with 0.2 ms RTT, and a 100 Mbit/s WAN with 40
or 80 ms RTT (the settings private-inference papers commonly report)."""


def network_profile(spec: str | NetworkProfile) -> NetworkProfile:
    """A profile by name (:data:`NETWORKS`, case-insensitive) or as ``MBITS:RTT_MS``
    (e.g. ``100:40``)."""
    if isinstance(spec, NetworkProfile):
        return spec
    for name, profile in NETWORKS.items():
        if name.lower() == str(spec).lower():
            return profile
    mbit, sep, rtt = str(spec).partition(":")
    try:
        if sep:
            return NetworkProfile(f"{mbit}Mbit-{rtt}ms", float(mbit) * 1e6, float(rtt) / 1e3)
    except ValueError:
        pass
    raise ValueError(f"unknown network {spec!r}: use one of {', '.join(NETWORKS)} or "
                     "MBITS:RTT_MS (e.g. 100:40)")


def estimate_seconds(profile: NetworkProfile, compute_s: float, bytes_: float,
                     rounds: float) -> float:
    """compute + bytes / bandwidth + rounds × RTT (see the module docstring)."""
    return compute_s + 8.0 * bytes_ / profile.bandwidth_bps + rounds * profile.rtt_s


def network_estimates(per_image_seconds: float, per_image_bytes: float,
                      per_image_rounds: float,
                      profiles: Mapping[str, NetworkProfile] = NETWORKS) -> dict:
    """Seconds per image on each profile, with the parts of the model."""
    out = {}
    for name, p in profiles.items():
        wire = 8.0 * per_image_bytes / p.bandwidth_bps
        latency = per_image_rounds * p.rtt_s
        out[name] = {"seconds_per_image": estimate_seconds(p, per_image_seconds,
                                                           per_image_bytes, per_image_rounds),
                     "compute_s": per_image_seconds, "bandwidth_s": wire, "latency_s": latency,
                     "profile": p.describe()}
    return out


class EmulatedLink:
    """A link whose received frames arrive as over ``profile`` (module docstring); every
    other attribute is the wrapped link's. ``clock``/``sleep`` are for tests."""

    def __init__(self, link, profile: NetworkProfile, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._inner = link
        self._profile = profile
        self._clock, self._sleep = clock, sleep
        self._free_at = 0.0

    def recv(self, timeout: float) -> bytes:
        body = self._inner.recv(timeout)
        now = self._clock()
        start = max(now, self._free_at)
        self._free_at = start + 8.0 * (len(body) + PREFIX_BYTES) / self._profile.bandwidth_bps
        deliver = self._free_at + self._profile.rtt_s / 2
        if deliver > now:
            self._sleep(deliver - now)
        return body

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
