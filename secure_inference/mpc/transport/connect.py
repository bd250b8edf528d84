"""Connection set-up: one authenticated link from this party to each of the two others.

:func:`connect_links` dials the parties above this one and accepts those below
(:mod:`.accept`); without TLS every address, this party's own listening address included,
must be loopback.
"""
from __future__ import annotations

import socket
import time

from ..errors import ProtocolError
from .accept import accept_peers
from .addresses import is_loopback
from .frames import DEFAULT_MAX_FRAME
from .handshake import dial_session
from .socket_link import SocketLink
from .tls import TLSConfig, check_own_certificate

__all__ = ["connect_links", "connect_session", "HANDSHAKE_TIMEOUT"]

HANDSHAKE_TIMEOUT = 5.0      # per incoming connection: TLS handshake and hello, in seconds


def connect_links(me: int, addresses: dict[int, tuple[str, int]], listener: socket.socket | None,
                  *, tls: TLSConfig | None, allow_plaintext: bool = False, timeout: float = 30.0,
                  max_frame: int = DEFAULT_MAX_FRAME, handshake_timeout: float | None = None,
                  max_queued: int | None = None) -> dict[int, SocketLink]:
    """Open one link to each other party (see :func:`connect_session`, without a session
    identifier: only one-shot peers)."""
    links, _ = connect_session(me, addresses, listener, tls=tls, allow_plaintext=allow_plaintext,
                               timeout=timeout, max_frame=max_frame,
                               handshake_timeout=handshake_timeout, max_queued=max_queued)
    return links


def connect_session(me: int, addresses: dict[int, tuple[str, int]],
                    listener: socket.socket | None, *, tls: TLSConfig | None,
                    allow_plaintext: bool = False, timeout: float = 30.0,
                    max_frame: int = DEFAULT_MAX_FRAME, handshake_timeout: float | None = None,
                    max_queued: int | None = None, session_id: bytes | None = None
                    ) -> tuple[dict[int, SocketLink], bytes | None]:
    """Open one link to each other party; returns the links and the session identifier if
    the dialled peers run as services (``--serve``), else None.

    ``session_id`` is offered only to a peer that answers as a service; every dialled peer
    must then be one (a mix of a service and a one-shot peer is a ProtocolError).

    Party ``i`` connects to every party ``j > i`` (at ``addresses[j]``) and accepts the parties
    ``j < i`` on ``listener``: the client (P0) only dials out, the helper (P2) only listens.
    Plaintext needs ``allow_plaintext=True`` and loopback addresses only.
    The listener keeps accepting until the expected authenticated parties arrive; each
    incoming connection has ``handshake_timeout`` seconds (default :data:`HANDSHAKE_TIMEOUT`)
    for its TLS handshake and hello, and a bad one is dropped with a warning on this module's
    logger. ``timeout`` bounds the whole set-up. ``max_queued``: see :class:`SocketLink`.
    """
    if tls is None:
        # every address, this party's own too: a plaintext listener on 0.0.0.0 would let any
        # host's unauthenticated hello take a party's role
        hosts = [h for _, (h, _) in sorted(addresses.items())]
        if listener is not None:
            hosts.append(str(listener.getsockname()[0]))
        if not allow_plaintext:
            raise ValueError("refusing plaintext links: pass TLS material, or allow_plaintext=True "
                             "for loopback tests")
        if not all(is_loopback(h) for h in hosts):
            raise ValueError(f"plaintext links are only allowed on loopback addresses (this "
                             f"party's listening address included), got {hosts}: use TLS "
                             "(--certs) for other addresses")
    else:
        check_own_certificate(me, tls)
    if handshake_timeout is None:
        handshake_timeout = HANDSHAKE_TIMEOUT
    deadline = time.monotonic() + timeout
    links: dict[int, SocketLink] = {}
    served: dict[int, bool] = {}

    def make_link(sock: socket.socket, peer: int) -> SocketLink:
        return SocketLink(sock, me, peer, max_frame, max_queued=max_queued)

    try:
        for peer in sorted(r for r in addresses if r > me):
            host, port = addresses[peer]
            while True:
                try:
                    raw = socket.create_connection(
                        (host, port), timeout=max(0.1, deadline - time.monotonic()))
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise ProtocolError(f"party {me}: cannot connect to party {peer} at "
                                            f"{host}:{port} within {timeout:g} s: {exc}") from exc
                    time.sleep(0.1)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(max(0.1, deadline - time.monotonic()))
            sock, _, served[peer] = dial_session(raw, me, peer, tls, host, session_id)
            links[peer] = make_link(sock, peer)
        lower = {r for r in addresses if r < me}
        if lower:
            if listener is None:
                raise ValueError(f"party {me} must listen for parties {sorted(lower)}")
            links.update(accept_peers(me, lower, listener, tls, deadline, timeout,
                                       handshake_timeout, make_link))
        if len(set(served.values())) > 1:
            kinds = ", ".join(f"party {p} {'runs' if v else 'does not run'} as a service"
                              for p, v in sorted(served.items()))
            raise ProtocolError(f"party {me}: {kinds}: start the server and the helper both "
                                "with --serve, or both without it")
    except BaseException:
        for link in links.values():
            link.close()
        raise
    return links, (session_id if any(served.values()) else None)
