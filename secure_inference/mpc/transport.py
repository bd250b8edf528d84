"""Links between parties: framing, in-memory queues and TCP (optionally TLS 1.3, mutual auth).

Frame layout (little endian), one frame per tensor::

    u32  length of everything after this field
    2s   magic b"SI"     u8 version     u8 dtype code     u8 ndim     3 pad bytes
    u32  CRC32 of the sender's scope path (catches parties that are out of step)
    i64  sender's logical clock (Lamport; the receiver uses it to count rounds)
    i64 × ndim   shape
    payload      prod(shape) × itemsize bytes, C order

The receiver states what it expects (dtype, shape, scope) and :func:`decode_frame` refuses
anything else with a :class:`ProtocolError`, as well as frames over the length limit, frames
whose length disagrees with their header, and unknown magic/version/dtype. Bytes from the
network are treated as hostile: nothing is unpickled, sizes are checked before allocating.

Links. :class:`QueueLink` (in-process, one queue per direction) and :class:`SocketLink` (TCP;
TLS or, on loopback only, plaintext) share the framing. Sending never waits for the peer: the
socket link hands frames to its I/O thread, which writes and reads concurrently (so two parties
sending large frames to each other at once cannot deadlock, and sends overlap computation).
A closed, dead or silent peer raises :class:`ProtocolError` in :meth:`recv` within the timeout.
Closing a socket link sends a goodbye frame, flushes, and waits (bounded) for the peer's
goodbye so that no data is cut off by a reset.
"""
from __future__ import annotations

import collections
import ipaddress
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class ProtocolError(RuntimeError):
    """A malformed or unexpected frame, or a peer that died, closed the link or timed out.

    ``secondary`` is True when the error is only a consequence of another party's failure
    (e.g. the in-process harness aborting the other parties).
    """

    def __init__(self, message: str, *, secondary: bool = False):
        super().__init__(message)
        self.secondary = secondary

    def __reduce__(self):  # keep ``secondary`` across process boundaries
        return (_rebuild_protocol_error, (str(self), self.secondary))


def _rebuild_protocol_error(message: str, secondary: bool) -> "ProtocolError":
    return ProtocolError(message, secondary=secondary)


MAGIC = b"SI"
VERSION = 1
DEFAULT_MAX_FRAME = 1 << 30  # 1 GiB
MAX_NDIM = 8
_PREFIX = struct.Struct("<I")
_HEADER = struct.Struct("<2sBBB3xIq")
_BYE = b"SI-BYE"

DTYPE_CODES: dict[torch.dtype, int] = {torch.int64: 1, torch.uint8: 2, torch.int32: 3,
                                       torch.int8: 4, torch.float64: 5, torch.bool: 6}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_NP_DTYPES = {torch.int64: np.int64, torch.uint8: np.uint8, torch.int32: np.int32,
              torch.int8: np.int8, torch.float64: np.float64, torch.bool: np.bool_}


def scope_hash(path: str) -> int:
    """CRC32 of a scope path, carried in every frame to detect parties out of step."""
    return zlib.crc32(path.encode("utf-8"))


@dataclass
class Frame:
    """A decoded frame."""

    tensor: torch.Tensor
    clock: int
    payload_bytes: int
    frame_bytes: int


def encode_frame(x: torch.Tensor, scope: int, clock: int,
                 max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one tensor (copied: later in-place changes to ``x`` do not affect the frame)."""
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot send dtype {x.dtype}; allowed: {sorted(map(str, DTYPE_CODES))}")
    if x.ndim > MAX_NDIM:
        raise ValueError(f"cannot send a tensor with {x.ndim} dimensions (max {MAX_NDIM})")
    if x.device.type == "meta":
        raise TypeError("cannot send a meta (shape-only) tensor: this party holds no data here")
    payload = x.detach().contiguous().cpu().numpy().tobytes()
    header = _HEADER.pack(MAGIC, VERSION, DTYPE_CODES[x.dtype], x.ndim, scope, clock)
    shape = struct.pack(f"<{x.ndim}q", *x.shape)
    length = len(header) + len(shape) + len(payload)
    if length > max_frame:
        raise ValueError(f"frame of {length} bytes exceeds the {max_frame}-byte limit; "
                         "split the tensor or raise max_frame on every party")
    return _PREFIX.pack(length) + header + shape + payload


def decode_frame(body: bytes, *, dtype: torch.dtype, shape: tuple[int, ...], scope: int,
                 scope_name: str, peer: int, device: torch.device | str = "cpu") -> Frame:
    """Parse and check a frame body (without its length prefix) against what the protocol expects."""
    where = f"frame from party {peer} (scope '{scope_name}')"
    if len(body) < _HEADER.size:
        raise ProtocolError(f"{where}: truncated header ({len(body)} bytes)")
    magic, version, code, ndim, got_scope, clock = _HEADER.unpack_from(body, 0)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"{where}: bad magic/version {magic!r}/{version}: not a "
                            "secure-inference frame or a different protocol version")
    if code not in _CODE_DTYPES:
        raise ProtocolError(f"{where}: unknown dtype code {code}")
    if ndim > MAX_NDIM:
        raise ProtocolError(f"{where}: {ndim} dimensions (max {MAX_NDIM})")
    if len(body) < _HEADER.size + 8 * ndim:
        raise ProtocolError(f"{where}: truncated shape")
    got_shape = struct.unpack_from(f"<{ndim}q", body, _HEADER.size)
    got_dtype = _CODE_DTYPES[code]
    if got_scope != scope:
        raise ProtocolError(f"{where}: the sender was in a different scope (parties out of "
                            "step: they ran different protocol steps)")
    if got_dtype != dtype or tuple(got_shape) != tuple(shape):
        raise ProtocolError(f"{where}: expected {dtype} {list(shape)}, got {got_dtype} "
                            f"{list(got_shape)} (parties disagree on the protocol)")
    itemsize = torch.empty((), dtype=dtype).element_size()
    payload = len(body) - _HEADER.size - 8 * ndim
    if any(s < 0 for s in got_shape) or payload != itemsize * int(np.prod(got_shape, dtype=np.int64)):
        raise ProtocolError(f"{where}: payload of {payload} bytes does not match shape "
                            f"{list(got_shape)} of {dtype}")
    arr = np.frombuffer(body, dtype=_NP_DTYPES[dtype], offset=_HEADER.size + 8 * ndim)
    tensor = torch.from_numpy(arr.copy()).reshape(shape).to(device)
    return Frame(tensor, clock, payload, len(body) + _PREFIX.size)


def split_prefix(data: bytes, max_frame: int, peer: int) -> bytes:
    """Check a whole frame's length prefix and return its body."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"frame from party {peer}: shorter than its length prefix")
    (length,) = _PREFIX.unpack_from(data, 0)
    if length > max_frame:
        raise ProtocolError(f"frame from party {peer}: {length} bytes exceeds the limit of "
                            f"{max_frame}")
    if len(data) - _PREFIX.size != length:
        raise ProtocolError(f"frame from party {peer}: length prefix says {length} bytes, "
                            f"got {len(data) - _PREFIX.size}")
    return data[_PREFIX.size:]


class Link:
    """One direction-pair between this party and ``peer``: send whole frames, receive bodies."""

    me: int
    peer: int

    def send(self, frame: bytes) -> None:
        raise NotImplementedError

    def _closed_error(self) -> ProtocolError:
        """The peer ended the link while this party still expected a frame."""
        return ProtocolError(f"party {self.me}: party {self.peer} closed the link (it finished "
                             "or died) while a frame was expected")

    def _timeout_error(self, timeout: float) -> ProtocolError:
        """No frame arrived within ``timeout`` seconds."""
        return ProtocolError(f"party {self.me}: no frame from party {self.peer} within "
                             f"{timeout:g} s (peer stalled, dead or out of step)")

    def recv(self, timeout: float) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


_CLOSED = object()


class QueueLink(Link):
    """In-memory link for the in-process harness; ``abort`` unblocks receivers at once."""

    def __init__(self, me: int, peer: int, inbox: queue.Queue, outbox: queue.Queue,
                 abort: threading.Event, max_frame: int = DEFAULT_MAX_FRAME):
        self.me, self.peer = me, peer
        self._inbox, self._outbox, self._abort = inbox, outbox, abort
        self.max_frame = max_frame
        self._peer_closed = False

    @staticmethod
    def pair(a: int, b: int, abort: threading.Event,
             max_frame: int = DEFAULT_MAX_FRAME) -> tuple["QueueLink", "QueueLink"]:
        """The two ends of a link between parties ``a`` and ``b``."""
        qa, qb = queue.Queue(), queue.Queue()
        return (QueueLink(a, b, qa, qb, abort, max_frame), QueueLink(b, a, qb, qa, abort, max_frame))

    def send(self, frame: bytes) -> None:
        if self._abort.is_set():
            raise ProtocolError(f"party {self.me}: session aborted by another party's failure",
                                secondary=True)
        self._outbox.put(frame)

    def recv(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            if self._abort.is_set():
                raise ProtocolError(f"party {self.me}: session aborted by another party's "
                                    "failure", secondary=True)
            if self._peer_closed:
                raise self._closed_error()
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout_error(timeout)
            try:
                item = self._inbox.get(timeout=min(left, 0.05))
            except queue.Empty:
                continue
            if item is _CLOSED:
                self._peer_closed = True
                continue
            return split_prefix(item, self.max_frame, self.peer)

    def close(self) -> None:
        self._outbox.put(_CLOSED)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SocketLink(Link):
    """A TCP (or TLS-over-TCP) link with one I/O thread that reads and writes concurrently."""

    _CHUNK = 1 << 20

    def __init__(self, sock: socket.socket, me: int, peer: int,
                 max_frame: int = DEFAULT_MAX_FRAME, linger: float = 5.0):
        self.me, self.peer, self.max_frame, self.linger = me, peer, max_frame, linger
        self._sock = sock
        sock.setblocking(False)
        self._out: collections.deque[memoryview] = collections.deque()
        self._frames: collections.deque[bytes] = collections.deque()
        self._inbuf = bytearray()
        self._cond = threading.Condition()
        self._error: ProtocolError | None = None
        self._eof = False
        self._peer_bye = False
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"link-{me}-{peer}", daemon=True)
        self._thread.start()

    # --- protocol thread side -------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._eof or self._peer_bye:
                raise ProtocolError(f"party {self.me}: cannot send, party {self.peer} closed "
                                    "the link")
            self._out.append(memoryview(frame))
        self._wake()

    def recv(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._frames:
                if self._error is not None:
                    raise self._error
                if self._eof or self._peer_bye:
                    raise self._closed_error()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._timeout_error(timeout)
                self._cond.wait(left)
            return self._frames.popleft()

    def close(self) -> None:
        """Say goodbye, flush, wait (at most ``linger`` s) for the peer's goodbye, then close."""
        try:
            with self._cond:
                broken = self._error is not None or self._eof
                if not broken:
                    self._out.append(memoryview(_PREFIX.pack(len(_BYE)) + _BYE))
            self._wake()
            if not broken:
                deadline = time.monotonic() + self.linger
                with self._cond:
                    while not (self._peer_bye or self._eof or self._error) and \
                            time.monotonic() < deadline:
                        self._cond.wait(deadline - time.monotonic())
        finally:
            with self._cond:
                self._stop = True
            self._wake()
            self._thread.join(timeout=self.linger + 1.0)
            for s in (self._sock, self._wake_r, self._wake_w):
                try:
                    s.close()
                except OSError:
                    pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    # --- I/O thread ---------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        with self._cond:
            if self._error is None:
                self._error = ProtocolError(f"party {self.me}: link to party {self.peer}: {message}")
            self._cond.notify_all()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self._sock, selectors.EVENT_READ)
        want_write = False
        try:
            while True:
                with self._cond:
                    if self._stop:
                        break
                    pending = bool(self._out)
                if pending != want_write:
                    want_write = pending
                    sel.modify(self._sock, selectors.EVENT_READ |
                               (selectors.EVENT_WRITE if pending else 0))
                for key, _ in sel.select(timeout=1.0):
                    if key.fileobj is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                if pending:
                    self._flush()
                if not self._eof:
                    self._read()
                with self._cond:
                    if self._error is not None or self._eof:
                        break  # nothing more can arrive; senders see the EOF/error
        except Exception as exc:  # noqa: BLE001 - reported to the protocol thread
            self._fail(f"I/O thread failed: {exc!r}")
        finally:
            sel.close()

    def _flush(self) -> None:
        while True:
            with self._cond:
                if not self._out:
                    return
                buf = self._out[0]
            try:
                n = self._sock.send(buf[:self._CHUNK])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            except (OSError, ssl.SSLError) as exc:
                self._fail(f"send failed ({exc.__class__.__name__}: {exc}); the peer died or "
                           "closed the connection")
                return
            with self._cond:
                if n >= len(buf):
                    self._out.popleft()
                else:
                    self._out[0] = buf[n:]

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(self._CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                data = b""
            except (OSError, ssl.SSLError) as exc:
                self._fail(f"receive failed ({exc.__class__.__name__}: {exc}); the peer died "
                           "or reset the connection")
                return
            if not data:
                with self._cond:
                    self._eof = True
                    self._cond.notify_all()
                break
            self._inbuf += data
        self._split_frames()

    def _split_frames(self) -> None:
        frames = []
        pos = 0
        buf = self._inbuf
        while len(buf) - pos >= _PREFIX.size:
            (length,) = _PREFIX.unpack_from(buf, pos)
            if length > self.max_frame:
                self._fail(f"incoming frame of {length} bytes exceeds the limit of "
                           f"{self.max_frame} (malformed or hostile frame)")
                return
            if len(buf) - pos - _PREFIX.size < length:
                break
            frames.append(bytes(buf[pos + _PREFIX.size:pos + _PREFIX.size + length]))
            pos += _PREFIX.size + length
        if pos:
            del buf[:pos]
        if frames:
            with self._cond:
                for f in frames:
                    if f == _BYE:
                        self._peer_bye = True
                    else:
                        self._frames.append(f)
                self._cond.notify_all()


# --- connection set-up ---------------------------------------------------------------------

PARTY_NAMES = {0: "client", 1: "server", 2: "helper"}


def party_common_name(role: int) -> str:
    """The certificate common name that identifies party ``role``."""
    return f"secure-inference party {role} ({PARTY_NAMES[role]})"


@dataclass
class TLSConfig:
    """Where one party finds its TLS material (see :mod:`secure_inference.mpc.certs`)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def from_dir(cls, folder: str | Path, role: int) -> "TLSConfig":
        """``ca.pem``, ``<name>.pem`` and ``<name>.key`` from a folder made by make_certificates."""
        folder = Path(folder)
        name = PARTY_NAMES[role]
        cfg = cls(folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}.key")
        missing = [str(p) for p in (cfg.ca_file, cfg.cert_file, cfg.key_file) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"TLS files missing for party {role}: {missing}; create "
                                    "them with research/secure_inference/make_certificates.py")
        return cfg

    def context(self, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context that presents this party's certificate and requires the peer's."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not server_side:
            ctx.check_hostname = True
        return ctx


def _peer_role_from_cert(sock: ssl.SSLSocket) -> int:
    cert = sock.getpeercert()
    names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    for role in PARTY_NAMES:
        if party_common_name(role) in names:
            return role
    raise ProtocolError(f"peer certificate names none of the three parties (subject {names})")


_HELLO = struct.Struct("<8sB")
_HELLO_MAGIC = b"SI-HELLO"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ProtocolError("connection closed during the hello")
        data += chunk
    return data


def _secure(sock: socket.socket, me: int, expected: int | None, tls: TLSConfig | None,
            server_side: bool, host: str) -> tuple[socket.socket, int]:
    """TLS handshake (if any) and hello; returns the socket and the verified peer role."""
    if tls is not None:
        try:
            if server_side:
                sock = tls.context(True).wrap_socket(sock, server_side=True)
            else:
                sock = tls.context(False).wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise ProtocolError(f"party {me}: TLS certificate of the peer at {host} was refused: "
                                f"{exc.verify_message} (is it signed by this session's CA, and "
                                "does its SAN list name this host?)") from exc
        except (ssl.SSLError, OSError) as exc:
            raise ProtocolError(f"party {me}: TLS handshake with {host} failed: {exc} (the peer "
                                "may have refused our certificate: both sides need certificates "
                                "from the same CA)") from exc
    try:
        sock.sendall(_HELLO.pack(_HELLO_MAGIC, me))
        magic, peer = _HELLO.unpack(_recv_exact(sock, _HELLO.size))
    except ssl.SSLError as exc:
        raise ProtocolError(f"party {me}: TLS failed after the handshake with {host}: {exc} "
                            "(the peer refused our certificate?)") from exc
    except OSError as exc:
        raise ProtocolError(f"party {me}: hello with {host} failed: {exc}") from exc
    if magic != _HELLO_MAGIC or peer not in PARTY_NAMES:
        raise ProtocolError(f"party {me}: peer at {host} is not a secure-inference party")
    if expected is not None and peer != expected:
        raise ProtocolError(f"party {me}: expected party {expected} at {host}, it says {peer}")
    if tls is not None and _peer_role_from_cert(sock) != peer:
        raise ProtocolError(f"party {me}: peer says it is party {peer} but its certificate "
                            "belongs to another party")
    return sock, peer


def connect_links(me: int, addresses: dict[int, tuple[str, int]], listener: socket.socket | None,
                  *, tls: TLSConfig | None, allow_plaintext: bool = False, timeout: float = 30.0,
                  max_frame: int = DEFAULT_MAX_FRAME) -> dict[int, SocketLink]:
    """Open one link to each other party.

    Party ``i`` connects to every party ``j > i`` (at ``addresses[j]``) and accepts the parties
    ``j < i`` on ``listener``: the client (P0) only dials out, the helper (P2) only listens.
    Plaintext needs ``allow_plaintext=True`` and loopback addresses only.
    """
    if tls is None:
        hosts = [h for r, (h, _) in addresses.items() if r != me]
        if not allow_plaintext:
            raise ValueError("refusing plaintext links: pass TLS material, or allow_plaintext=True "
                             "for loopback tests")
        if not all(is_loopback(h) for h in hosts):
            raise ValueError(f"plaintext links are only allowed on loopback, peers are at {hosts}")
    deadline = time.monotonic() + timeout
    links: dict[int, SocketLink] = {}
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
            sock, _ = _secure(raw, me, peer, tls, False, host)
            links[peer] = SocketLink(sock, me, peer, max_frame)
        lower = {r for r in addresses if r < me}
        while lower - set(links):
            if listener is None:
                raise ValueError(f"party {me} must listen for parties {sorted(lower)}")
            listener.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                raw, addr = listener.accept()
            except (socket.timeout, TimeoutError) as exc:
                raise ProtocolError(f"party {me}: parties {sorted(lower - set(links))} did not "
                                    f"connect within {timeout:g} s") from exc
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(max(0.1, deadline - time.monotonic()))
            sock, peer = _secure(raw, me, None, tls, True, addr[0])
            if peer not in lower or peer in links:
                sock.close()
                raise ProtocolError(f"party {me}: unexpected connection from party {peer}")
            links[peer] = SocketLink(sock, me, peer, max_frame)
    except BaseException:
        for link in links.values():
            link.close()
        raise
    return links


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket (port 0: the OS picks a free port; read it with getsockname)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(8)
    return s
