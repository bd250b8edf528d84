"""The per-connection handshake: TLS (if any) and the hello that names each side's role.

The dialler sends its hello first; the listener answers only once it has accepted the dialler
(certificate, role). :func:`dial_handshake` is the dialling side (errors are
:class:`~secure_inference.mpc.errors.ProtocolError`), :func:`admit_connection` the listening side
(a connection that is not an expected, authenticated party is :class:`Refused`).
"""
from __future__ import annotations

import re
import socket
import ssl
import struct
import time

from ..errors import ProtocolError
from ..session import PARTY_NAMES
from .tls import TLSConfig, peer_role_from_cert

__all__ = ["dial_handshake", "dial_session", "admit_connection", "Refused", "HELLO",
           "HELLO_MAGIC", "SERVE_MAGIC", "BUSY_MAGIC", "SESSION_ID_BYTES", "ID_ACCEPTED",
           "ID_REFUSED", "ID_FULL", "ID_BUSY", "printable"]

_HELLO = struct.Struct("<8sB")
_HELLO_MAGIC = b"SI-HELLO"
# service mode (docs/secure_inference.md, "Service mode"): a --serve listener answers a hello
# with SERVE_MAGIC, then reads the dialler's session identifier and answers one status byte;
# at its session limit it answers BUSY_MAGIC and closes. A one-shot listener answers HELLO.
HELLO = _HELLO
HELLO_MAGIC = _HELLO_MAGIC
SERVE_MAGIC = b"SI-SERVE"
BUSY_MAGIC = b"SI-BUSY!"
SESSION_ID_BYTES = 32          # 256 bits from os.urandom
# the status byte after the identifier: accepted; refused (reused, or already connected for
# that role); full (the helper holds as many sessions waiting for their other half as it
# allows); busy (the session would start, but every --max-sessions slot is taken)
ID_ACCEPTED, ID_REFUSED, ID_FULL, ID_BUSY = 0, 1, 2, 3

# C0 and C1 controls (newline, carriage return, escape, ...), DEL, and the Unicode line and
# paragraph separators and bidirectional overrides: what could forge or disguise a log line
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    ch = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(
        ch, f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def printable(text: str, limit: int | None = None) -> str:
    """``text`` (e.g. what a peer sent) safe to print on one line: control characters become
    visible escapes (a newline ``\\n``, ESC ``\\x1b``); ``limit``: at most that many
    characters of the result."""
    out = _CONTROLS.sub(_escape, text)
    return out if limit is None else out[:limit]


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Exactly ``n`` bytes; with ``deadline`` (monotonic) the whole read is bounded by it."""
    data = b""
    while len(data) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProtocolError("connection closed during the hello")
        data += chunk
    return data


def dial_handshake(sock: socket.socket, me: int, expected: int, tls: TLSConfig | None,
            host: str) -> tuple[socket.socket, int]:
    """Dialling side: TLS handshake (if any) and hello; returns the socket and the peer role.

    The dialler sends its hello first; the listener answers only once it has accepted the
    dialler (certificate, role), so a connection closed here means the listener refused us.
    """
    sock, peer, _ = dial_session(sock, me, expected, tls, host)
    return sock, peer


def dial_session(sock: socket.socket, me: int, expected: int, tls: TLSConfig | None,
                 host: str, session_id: bytes | None = None
                 ) -> tuple[socket.socket, int, bool]:
    """:func:`dial_handshake`, also for a ``--serve`` listener: returns the socket, the peer
    role and whether the peer is a service. A service gets ``session_id`` (refused without
    one) and must accept it; a service at its session limit is a "busy" ProtocolError."""
    if tls is not None:
        try:
            sock = tls.context(False).wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise ProtocolError(f"party {me}: TLS certificate of the peer at {host} was refused: "
                                f"{exc.verify_message} (is it signed by this session's CA, and "
                                "does its SAN list name this host?)") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise ProtocolError(f"party {me}: the program at {host} accepted the connection "
                                f"but did not complete a TLS handshake in time: it is probably "
                                f"not party {expected} (another program may hold that port: "
                                "check the address, or whether the port is in use there)") \
                from exc
        except (ssl.SSLError, OSError) as exc:
            raise ProtocolError(f"party {me}: TLS handshake with {host} failed: {exc} (the peer "
                                "may have refused our certificate: both sides need certificates "
                                "from the same CA; or the program there is not party "
                                f"{expected})") from exc
    try:
        sock.sendall(_HELLO.pack(_HELLO_MAGIC, me))
        magic, peer = _HELLO.unpack(_recv_exact(sock, _HELLO.size))
    except ProtocolError as exc:
        raise ProtocolError(f"party {me}: party {expected} at {host} closed the connection "
                            "during the hello: it refused this party (our certificate names "
                            "another party or comes from another CA, or it does not expect "
                            f"party {me}); its log says why") from exc
    except ssl.SSLError as exc:
        raise ProtocolError(f"party {me}: TLS failed after the handshake with {host}: {exc} "
                            "(the peer refused our certificate?)") from exc
    except OSError as exc:
        raise ProtocolError(f"party {me}: hello with {host} failed: {exc}") from exc
    served, busy = magic == SERVE_MAGIC, magic == BUSY_MAGIC
    if magic not in (_HELLO_MAGIC, SERVE_MAGIC, BUSY_MAGIC) or peer not in PARTY_NAMES:
        raise ProtocolError(f"party {me}: peer at {host} is not a secure-inference party")
    if peer != expected:
        raise ProtocolError(f"party {me}: expected party {expected} at {host}, it says {peer}")
    # the role before the busy answer: only the real party may tell this one to go away
    if tls is not None and peer_role_from_cert(sock) != peer:
        raise ProtocolError(f"party {me}: peer says it is party {peer} but its certificate "
                            "belongs to another party")
    if busy:
        raise ProtocolError(f"party {me}: party {expected} at {host} is busy: it runs as many "
                            "sessions as its --max-sessions allows; try again later")
    if served:
        if session_id is None:
            raise ProtocolError(f"party {me}: party {peer} at {host} runs as a service "
                                "(--serve); run this party with --serve too, or that one "
                                "without it")
        try:
            sock.sendall(session_id)
            status = _recv_exact(sock, 1)[0]
        except (ProtocolError, OSError) as exc:
            raise ProtocolError(f"party {me}: party {peer} at {host} closed the connection "
                                "after the hello: it refused this session") from exc
        if status == ID_FULL:
            raise ProtocolError(f"party {me}: party {peer} at {host} is busy: it holds as many "
                                "sessions waiting for their other party as it allows (for "
                                "this address, or in all); try again later")
        if status == ID_BUSY:
            raise ProtocolError(f"party {me}: party {peer} at {host} is busy: it runs as many "
                                "sessions as its --max-sessions allows; try again later")
        if status != ID_ACCEPTED:
            raise ProtocolError(f"party {me}: party {peer} at {host} refused the session "
                                "identifier (reused or already connected)")
    return sock, peer, served


class Refused(Exception):
    """An incoming connection that is not an expected, authenticated party (dropped)."""


def admit_connection(raw: socket.socket, me: int, wanted: set[int], ctx: ssl.SSLContext | None,
           limit: float) -> tuple[socket.socket, int]:
    """Listening side, one incoming connection: TLS handshake (if any), the dialler's hello,
    checks, then our hello; all within ``limit`` seconds. Raises :class:`Refused`."""
    deadline = time.monotonic() + limit
    sock = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(limit)
        if ctx is not None:
            sock = ctx.wrap_socket(raw, server_side=True)  # the socket timeout bounds it all
        magic, peer = _HELLO.unpack(_recv_exact(sock, _HELLO.size, deadline))
        if magic != _HELLO_MAGIC or peer not in PARTY_NAMES:
            raise Refused("not a secure-inference party (bad hello)")
        if peer not in wanted:
            raise Refused(f"says it is party {peer}, but party {me} accepts only parties "
                           f"{sorted(wanted)}")
        if ctx is not None:
            try:
                cert_role = peer_role_from_cert(sock)
            except ProtocolError as exc:
                raise Refused(str(exc)) from None
            if cert_role != peer:
                raise Refused(f"says it is party {peer} but its certificate belongs to party "
                               f"{cert_role}")
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(_HELLO.pack(_HELLO_MAGIC, me))
        return sock, peer
    except BaseException as exc:
        try:
            sock.close()
        except OSError:
            pass
        if isinstance(exc, Refused):
            raise
        if isinstance(exc, (socket.timeout, TimeoutError)) or time.monotonic() >= deadline:
            raise Refused(f"no complete TLS handshake and hello within {limit:g} s "
                           "(silent or too slow)") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise Refused(f"TLS certificate refused: {exc.verify_message} (not signed by this "
                           "session's CA?)") from None
        if isinstance(exc, (ssl.SSLError, OSError, ProtocolError)):
            raise Refused(f"TLS handshake or hello failed: {exc}") from None
        raise
