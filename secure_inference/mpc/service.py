"""Service mode: a listening party (server or helper) that serves many sessions, each in its own
process forked from the warm parent (model loaded and compiled once).

The parent runs no threads: a selector loop admits connections (:mod:`.transport.admission`),
pairs the helper's two connections of a session by their identifier, forks one process per
session, reaps it and logs one line per session. A session's crash, hostile input or memory
ends that process only (and a failed fork only that session). Bounded: connections in their
handshake (in all and per source address), the helper's sessions waiting for their other half
(per role, per client address, and for ``pair_timeout`` seconds each). Signals: the first
SIGTERM/SIGINT stops accepting and lets running sessions finish within the grace period
(exit 0); a second one, or the end of the grace period, kills every session process (exit 1).
docs/secure_inference.md, "Service mode".
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import ssl
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .transport.admission import WANT_WRITE, Admission
from .transport.handshake import ID_ACCEPTED, ID_BUSY, ID_FULL, ID_REFUSED, Refused, printable

__all__ = ["ServiceSettings", "serve", "half_session_caps", "DEFAULT_MAX_SESSIONS",
           "DEFAULT_MAX_SESSION_SECONDS", "DEFAULT_GRACE_SECONDS", "DEFAULT_SETUP_SECONDS"]

DEFAULT_MAX_SESSIONS = 4
DEFAULT_MAX_SESSION_SECONDS = 3600.0
DEFAULT_GRACE_SECONDS = 60.0
# a session's set-up: the helper pairs its two halves, and the session completes its key
# agreement, header check and batch announcement, within this many seconds (--setup-seconds)
DEFAULT_SETUP_SECONDS = 10.0
MAX_ADMISSIONS = 64             # connections in their handshake at once (more wait in backlog)
MAX_ADMISSIONS_PER_ADDRESS = MAX_ADMISSIONS // 4   # of them from one source address
MAX_USED_IDS = 1 << 20          # identifiers remembered as used (refused if they come back)
_SUMMARY_BYTES = 1 << 16        # most bytes of a session's summary the parent reads

SessionFn = Callable[[dict[int, socket.socket], bytes], dict[str, Any]]


@dataclass(frozen=True)
class ServiceSettings:
    """How a service runs: its name in logs, its role, whom it admits, its limits."""

    name: str
    role: int
    wanted: frozenset[int]
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_session_seconds: float = DEFAULT_MAX_SESSION_SECONDS
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    handshake_timeout: float = 5.0
    pair_timeout: float = DEFAULT_SETUP_SECONDS
    log_json: bool = False


def half_session_caps(max_sessions: int) -> tuple[int, int]:
    """The helper's caps on sessions waiting for their other half: how many may wait for
    each role (client halves and server halves are counted apart, so clients never block the
    server), and how many client halves one source address may hold."""
    return 2 * max_sessions + 8, max(1, max_sessions)


@dataclass
class _Pending:
    """A session of the helper whose connections are not all there yet (``conns`` by role)."""

    since: float
    conns: dict[int, Admission] = field(default_factory=dict)


@dataclass
class _Session:
    sid: bytes
    client: str
    start: float
    pipe: int
    killed: str | None = None


class _Service:
    def __init__(self, listener: socket.socket, ctx: ssl.SSLContext | None,
                 settings: ServiceSettings, run_session: SessionFn,
                 allow_peer: Callable[[str], bool]):
        self.listener, self.ctx, self.s, self.run_session = listener, ctx, settings, run_session
        self.allow_peer = allow_peer
        self.sel = selectors.DefaultSelector()
        self.admissions: dict[int, Admission] = {}
        self.per_address: Counter[str] = Counter()      # admissions by source address
        self.capped: set[str] = set()                   # addresses told so (logged once)
        self.pending: dict[bytes, _Pending] = {}        # identifiers reserved, not started
        self.used: OrderedDict[bytes, None] = OrderedDict()
        self.pid = os.getpid()
        self.sessions: dict[int, _Session] = {}
        self.signals = 0
        self.drain_deadline: float | None = None
        self.accepting = False      # the listener is in the selector

    # --- logging ------------------------------------------------------------------------
    def log(self, event: str, **fields: Any) -> None:
        """One log line on stderr (JSON escapes every control character itself; the text
        form escapes them too, so a peer's text, e.g. in an outcome, cannot forge a line)."""
        if self.s.log_json:
            line = json.dumps({"event": event, "party": self.s.name, **fields})
        elif event == "session":
            line = printable(f"{self.s.name}: session {fields['session']} client "
                             f"{fields['client']} images {fields['images']} bytes "
                             f"{fields['bytes']} seconds {fields['seconds']:.2f} "
                             f"{fields['outcome']}")
        else:
            line = printable(f"{self.s.name}: {fields.pop('message')}")
        print(line, file=sys.stderr, flush=True)

    # --- admission ----------------------------------------------------------------------
    def _complete(self) -> int:
        """Sessions whose connections are all reserved but whose process has not started."""
        return sum(1 for e in self.pending.values() if set(e.conns) == self.s.wanted)

    def _busy(self) -> bool:
        reserved = sum(1 for a in self.admissions.values() if a.peer is not None and not a.busy)
        if self.s.wanted == frozenset({0}):    # this connection counts among the reserved
            return len(self.sessions) + reserved > self.s.max_sessions
        return len(self.sessions) + self._complete() >= self.s.max_sessions

    def _check_id(self, adm: Admission) -> int:
        """The status byte for ``adm``'s identifier; when accepted, the identifier is reserved
        for its role at once (the check and the reservation are one step)."""
        sid, peer = adm.session_id, adm.peer
        assert sid is not None and peer is not None
        if sid in self.used:
            return ID_REFUSED
        entry = self.pending.get(sid)
        if entry is not None:
            if peer in entry.conns:
                return ID_REFUSED
            if set(entry.conns) | {peer} == self.s.wanted and \
                    len(self.sessions) + self._complete() >= self.s.max_sessions:
                return self._refuse_pair(sid, adm)
        elif len(self.s.wanted) > 1:     # the helper: a half that waits for its other party
            per_role, per_address = half_session_caps(self.s.max_sessions)
            halves = [e.conns[peer] for e in self.pending.values() if set(e.conns) == {peer}]
            host = str(adm.addr[0])
            if len(halves) >= per_role or (peer == 0 and sum(
                    1 for a in halves if str(a.addr[0]) == host) >= per_address):
                return ID_FULL
        entry = self.pending.setdefault(sid, _Pending(time.monotonic()))
        entry.conns[peer] = adm
        return ID_ACCEPTED

    def _refuse_pair(self, sid: bytes, adm: Admission) -> int:
        """The second half of a session that finds no free slot: it is answered busy, the
        waiting half is closed, the identifier is used up."""
        entry = self.pending.pop(sid)
        for a in entry.conns.values():
            self._drop(a, None)
        self._remember(sid)
        self.log("busy", message=f"busy: session {sid[:4].hex()} found no free slot "
                 f"({len(self.sessions)} sessions running, --max-sessions "
                 f"{self.s.max_sessions}); told {adm.addr[0]}:{adm.addr[1]} to try later "
                 "and closed its other connection")
        return ID_BUSY

    def _accept(self) -> None:
        try:
            raw, addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.log("warning", message=f"accept failed: {exc}")
            return
        host = str(addr[0])
        if not self.allow_peer(host):
            raw.close()
            self.log("warning", message=f"refused a plaintext connection from {host}: "
                     "without TLS only loopback peers are accepted")
            return
        if self.per_address[host] >= MAX_ADMISSIONS_PER_ADDRESS:
            raw.close()
            if host not in self.capped:      # once until its connections drop below the cap
                self.capped.add(host)
                self.log("warning", message=f"refused connections from {host}: it already "
                         f"has {MAX_ADMISSIONS_PER_ADDRESS} connections in their handshake "
                         "(the most one address may have)")
            return
        try:
            adm = Admission(raw, addr, self.s.role, set(self.s.wanted), self.ctx,
                            self.s.handshake_timeout)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        self.admissions[adm.fileno()] = adm
        self.per_address[host] += 1
        self.sel.register(adm, selectors.EVENT_READ)
        self._advance(adm)

    def _unwatch(self, adm: Admission) -> None:
        """``adm`` leaves the handshake: out of the selector and the per-address count."""
        if self.admissions.pop(adm.fileno(), None) is None:
            return
        self.sel.unregister(adm)
        host = str(adm.addr[0])
        self.per_address[host] -= 1
        if self.per_address[host] <= 0:
            del self.per_address[host]
        if self.per_address[host] < MAX_ADMISSIONS_PER_ADDRESS:
            self.capped.discard(host)

    def _drop(self, adm: Admission, reason: str | None) -> None:
        self._unwatch(adm)
        entry = self.pending.get(adm.session_id) if adm.session_id is not None else None
        if entry is not None and entry.conns.get(adm.peer) is adm:   # its reservation
            del entry.conns[adm.peer]
            if not entry.conns:
                del self.pending[adm.session_id]
                self._remember(adm.session_id)
        adm.close()
        if reason:
            self.log("busy" if adm.status in (ID_FULL, ID_BUSY) else "warning",
                     message=f"dropped the connection from {adm.addr[0]}:{adm.addr[1]}: "
                     f"{reason}")

    def _advance(self, adm: Admission) -> None:
        try:
            want = adm.step(self._busy, self._check_id)
        except Refused as exc:
            self._drop(adm, str(exc))
            return
        if want is not None:
            self.sel.modify(adm, selectors.EVENT_WRITE if want == WANT_WRITE
                            else selectors.EVENT_READ)
            return
        if adm.busy:
            self._drop(adm, None)
            self.log("busy", message=f"busy: told {adm.addr[0]}:{adm.addr[1]} to try later "
                     f"({len(self.sessions)} sessions running, --max-sessions "
                     f"{self.s.max_sessions})")
            return
        self._unwatch(adm)
        entry = self.pending.get(adm.session_id)          # reserved by _check_id
        if entry is None or entry.conns.get(adm.peer) is not adm:
            adm.close()
            return
        if set(entry.conns) == self.s.wanted and all(a.admitted for a in entry.conns.values()):
            sid = adm.session_id
            del self.pending[sid]
            self._start(sid, entry.conns)

    # --- sessions -----------------------------------------------------------------------
    def _remember(self, sid: bytes) -> None:
        """``sid`` is used up: refused if it comes back (the oldest beyond MAX_USED_IDS are
        forgotten)."""
        self.used[sid] = None
        while len(self.used) > MAX_USED_IDS:
            self.used.popitem(last=False)

    def _start(self, sid: bytes, conns: dict[int, Admission]) -> None:
        self._remember(sid)
        client = conns.get(0) or next(iter(conns.values()))
        where = f"{client.addr[0]}:{client.addr[1]}"
        r = w = -1
        try:
            r, w = os.pipe()
            pid = os.fork()
        except OSError as exc:      # EAGAIN, ENOMEM, EMFILE: this session only
            for fd in (r, w):
                if fd >= 0:
                    os.close(fd)
            for a in conns.values():
                a.close()
            self.log("session", session=sid[:4].hex(), client=where, images=0, bytes=0,
                     seconds=0.0, outcome=f"failed: could not start the session process "
                     f"({exc}); its connections were closed, the service goes on")
            return
        if pid == 0:
            self._child(sid, conns, r, w)
        os.close(w)
        for a in conns.values():
            a.close()
        self.sessions[pid] = _Session(sid, where, time.monotonic(), r)

    def _child(self, sid: bytes, conns: dict[int, Admission], r: int, w: int) -> None:
        code, summary = 1, {"outcome": "failed"}
        try:
            os.close(r)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)     # the parent decides when a session ends
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            _die_with_parent(self.pid)
            _prefer_for_oom()
            self.listener.close()
            for a in list(self.admissions.values()) + [a for p in self.pending.values()
                                                       for a in p.conns.values()]:
                a.close()
            for s in self.sessions.values():
                os.close(s.pipe)
            summary = self.run_session({p: a.sock for p, a in conns.items()}, sid)
            code = 0 if summary.get("outcome") == "ok" else 1
        except BaseException as exc:  # noqa: BLE001 - a session's end is always reported
            summary = {"outcome": f"failed: {type(exc).__name__}: {exc}"[:500]}
        finally:
            try:
                os.write(w, json.dumps(summary).encode()[:_SUMMARY_BYTES - 1])
            except (OSError, TypeError, ValueError):
                pass
            try:
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            os._exit(code)

    def _reap(self) -> None:
        while self.sessions:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            sess = self.sessions.pop(pid, None)
            if sess is None:
                continue
            summary: dict[str, Any] = {}
            try:
                os.set_blocking(sess.pipe, False)
                data = os.read(sess.pipe, _SUMMARY_BYTES)
                loaded = json.loads(data.decode()) if data else {}
                summary = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                pass
            os.close(sess.pipe)
            outcome = str(summary.get("outcome") or "")
            if sess.killed:
                outcome = f"killed: {sess.killed}"
            elif not outcome:
                sig = -os.waitstatus_to_exitcode(status)
                outcome = f"failed: the session process died (signal {sig})" if sig > 0 \
                    else "failed: the session process ended without a report"
            self.log("session", session=sess.sid[:4].hex(), client=sess.client,
                     images=int(summary.get("images") or 0),
                     bytes=int(summary.get("bytes") or 0),
                     seconds=round(time.monotonic() - sess.start, 3), outcome=outcome)

    def _kill_all(self, why: str) -> None:
        for pid, sess in self.sessions.items():
            sess.killed = sess.killed or why
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.sessions and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)

    # --- the loop -----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.signals += 1

    def _watch_listener(self) -> None:
        """Watch the listener only while an admission slot is free: at MAX_ADMISSIONS a
        connection waiting in the backlog would keep it readable and the loop would spin."""
        if self.drain_deadline is not None:
            return
        free = len(self.admissions) < MAX_ADMISSIONS
        if free and not self.accepting:
            self.sel.register(self.listener, selectors.EVENT_READ)
        elif not free and self.accepting:
            self.sel.unregister(self.listener)
        self.accepting = free

    def _stop_accepting(self) -> None:
        if self.accepting:
            self.sel.unregister(self.listener)
            self.accepting = False
        self.listener.close()
        for adm in list(self.admissions.values()):
            self._drop(adm, None)
        for entry in self.pending.values():
            for a in entry.conns.values():
                a.close()
        self.pending.clear()
        self.drain_deadline = time.monotonic() + self.s.grace_seconds
        self.log("stopping", message=f"stopping: no new sessions; {len(self.sessions)} "
                 f"running get {self.s.grace_seconds:g} s to finish (a second signal ends "
                 "them now)")

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        for s in (wake_r, wake_w):
            s.setblocking(False)
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        self.listener.setblocking(False)
        self._watch_listener()
        self.sel.register(wake_r, selectors.EVENT_READ)
        host, port = self.listener.getsockname()[:2]
        self.log("ready", message=f"ready: serving at {host}:{port} (up to "
                 f"{self.s.max_sessions} sessions at once)", address=f"{host}:{port}")
        try:
            while True:
                if self.signals >= 2:
                    self._kill_all("the service was stopped")
                    self.log("stopped", message="stopped at once: every session ended")
                    return 1
                if self.signals == 1 and self.drain_deadline is None:
                    self._stop_accepting()
                if self.drain_deadline is not None:
                    if not self.sessions:
                        self.log("stopped", message="stopped")
                        return 0
                    if time.monotonic() > self.drain_deadline:
                        self._kill_all("the grace period ended")
                        self.log("stopped", message="stopped: the grace period ended")
                        return 1
                for key, _ in self.sel.select(timeout=0.2):
                    obj = key.fileobj
                    if obj is wake_r:
                        try:
                            while wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    elif obj is self.listener:
                        if len(self.admissions) < MAX_ADMISSIONS:
                            self._accept()
                    elif isinstance(obj, Admission) and obj.fileno() in self.admissions:
                        self._advance(obj)
                self._reap()
                self._expire()
                self._watch_listener()
        finally:
            if self.sessions:
                self._kill_all("the service ended")
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.sel.close()
            for s in (wake_r, wake_w):
                s.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for adm in [a for a in self.admissions.values() if now > a.deadline]:
            self._drop(adm, f"no complete TLS handshake, hello and session identifier within "
                       f"{self.s.handshake_timeout:g} s (silent or too slow)")
        for sid in [k for k, e in self.pending.items() if now - e.since > self.s.pair_timeout]:
            entry = self.pending.pop(sid)
            for a in entry.conns.values():
                self._unwatch(a)
                a.close()
            self._remember(sid)
            self.log("warning", message=f"session {sid[:4].hex()}: its other party never "
                     f"came within {self.s.pair_timeout:g} s; dropped")
        for pid, sess in self.sessions.items():
            if sess.killed is None and now - sess.start > self.s.max_session_seconds:
                sess.killed = f"longer than --max-session-seconds {self.s.max_session_seconds:g}"
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _die_with_parent(parent: int) -> None:
    """Linux: end this session process if the service parent (pid ``parent``) dies (best
    effort). A parent that died before the request took effect is caught by its pid."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                 # orphaned between the fork and the prctl
        os._exit(1)


def _prefer_for_oom() -> None:
    """Linux: make this session process the out-of-memory killer's first choice (over the
    service parent and the rest of the host): a session that exhausts memory ends itself."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def serve(listener: socket.socket, ctx: ssl.SSLContext | None, settings: ServiceSettings,
          run_session: SessionFn, allow_peer: Callable[[str], bool] = lambda host: True) -> int:
    """Serve sessions on ``listener`` until stopped (see the module docstring); returns the
    exit status. ``run_session(sockets_by_role, session_id)`` runs one session in its forked
    process and returns its summary (``outcome``: "ok" or a failure, ``images``, ``bytes``).
    ``allow_peer(host)``: False drops a connection at once (plaintext: non-loopback hosts)."""
    return _Service(listener, ctx, settings, run_session, allow_peer).run()
