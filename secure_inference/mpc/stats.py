"""Traffic statistics of one party: bytes, frames and rounds per statistics scope.

Rounds are counted as message depth per scope (a Lamport clock restarted at every scope
entry, see :mod:`.runtime`); :func:`merge_stats` combines the three parties' views.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScopeStats", "CommStats", "merge_stats"]


@dataclass
class ScopeStats:
    """Traffic of one party in one scope (bytes are payload bytes: 8 per ring element)."""

    bytes_sent: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_recv: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    frames_sent: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    frames_recv: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    overhead_sent: int = 0          # frame headers and length prefixes
    rounds: int = 0                 # message depth inside the scope (summed over calls)
    calls: int = 0

    @property
    def sent(self) -> int:
        """Payload bytes sent to all peers."""
        return sum(self.bytes_sent.values())

    @property
    def received(self) -> int:
        """Payload bytes received from all peers."""
        return sum(self.bytes_recv.values())

    def add(self, other: "ScopeStats", *, rounds: bool = True) -> None:
        """Accumulate ``other`` into this record."""
        for mine, theirs in ((self.bytes_sent, other.bytes_sent), (self.bytes_recv, other.bytes_recv),
                             (self.frames_sent, other.frames_sent),
                             (self.frames_recv, other.frames_recv)):
            for k, v in theirs.items():
                mine[k] += v
        self.overhead_sent += other.overhead_sent
        if rounds:
            self.rounds += other.rounds
            self.calls += other.calls

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict view (JSON friendly)."""
        return {"bytes_sent": dict(self.bytes_sent), "bytes_recv": dict(self.bytes_recv),
                "frames_sent": dict(self.frames_sent), "frames_recv": dict(self.frames_recv),
                "overhead_sent": self.overhead_sent, "rounds": self.rounds, "calls": self.calls}


class CommStats:
    """Per-scope traffic of one party; scopes are '/'-joined paths ('' is the session root)."""

    def __init__(self) -> None:
        self.scopes: dict[str, ScopeStats] = defaultdict(ScopeStats)
        self.clock = 0

    def total(self, scope: str = "") -> ScopeStats:
        """Bytes/frames in ``scope`` and all scopes under it; rounds of ``scope`` itself
        (the whole session's depth for the root)."""
        out = ScopeStats()
        for path, st in self.scopes.items():
            if scope == "" or path == scope or path.startswith(scope + "/"):
                out.add(st, rounds=False)
        if scope == "":
            out.rounds, out.calls = self.clock, 1
        elif scope in self.scopes:
            out.rounds, out.calls = self.scopes[scope].rounds, self.scopes[scope].calls
        return out

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain-dict view of every scope."""
        return {k: v.as_dict() for k, v in self.scopes.items()}


def merge_stats(stats: list[CommStats], scope: str = "") -> dict[str, int]:
    """Combine the three parties' view of ``scope``: total bytes sent by all parties, bytes on
    each directed link, and rounds (the maximum depth over parties)."""
    out: dict[str, int] = {"bytes": 0, "frames": 0, "rounds": 0}
    for role, st in enumerate(stats):
        t = st.total(scope)
        out["bytes"] += t.sent
        out["frames"] += sum(t.frames_sent.values())
        out["rounds"] = max(out["rounds"], t.rounds)
        for peer, b in t.bytes_sent.items():
            out[f"bytes_{role}->{peer}"] = out.get(f"bytes_{role}->{peer}", 0) + b
    return out
