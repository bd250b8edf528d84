"""Parties of the three-party runtime, and harnesses that run a protocol in threads or processes.

Roles: P0 client (holds the image, learns the output), P1 server (holds the weights), P2 helper
(deals correlated randomness, sees only masked values). P0 and P1 hold additive shares over
Z_2^64 (int64 tensors); the helper holds no data: where a function takes or returns shares, P2
passes/gets a *shape-only* tensor (``device='meta'``, see :meth:`Party.placeholder`) so every
party runs the same shape logic. Fixed point: x_real ≈ x_int / 2^frac_bits.

A :class:`Party` sends and receives checked frames (:mod:`.transport.frames`), draws pairwise
correlated randomness (AES-CTR or ChaCha20 under keys agreed at session start, :mod:`.prg`;
the session's ``prg`` setting) and private randomness, and counts every byte and round per
scope.

Key agreement (at session start, over the link): each pair of parties runs X25519 (each side
sends a fresh 32-byte public key) and derives its 256-bit pair key with HKDF-SHA256 bound to
both roles and both public keys (and, in a service session, its identifier). Over TLS the exchange is also authenticated by the
certificates; on plaintext loopback links it resists passive eavesdroppers only.

Rounds are counted as message depth per scope (a Lamport clock restarted at every scope
entry): each frame carries the sender's depth in the current scope; receiving sets
``depth = max(depth, sender_depth + 1)``. The depth is the longest chain of messages inside
the scope, so a protocol that sends before it waits pays no extra round, and parties that
enter a scope at different times still agree. A scope's depth adds to its parent's after the
point where it started (sequential composition); the root's depth is the session's rounds.
``stats`` records, per scope, the depth reached on this party (summed over calls);
:func:`merge_stats` takes the maximum over parties.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import prg as _prg
from .backends import get_backend
from .settings import EXACT, DReLUConfig
from .session import ROLE_HELPER, ROLES, SCOPE_KEYS
from .stats import CommStats
from .errors import ProtocolError
from .options import SessionOptions
from .transport.frames import decode_frame, scope_hash
from .transport.link import Link

__all__ = ["Party", "PartyView", "OpenedWeights"]


@dataclass
class OpenedWeights:
    """One server-weight layer's weight-side tensor on this party, opened once per session:
    P0 holds F = W − B, P1 its encoded W, P2 the mask B. On P1 also the float tensor the
    encoding came from and its version counter, so an unmodified tensor is not re-encoded."""

    tensor: torch.Tensor
    source: torch.Tensor | None = None
    source_version: int | None = None


@dataclass
class PartyView:
    """Everything one party received (scope path, sender, tensor) and every pair-key draw it
    made (peer, scope path, tag, occurrence, tensor), in order. Test instrumentation only."""

    received: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)
    draws: list[tuple[int, str, str, int, torch.Tensor]] = field(default_factory=list)


class Party:
    """One party of a session: links to the two others, pair keys, randomness, statistics.

    Use ``with party.scope("conv1"):`` around every protocol step; scopes name the layer/op for
    the statistics and address the correlated randomness (``pair_random``).
    """

    def __init__(self, role: int, links: dict[int, Link], options: SessionOptions | None = None):
        """Party ``role`` on ``links`` with this session's ``options`` (fixed point, DReLU,
        cipher, timeout, frame limit, device, limits; default :class:`SessionOptions`())."""
        options = SessionOptions() if options is None else options
        frac_bits = options.frac_bits
        if role not in ROLES:
            raise ValueError(f"role must be 0, 1 or 2, got {role}")
        if sorted(links) != sorted(r for r in ROLES if r != role):
            raise ValueError(f"party {role} needs links to both other parties, got {sorted(links)}")
        if not 0 < frac_bits < 31:
            raise ValueError(f"frac_bits must be in [1, 30], got {frac_bits}")
        self.role = role
        self.options = options
        self.prg = _prg.check_cipher(options.prg)   # the cipher of every draw (a session setting)
        self.device = torch.device(options.device)
        self.frac_bits = frac_bits
        self.timeout = options.timeout
        self.max_frame = options.max_frame
        self.stats = CommStats()
        # this session's DReLU (None: exact); protocols.drelu.set_default_config may replace it
        self.drelu: DReLUConfig = options.drelu or EXACT
        self.weights: dict[str, OpenedWeights] = {}   # per server-weight layer, opened once
        self._links = links
        self._scope: list[str] = []
        self._scope_path = ""
        self._scope_hash = scope_hash("")
        self._pair_keys: dict[int, bytes] = {}
        self._draws: dict[tuple[int, str, str], int] = defaultdict(int)
        self._depth: list[list[int]] = [[0, 0]]  # per open scope: [parent depth at entry, depth]
        self._view: PartyView | None = None      # test hook: what this party receives and draws
        self.backend = get_backend(self.device)

    # --- session --------------------------------------------------------------------------
    def start(self) -> None:
        """Agree the pair keys with both peers (X25519 + HKDF); call once before any protocol."""
        with self.scope(SCOPE_KEYS):
            secrets = {p: X25519PrivateKey.generate() for p in self._links}
            pubs = {p: k.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
                    for p, k in secrets.items()}
            for p in sorted(self._links):
                self.send(p, torch.frombuffer(bytearray(pubs[p]), dtype=torch.uint8))
            for p in sorted(self._links):
                theirs = bytes(self.recv(p, (32,), torch.uint8).cpu().numpy().tobytes())
                try:
                    shared = secrets[p].exchange(X25519PublicKey.from_public_bytes(theirs))
                except ValueError as exc:
                    raise ProtocolError(f"party {self.role}: bad X25519 key from party {p}") from exc
                lo, hi = sorted((self.role, p))
                ordered = (pubs[p], theirs) if self.role == lo else (theirs, pubs[p])
                info = b"secure-inference pair key %d-%d" % (lo, hi) + ordered[0] + ordered[1]
                if self.options.session_id:   # a service session: keys bound to its identifier
                    info += b" session " + self.options.session_id
                self._pair_keys[p] = HKDF(algorithm=hashes.SHA256(), length=_prg.KEY_BYTES,
                                          salt=None, info=info).derive(shared)

    def close(self) -> None:
        """Close both links (a socket link waits briefly for the peer's goodbye)."""
        for link in self._links.values():
            link.close()

    # --- messages -------------------------------------------------------------------------
    def send(self, to: int, x: torch.Tensor) -> None:
        """Send one tensor to party ``to`` (framed, counted; does not wait for the peer)."""
        length = self._link(to).send_tensor(x, self._scope_hash, self._depth[-1][1],
                                            self.max_frame)
        st = self.stats.scopes[self._scope_path]
        payload = x.numel() * x.element_size()
        st.bytes_sent[to] += payload
        st.frames_sent[to] += 1
        st.overhead_sent += length - payload

    def recv(self, frm: int, shape, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Receive exactly one frame from ``frm``; it must hold ``dtype`` with ``shape``."""
        shape = tuple(int(s) for s in shape)
        body = self._link(frm).recv(self.timeout)
        frame = decode_frame(body, dtype=dtype, shape=shape, scope=self._scope_hash,
                             scope_name=self._scope_path, peer=frm, device=self.device)
        self._advance(frame.clock + 1)
        st = self.stats.scopes[self._scope_path]
        st.bytes_recv[frm] += frame.payload_bytes
        st.frames_recv[frm] += 1
        if self._view is not None:
            self._view.received.append((self._scope_path, frm, frame.tensor.detach().cpu().clone()))
        return frame.tensor

    def exchange(self, other: int, x: torch.Tensor) -> torch.Tensor:
        """Send ``x`` to ``other`` and receive its tensor of the same shape and dtype (one round)."""
        self.send(other, x)
        return self.recv(other, x.shape, x.dtype)

    @property
    def links(self) -> dict[int, Link]:
        """This party's links by peer role (a copy of the mapping)."""
        return dict(self._links)

    def wrap_links(self, wrap) -> None:
        """Replace every link by ``wrap(link)`` (before the session starts; e.g.
        :class:`~.netem.EmulatedLink` for a network emulation)."""
        self._links = {peer: wrap(link) for peer, link in self._links.items()}

    def _link(self, peer: int) -> Link:
        try:
            return self._links[peer]
        except KeyError:
            raise ValueError(f"party {self.role} has no link to party {peer}") from None

    # --- randomness -----------------------------------------------------------------------
    def pair_random(self, other: int, shape, *, tag: str, high: int | None = None,
                    dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Randomness identical at this party and ``other`` (both must call it).

        Addressed by (scope path, tag, n) where n counts earlier draws with the same scope and
        tag between this pair: independent of anything else either party draws. int64 uniform
        over the ring when ``high`` is None, else exactly uniform in [0, high); ``dtype=uint8``
        gives uniform bytes (``high`` then must be None).
        """
        stream, n = self._next_pair_stream(other, tag)
        out = self._draw(stream, shape, high, dtype)
        if self._view is not None:
            self._view.draws.append((other, self._scope_path, tag, n, out.detach().cpu().clone()))
        return out

    def pair_stream(self, other: int, *, tag: str) -> _prg.Stream:
        """The stream of the next draw with ``tag`` between this party and ``other``, to be read
        sequentially (both must call it and read the same byte counts in the same order).

        Addressed exactly like :meth:`pair_random` (one occurrence of (scope path, tag));
        for samplers that read a data-dependent amount, e.g. rejection sampling, which must
        not start a new stream (and wait for the host) per piece."""
        return self._next_pair_stream(other, tag)[0]

    def _next_pair_stream(self, other: int, tag: str) -> tuple[_prg.Stream, int]:
        """The stream of occurrence n of (scope path, tag) with ``other``, and n (counted)."""
        if other not in self._pair_keys:
            raise RuntimeError(f"no pair key with party {other}: call Party.start() first")
        key = (other, self._scope_path, tag)
        n = self._draws[key]
        self._draws[key] = n + 1
        return _prg.derive_stream(self._pair_keys[other], f"{self._scope_path}\x00{tag}\x00{n}",
                                  self.prg), n

    def private_random(self, shape, *, high: int | None = None,
                       dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Randomness known only to this party (the session's cipher under a fresh
        os.urandom key)."""
        return self._draw(_prg.private_stream(self.prg), shape, high, dtype)

    def _draw(self, stream: _prg.Stream, shape, high: int | None, dtype: torch.dtype):
        if dtype == torch.uint8:
            if high is None:
                return stream.bytes_tensor(shape, self.device)
            if high > 256:
                raise ValueError(f"high={high} does not fit uint8")
            return stream.below(shape, high, self.device).to(torch.uint8)
        if dtype != torch.int64:
            raise TypeError(f"random tensors are int64 or uint8, not {dtype}")
        if high is None:
            return stream.ring(shape, self.device)
        return stream.below(shape, high, self.device)

    # --- scopes and helpers ---------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Name the current layer/op (nestable) for statistics and randomness addressing."""
        if not name or "/" in name or "\x00" in name:
            raise ValueError(f"scope names are non-empty and contain no '/', got {name!r}")
        saved = (self._scope_path, self._scope_hash)
        self._scope.append(name)
        self._scope_path = "/".join(self._scope)
        self._scope_hash = scope_hash(self._scope_path)
        self._depth.append([self._depth[-1][1], 0])
        try:
            yield
        finally:
            st = self.stats.scopes[self._scope_path]
            st.rounds += self._depth.pop()[1]
            st.calls += 1
            self._scope.pop()
            self._scope_path, self._scope_hash = saved

    def _advance(self, depth: int) -> None:
        """A frame arrived at ``depth`` of the current scope: raise it and its parents'."""
        stack = self._depth
        stack[-1][1] = max(stack[-1][1], depth)
        for i in range(len(stack) - 1, 0, -1):
            stack[i - 1][1] = max(stack[i - 1][1], stack[i][0] + stack[i][1])
        self.stats.clock = stack[0][1]

    @property
    def scope_path(self) -> str:
        """The current '/'-joined scope path."""
        return self._scope_path

    @property
    def is_helper(self) -> bool:
        """True for P2, which holds no shares."""
        return self.role == ROLE_HELPER

    def placeholder(self, shape) -> torch.Tensor:
        """A shape-only int64 tensor: what the helper holds where P0/P1 hold shares."""
        return torch.empty(tuple(shape), dtype=torch.int64, device="meta")
