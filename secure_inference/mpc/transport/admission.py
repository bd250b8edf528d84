"""A service's listening side of the handshake, without threads: one non-blocking
:class:`Admission` per incoming connection (TLS handshake, the dialler's hello, the service
answer, the session identifier, a status byte), advanced by the service's selector loop.

A ``--serve`` parent forks its session processes, so it runs no threads of its own: a
silent, slow or hostile connection costs it a socket and a few bytes until its deadline,
never a blocked loop. Every byte read is checked before the next step (fixed sizes only).
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Callable

from ..errors import ProtocolError
from ..session import PARTY_NAMES
from .handshake import (BUSY_MAGIC, HELLO, HELLO_MAGIC, ID_ACCEPTED, ID_BUSY, ID_FULL,
                        ID_REFUSED, SERVE_MAGIC, SESSION_ID_BYTES, Refused)
from .tls import peer_role_from_cert

__all__ = ["Admission", "WANT_READ", "WANT_WRITE"]

WANT_READ, WANT_WRITE = "read", "write"
_REFUSALS = {ID_REFUSED: "reused or already connected session identifier",
             ID_FULL: "answered full: too many sessions wait for their other party (from this "
                      "address, or in all)",
             ID_BUSY: "answered busy: its session found no free slot (--max-sessions)"}


class Admission:
    """One incoming connection of a service, from accept to its session identifier.

    Call :meth:`step` when its socket is ready (and once after creating it); it returns
    :data:`WANT_READ`/:data:`WANT_WRITE`, or None once the connection is admitted
    (:attr:`peer`, :attr:`session_id` set, :attr:`admitted` True) or finished (a busy
    answer sent). A connection that is not an expected, authenticated party, or whose
    identifier is not accepted, raises :class:`~.handshake.Refused` (:attr:`status` says why).
    ``decide_busy()`` is asked after the hello (True: answer busy); ``check_id(admission)``
    after the identifier: it returns the status byte to answer (``ID_ACCEPTED``, or
    ``ID_REFUSED``/``ID_FULL``/``ID_BUSY``) and may reserve the identifier at once.
    """

    def __init__(self, raw: socket.socket, addr, me: int, wanted: set[int],
                 ctx: ssl.SSLContext | None, limit: float):
        raw.setblocking(False)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.addr = addr
        self.me, self.wanted = me, wanted
        self.deadline = time.monotonic() + limit
        self.sock: socket.socket = (ctx.wrap_socket(raw, server_side=True,
                                                    do_handshake_on_connect=False)
                                    if ctx is not None else raw)
        self._tls = ctx is not None
        self._stage = "tls" if self._tls else "hello"
        self._in = b""
        self._out = b""
        self._after_write = ""
        self.peer: int | None = None
        self.session_id: bytes | None = None
        self.status: int | None = None       # the status byte answered to the identifier
        self.admitted = False
        self.busy = False

    def fileno(self) -> int:
        """The socket's descriptor (for selectors)."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the connection (no TLS goodbye: a forked session may own it now)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self, n: int) -> bool:
        while len(self._in) < n:
            chunk = self.sock.recv(n - len(self._in))
            if not chunk:
                raise Refused("closed the connection during the hello")
            self._in += chunk
        return True

    def step(self, decide_busy: Callable[[], bool],
             check_id: Callable[["Admission"], int]) -> str | None:
        """Advance as far as the socket allows (see the class docstring)."""
        try:
            while True:
                if self._out:
                    sent = self.sock.send(self._out)
                    self._out = self._out[sent:]
                    if self._out:
                        continue
                    self._stage = self._after_write
                if self._stage == "tls":
                    self.sock.do_handshake()
                    self._stage = "hello"
                elif self._stage == "hello":
                    self._read(HELLO.size)
                    magic, peer = HELLO.unpack(self._in)
                    self._in = b""
                    self._check_hello(magic, peer)
                    self.busy = bool(decide_busy())
                    self._out = HELLO.pack(BUSY_MAGIC if self.busy else SERVE_MAGIC, self.me)
                    self._after_write = "done" if self.busy else "id"
                elif self._stage == "id":
                    self._read(SESSION_ID_BYTES)
                    self.session_id, self._in = self._in, b""
                    self.status = int(check_id(self))
                    self._out = bytes([self.status])
                    self._after_write = "done" if self.status == ID_ACCEPTED else "refused"
                elif self._stage == "refused":
                    raise Refused(_REFUSALS.get(self.status, "session identifier refused"))
                else:
                    self.admitted = self.peer is not None and not self.busy
                    return None
        except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
            return WANT_READ
        except ssl.SSLWantWriteError:
            return WANT_WRITE
        except Refused:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise Refused(f"TLS certificate refused: {exc.verify_message}") from None
        except (ssl.SSLError, OSError, ProtocolError) as exc:
            raise Refused(f"TLS handshake or hello failed: {exc}") from None

    def _check_hello(self, magic: bytes, peer: int) -> None:
        if magic != HELLO_MAGIC or peer not in PARTY_NAMES:
            raise Refused("not a secure-inference party (bad hello)")
        if peer not in self.wanted:
            raise Refused(f"says it is party {peer}, but party {self.me} accepts only parties "
                          f"{sorted(self.wanted)}")
        if self._tls:
            try:
                cert_role = peer_role_from_cert(self.sock)
            except ProtocolError as exc:
                raise Refused(str(exc)) from None
            if cert_role != peer:
                raise Refused(f"says it is party {peer} but its certificate belongs to party "
                              f"{cert_role}")
        self.peer = peer
