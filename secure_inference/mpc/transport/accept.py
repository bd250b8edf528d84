"""The listening side of the connection set-up: accept until the expected peers arrived.

Every incoming connection gets its own bounded TLS handshake and hello
(:data:`~.connect.HANDSHAKE_TIMEOUT` s by default) in its own thread (at most
:data:`MAX_PENDING` at once), so a port scan, a silent connection, garbage bytes, a
certificate from another CA or a certificate that names another party is dropped with a
warning on the ``secure_inference.mpc.transport`` logger and neither stops the session nor
uses up its timeout.
"""
from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from typing import Callable

from ..errors import ProtocolError
from ..session import PARTY_NAMES
from .addresses import is_loopback
from .handshake import Refused, admit_connection
from .socket_link import SocketLink
from .tls import TLSConfig

__all__ = ["accept_peers", "MAX_PENDING", "logger"]

MAX_PENDING = 16             # incoming connections in their handshake at once (more wait)
# the logger the documentation names (docs/faults_and_limits.md), whatever module logs
logger = logging.getLogger("secure_inference.mpc.transport")


def _roles(roles) -> str:
    return " and ".join(f"party {r} ({PARTY_NAMES[r]})" for r in sorted(roles))


def accept_peers(me: int, wanted: set[int], listener: socket.socket, tls: TLSConfig | None,
                  deadline: float, timeout: float, handshake_timeout: float,
                  make_link: Callable[[socket.socket, int], "SocketLink"]) -> dict[int, "SocketLink"]:
    """Accept connections on ``listener`` until every party in ``wanted`` has arrived.

    Each connection is admitted in its own thread (at most :data:`MAX_PENDING` at once) with
    its own ``handshake_timeout``; a connection that is refused is closed and logged, and the
    others go on. Only the session ``deadline`` (no legitimate peer) is an error.
    """
    ctx = tls.context(True) if tls is not None else None
    host, port = listener.getsockname()[:2]
    where = f"{host}:{port}"
    results: queue.Queue = queue.Queue()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    lock = threading.Lock()
    state = {"done": False, "pending": 0}
    dropped: list[str] = []
    links: dict[int, SocketLink] = {}

    def admit(raw: socket.socket, addr) -> None:
        try:
            if ctx is None and not is_loopback(str(addr[0])):
                # without TLS nothing authenticates a hello: only this machine may speak
                raise Refused(f"plaintext connection from {addr[0]} refused: without TLS "
                               "only loopback peers are accepted")
            sock, peer = admit_connection(raw, me, wanted, ctx,
                                max(0.001, min(handshake_timeout, deadline - time.monotonic())))
            outcome = (addr, sock, peer, None)
        except Refused as exc:
            outcome = (addr, None, None, str(exc))
        except BaseException as exc:  # noqa: BLE001 - never lose a connection's outcome
            outcome = (addr, None, None, f"{type(exc).__name__}: {exc}")
        with lock:
            state["pending"] -= 1
            if state["done"]:          # the session no longer waits: drop it quietly
                if outcome[1] is not None:
                    outcome[1].close()
                return
            results.put(outcome)
        try:
            wake_w.send(b"\0")
        except OSError:
            pass

    sel = selectors.DefaultSelector()
    listener_blocking = listener.getblocking()
    listener.setblocking(False)
    sel.register(wake_r, selectors.EVENT_READ)
    listening = False
    try:
        while wanted - set(links):
            with lock:
                room = state["pending"] < MAX_PENDING
            if room and not listening:
                sel.register(listener, selectors.EVENT_READ)
            elif listening and not room:   # at the cap, new connections wait in the backlog
                sel.unregister(listener)
            listening = room
            left = deadline - time.monotonic()
            if left <= 0:
                missing = wanted - set(links)
                extra = ""
                if dropped:
                    extra = (f"; {len(dropped)} other connection(s) were dropped, the last one "
                             f"{dropped[-1]}")
                raise ProtocolError(
                    f"party {me} ({PARTY_NAMES[me]}): {_roles(missing)} never arrived: no "
                    f"authenticated connection on {where} within {timeout:g} s{extra}. Start "
                    f"{'them' if len(missing) > 1 else 'it'} with certificates from this "
                    f"session's CA, dialling {where} (check the address, port and firewall), "
                    "or raise --timeout")
            for key, _ in sel.select(timeout=min(left, 1.0)):
                if key.fileobj is wake_r:
                    try:
                        while wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                try:
                    raw, addr = listener.accept()
                except (BlockingIOError, InterruptedError, socket.timeout):
                    continue
                except OSError as exc:  # e.g. out of file descriptors: keep listening
                    logger.warning("party %d: accept on %s failed: %s", me, where, exc)
                    time.sleep(0.05)
                    continue
                with lock:
                    state["pending"] += 1
                threading.Thread(target=admit, args=(raw, addr), daemon=True,
                                 name=f"admit-{me}-{addr[0]}:{addr[1]}").start()
            while True:
                try:
                    addr, sock, peer, reason = results.get_nowait()
                except queue.Empty:
                    break
                peer_at = f"connection from {addr[0]}:{addr[1]}"
                if sock is not None and peer in links:
                    sock.close()
                    reason = f"says it is party {peer}, which is already connected"
                if sock is None or reason is not None:
                    dropped.append(f"({peer_at}): {reason}")
                    logger.warning("party %d (%s) on %s: dropped the %s: %s", me,
                                   PARTY_NAMES[me], where, peer_at, reason)
                    continue
                logger.info("party %d (%s) on %s: party %d (%s) connected from %s:%d", me,
                            PARTY_NAMES[me], where, peer, PARTY_NAMES[peer], addr[0], addr[1])
                links[peer] = make_link(sock, peer)
    except BaseException:
        for link in links.values():
            link.close()
        raise
    finally:
        with lock:
            state["done"] = True
        while True:   # admitted after the end (or before an error): close them
            try:
                leftover = results.get_nowait()
            except queue.Empty:
                break
            if leftover[1] is not None:
                leftover[1].close()
        sel.close()
        for s in (wake_r, wake_w):
            s.close()
        try:
            listener.setblocking(listener_blocking)
        except OSError:
            pass
    return links
