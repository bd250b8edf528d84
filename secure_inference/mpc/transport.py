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
goodbye so that no data is cut off by a reset. Each socket link bounds the bytes it holds:
frames queued for sending wait (at most ``send_timeout``) while more than ``max_queued`` bytes
are unsent, and more than ``max_queued`` bytes of received but unread frames fail the link
(default :data:`QUEUE_FACTOR` × ``max_frame`` each way).

Listening. :func:`connect_links` accepts connections until the expected authenticated peers
have arrived. Every incoming connection gets its own bounded TLS handshake and hello
(:data:`HANDSHAKE_TIMEOUT` s) in its own thread (at most :data:`MAX_PENDING` at once), so a
port scan, a silent connection, garbage bytes, a certificate from another CA or a certificate
that names another party is dropped with a warning on the ``secure_inference.mpc.transport``
logger and neither stops the session nor uses up its timeout.
"""
from __future__ import annotations

import collections
import ipaddress
import logging
import queue
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
QUEUE_FACTOR = 2             # a socket link holds at most QUEUE_FACTOR × max_frame bytes each way
DEFAULT_SEND_TIMEOUT = 120.0  # longest wait for room in a full outgoing queue
HANDSHAKE_TIMEOUT = 5.0      # per incoming connection: TLS handshake and hello, in seconds
MAX_PENDING = 16             # incoming connections in their handshake at once (more wait)
logger = logging.getLogger(__name__)
MAX_NDIM = 8
_PREFIX = struct.Struct("<I")
_HEADER = struct.Struct("<2sBBB3xIq")
_BYE = b"SI-BYE"
_ABORT = b"SI-ABORT"   # + u8 party that failed first + utf-8 cause: a goodbye after a failure
_ABORT_REASON_MAX = 600

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


def frame_parts(x: torch.Tensor, scope: int, clock: int,
                max_frame: int = DEFAULT_MAX_FRAME) -> tuple[bytes, torch.Tensor]:
    """The two parts of one tensor's frame: its length prefix, header and shape (bytes), and
    its payload as a flat contiguous uint8 tensor on ``x``'s device (a view of ``x`` where
    it is already contiguous: not a copy). Checks dtype, rank and the frame size limit."""
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"cannot send dtype {x.dtype}; allowed: {sorted(map(str, DTYPE_CODES))}")
    if x.ndim > MAX_NDIM:
        raise ValueError(f"cannot send a tensor with {x.ndim} dimensions (max {MAX_NDIM})")
    if x.device.type == "meta":
        raise TypeError("cannot send a meta (shape-only) tensor: this party holds no data here")
    payload = x.detach().contiguous().reshape(-1)
    if payload.numel() <= 1:   # a size-1 or empty dimension may keep any stride: make it 1
        payload = torch.empty(payload.shape, dtype=payload.dtype,
                              device=payload.device).copy_(payload)
    payload = payload if payload.dtype == torch.uint8 else payload.view(torch.uint8)
    head = _HEADER.size + 8 * x.ndim
    length = head + payload.numel()
    if length > max_frame:
        raise ValueError(f"frame of {length} bytes exceeds the {max_frame}-byte limit; "
                         "split the tensor or raise max_frame on every party")
    header = bytearray(_PREFIX.size + head)
    _PREFIX.pack_into(header, 0, length)
    _HEADER.pack_into(header, _PREFIX.size, MAGIC, VERSION, DTYPE_CODES[x.dtype], x.ndim, scope,
                      clock)
    struct.pack_into(f"<{x.ndim}q", header, _PREFIX.size + _HEADER.size, *x.shape)
    return bytes(header), payload


def encode_frame(x: torch.Tensor, scope: int, clock: int, max_frame: int = DEFAULT_MAX_FRAME,
                 alloc: Callable[[int], torch.Tensor] | None = None) -> memoryview:
    """Serialise one tensor, length prefix included, into one new buffer (the payload is
    copied once: later in-place changes to ``x`` do not affect the frame).

    The buffer is allocated uninitialised (every byte is written here) and the payload is
    copied by torch, which releases the GIL: the links' I/O threads keep moving bytes while a
    large frame is built (a zero-filled ``bytearray`` plus a copy under the GIL took 2.5 times
    as long and stalled them). ``alloc(n)`` supplies the n-byte uint8 buffer (a link's
    recycled one, :meth:`SocketLink.frame_buffer`)."""
    header, payload = frame_parts(x, scope, clock, max_frame)
    return _assemble(header, payload, 0, alloc)


def _assemble(header: bytes, payload: torch.Tensor, skip: int,
              alloc: Callable[[int], torch.Tensor] | None) -> memoryview:
    """The bytes of ``header + payload`` from position ``skip`` on, in one new buffer (the
    payload copied by torch, also device -> host)."""
    total = len(header) + payload.numel() - skip
    buf = alloc(total) if alloc is not None else torch.empty(total, dtype=torch.uint8)
    frame = memoryview(buf.numpy())
    head = header[skip:]
    frame[:len(head)] = head
    rest = payload[max(0, skip - len(header)):]
    if rest.numel():
        buf[len(head):].copy_(rest)
    return frame


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
    if not arr.flags.writeable:   # a read-only buffer (bytes): copy; a frame buffer of its own
        arr = arr.copy()          # (bytearray from a link) becomes the tensor's memory as is
    tensor = torch.from_numpy(arr).reshape(shape).to(device)
    return Frame(tensor, clock, payload, len(body) + _PREFIX.size)


def split_prefix(data: bytes | bytearray, max_frame: int, peer: int) -> memoryview:
    """Check a whole frame's length prefix and return its body (a view: no copy)."""
    if len(data) < _PREFIX.size:
        raise ProtocolError(f"frame from party {peer}: shorter than its length prefix")
    (length,) = _PREFIX.unpack_from(data, 0)
    if length > max_frame:
        raise ProtocolError(f"frame from party {peer}: {length} bytes exceeds the limit of "
                            f"{max_frame}")
    if len(data) - _PREFIX.size != length:
        raise ProtocolError(f"frame from party {peer}: length prefix says {length} bytes, "
                            f"got {len(data) - _PREFIX.size}")
    return memoryview(data)[_PREFIX.size:]


class Link:
    """One direction-pair between this party and ``peer``: send whole frames, receive bodies."""

    me: int
    peer: int

    def frame_buffer(self, n: int) -> torch.Tensor:
        """An n-byte uint8 buffer to build the next frame in (:func:`encode_frame`'s
        ``alloc``); links that recycle sent buffers override it."""
        return torch.empty(n, dtype=torch.uint8)

    def send(self, frame: bytes, reuse: bool = False) -> None:
        """Queue one whole frame. ``reuse=True``: the frame was built in
        :meth:`frame_buffer` memory that nobody else holds (a link may lend it again)."""
        raise NotImplementedError

    def send_tensor(self, x: torch.Tensor, scope: int, clock: int, max_frame: int) -> int:
        """Send ``x`` as one frame (copy semantics: changing ``x`` afterwards does not change
        what is sent); returns the frame's length on the wire."""
        frame = encode_frame(x, scope, clock, max_frame, self.frame_buffer)
        self.send(frame, reuse=True)
        return len(frame)

    def _closed_error(self) -> ProtocolError:
        """The peer ended the link while this party still expected a frame (naming the party
        that failed first when the peer said so in an abort goodbye)."""
        abort = getattr(self, "_peer_abort", None)
        if abort is not None:
            origin, reason = abort
            who = (f"party {origin} failed" if origin == self.peer else
                   f"party {origin} failed (reported by party {self.peer}, which stopped too)")
            err = ProtocolError(f"party {self.me}: {who}: {reason}", secondary=True)
        else:
            err = ProtocolError(f"party {self.me}: party {self.peer} closed the link (it "
                                "finished or died; if it is still running, it may have stopped "
                                "because another party failed: see its log) while a frame was "
                                "expected")
            origin = self.peer
        err.failed_party = origin
        return err

    def _timeout_error(self, timeout: float) -> ProtocolError:
        """No frame arrived within ``timeout`` seconds."""
        err = ProtocolError(f"party {self.me}: no frame from party {self.peer} within "
                            f"{timeout:g} s (peer stalled, dead or out of step)")
        err.failed_party = self.peer
        return err

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

    def send(self, frame: bytes, reuse: bool = False) -> None:  # frames go to the peer as they are
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

    _CHUNK = 4 << 20          # most bytes one send/recv call moves
    _STAGE = 1 << 20          # staging buffer; larger frames get their own

    def __init__(self, sock: socket.socket, me: int, peer: int,
                 max_frame: int = DEFAULT_MAX_FRAME, linger: float = 5.0,
                 max_queued: int | None = None, send_timeout: float = DEFAULT_SEND_TIMEOUT):
        self.me, self.peer, self.max_frame, self.linger = me, peer, max_frame, linger
        self.max_queued = QUEUE_FACTOR * max_frame if max_queued is None else int(max_queued)
        if self.max_queued < max_frame:
            raise ValueError(f"max_queued ({self.max_queued}) must be at least max_frame "
                             f"({max_frame}): one whole frame must fit")
        self.send_timeout = send_timeout
        self._out_bytes = 0     # bytes queued for sending, not yet written to the socket
        self._in_bytes = 0      # bytes of received frames the protocol has not read yet
        self._sock = sock
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):   # fewer wake-ups per large frame
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, self._CHUNK)
            except OSError:
                pass
        sock.setblocking(False)
        self._out: collections.deque[memoryview] = collections.deque()
        # buffers of large frames this link has sent, lent again by frame_buffer: writing a
        # frame into memory it has touched before avoids the page faults of fresh memory
        self._reusable: dict[int, np.ndarray] = {}    # id -> array of a queued reusable frame
        self._spare: list[np.ndarray] = []
        self._frames: collections.deque[bytearray] = collections.deque()
        self._stage = bytearray(self._STAGE)          # small frames are cut out of this
        self._stage_view = memoryview(self._stage)
        self._stage_len = 0
        self._body: memoryview | None = None          # a large frame being received
        # buffers of large received frames, lent again for later frames once nothing outside
        # this list refers to them (the protocol dropped every tensor made from them)
        self._received: collections.deque[np.ndarray] = collections.deque()
        self._body_got = 0
        self._after_large = False                     # the last frame had its own buffer
        self._cond = threading.Condition()
        self._error: ProtocolError | None = None
        self._eof = False
        self._peer_bye = False
        self._peer_abort: tuple[int, str] | None = None
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"link-{me}-{peer}", daemon=True)
        self._thread.start()

    # --- protocol thread side -------------------------------------------------------------
    _REUSE_MIN = 1 << 20      # frames smaller than this are not worth recycling
    _SPARES = 4               # buffers kept for reuse

    def frame_buffer(self, n: int) -> torch.Tensor:
        """An n-byte uint8 buffer for the next frame: a sent frame's buffer of that size if
        one is spare (its old content is overwritten whole by :func:`encode_frame`), else a
        new one. Pass the frame to ``send(frame, reuse=True)`` to give it back once sent."""
        if n >= self._REUSE_MIN:
            with self._cond:
                for i, arr in enumerate(self._spare):
                    if arr.size == n:
                        return torch.from_numpy(self._spare.pop(i))
        return super().frame_buffer(n)

    _DIRECT_MIN = 1 << 16     # payloads from this size on are written straight from the tensor
    _COPY_BYTES_PER_S = 3e9   # what building a frame copies per second (measured, 2-core VM)

    def send_tensor(self, x: torch.Tensor, scope: int, clock: int, max_frame: int) -> int:
        """Send ``x`` as one frame. A plaintext link with nothing queued writes a large CPU
        tensor's frame to the socket straight from the tensor's memory, as far as the socket
        takes it at once, and copies only the rest into a frame buffer for the I/O thread: the
        bytes are in the kernel or copied before this returns, so the copy semantics hold and
        a frame that fits costs no copy in this process. (TLS sockets may not be written by
        two threads; GPU tensors must cross to the host anyway: both take the copy.)"""
        if (x.numel() * x.element_size() < self._DIRECT_MIN or x.device.type != "cpu"
                or isinstance(self._sock, ssl.SSLSocket)):
            return super().send_tensor(x, scope, clock, max_frame)
        header, payload = frame_parts(x, scope, clock, max_frame)
        length = len(header) + payload.numel()
        with self._cond:
            self._check_can_send()
            # the I/O thread may be finishing earlier frames: waiting for it as long as the
            # copy would take costs no CPU, the copy does
            deadline = time.monotonic() + payload.numel() / self._COPY_BYTES_PER_S
            while self._out and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            sent = 0
            if not self._out:         # nothing queued: the I/O thread is not writing either
                sent = self._write_now(header, payload)
            if sent == length:
                return length
            frame = _assemble(header, payload, sent, self.frame_buffer)
            self._queue(frame, reuse=True)
        self._wake()
        return length

    def _write_now(self, header: bytes, payload: torch.Tensor) -> int:
        """How many bytes of ``header + payload`` the non-blocking socket takes right now
        (the rest is queued by the caller; on a socket error the I/O thread meets the error
        when it writes that rest, and reports it)."""
        body = memoryview(payload.numpy())
        sent = 0
        try:
            while sent < len(header):
                sent += self._sock.sendmsg([header[sent:], body[:self._CHUNK]])
            while sent < len(header) + len(body):
                at = sent - len(header)
                sent += self._sock.send(body[at:at + self._CHUNK])
        except OSError:           # would block; or broken: the I/O thread meets and reports it
            pass
        return sent

    def _check_can_send(self) -> None:
        """Raise if this link can send no more (error, abort, or the peer closed it)."""
        if self._error is not None:
            raise self._error
        if self._peer_abort is not None:
            raise self._closed_error()
        if self._eof or self._peer_bye:
            err = ProtocolError(f"party {self.me}: cannot send, party {self.peer} closed "
                                "the link")
            err.failed_party = self.peer
            raise err

    def send(self, frame: bytes, reuse: bool = False) -> None:
        """Queue ``frame`` for sending. ``reuse=True``: nobody else holds the frame (built
        in :meth:`frame_buffer` memory), so its buffer is lent again once it is sent."""
        with self._cond:
            self._queue(frame, reuse)
        self._wake()

    def _queue(self, frame: bytes, reuse: bool) -> None:
        """Append ``frame`` to the send queue (the caller holds the lock), waiting while the
        queue is over ``max_queued``."""
        self._check_can_send()
        deadline = time.monotonic() + self.send_timeout
        while self._out_bytes and self._out_bytes + len(frame) > self.max_queued:
            left = deadline - time.monotonic()
            if self._error is not None:
                raise self._error
            if left <= 0:
                raise ProtocolError(
                    f"party {self.me}: link to party {self.peer}: {self._out_bytes} bytes "
                    f"are queued for sending (limit {self.max_queued}) and party "
                    f"{self.peer} took none of them for {self.send_timeout:g} s (it is "
                    "stalled or not reading); if the protocol legitimately sends this far "
                    "ahead, raise max_queued on every party")
            self._cond.wait(min(left, 1.0))
        view = memoryview(frame)
        if reuse and len(view) >= self._REUSE_MIN and isinstance(view.obj, np.ndarray):
            self._reusable[id(view.obj)] = view.obj
        self._out.append(view)
        self._out_bytes += len(frame)

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
            frame = self._frames.popleft()
            self._in_bytes -= len(frame)
            return frame

    def close(self, abort: tuple[int, str] | None = None) -> None:
        """Say goodbye, flush, wait (at most ``linger`` s) for the peer's goodbye, then close.

        ``abort=(party, cause)``: this party failed; the goodbye tells the peer which party
        failed first and why (its next receive raises that), and the wait is at most 1 s."""
        linger = self.linger if abort is None else min(self.linger, 1.0)
        try:
            with self._cond:
                broken = self._error is not None or self._eof or self._stop
                if not broken:
                    bye = _BYE if abort is None else (
                        _ABORT + bytes([int(abort[0]) & 0xFF]) +
                        str(abort[1]).encode("utf-8", "replace")[:_ABORT_REASON_MAX])
                    self._out.append(memoryview(_PREFIX.pack(len(bye)) + bye))
            self._wake()
            if not broken:
                deadline = time.monotonic() + linger
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
                self._error.failed_party = self.peer
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
                    arr = self._reusable.pop(id(buf.obj), None)   # slices keep .obj
                    if arr is not None and len(self._spare) < self._SPARES:
                        self._spare.append(arr)
                else:
                    self._out[0] = buf[n:]
                self._out_bytes -= n
                self._cond.notify_all()  # room for a sender waiting on a full queue

    def _recv_into(self, view: memoryview) -> int | None:
        """One non-blocking receive into ``view``: bytes read, 0 at EOF, None if nothing is
        ready (or after a failure, which is recorded)."""
        try:
            return self._sock.recv_into(view, min(len(view), self._CHUNK))
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return 0
        except (OSError, ssl.SSLError) as exc:
            self._fail(f"receive failed ({exc.__class__.__name__}: {exc}); the peer died "
                       "or reset the connection")
            return None

    def _read(self) -> None:
        """Read what the socket has. Small frames are cut out of a staging buffer; a frame
        larger than the staging buffer gets a buffer of its own (allocated after its length
        prefix passed the max_frame check) that the socket fills directly, so its payload is
        copied once on the way in and becomes the received tensor's memory."""
        while self._error is None:
            if self._body is not None:
                n = self._recv_into(memoryview(self._body)[self._body_got:])
                if not n:
                    if n == 0:
                        self._set_eof()
                    return
                self._body_got += n
                if self._body_got == len(self._body):
                    frame, self._body = self._body, None
                    self._after_large = True
                    if not self._deliver([frame]):
                        return
                continue
            # after a large frame, read only the next length prefix: large frames tend to
            # follow each other, and bytes of the next one read into the staging buffer would
            # have to be copied into its own buffer
            end = _PREFIX.size if self._after_large and self._stage_len == 0 else len(self._stage)
            self._after_large = False
            n = self._recv_into(self._stage_view[self._stage_len:end])
            if not n:
                if n == 0:
                    self._set_eof()
                return
            self._stage_len += n
            if not self._split_frames():  # per read: a fast peer cannot grow the buffer
                return

    _RECEIVED_KEPT = 8            # received frames' buffers remembered for reuse
    _RECEIVED_MAX_BYTES = 128 << 20

    def _body_buffer(self, n: int) -> np.ndarray:
        """An n-byte buffer for an incoming large frame: a received frame's buffer that nobody
        uses any more (at most a quarter larger: its first n bytes), else a new one.

        A buffer is free when this link's list holds the only reference to it: every tensor
        made from a frame keeps its buffer alive (``decode_frame`` wraps it without copying),
        so a count of 2 (the list's and ``getrefcount``'s argument) means the protocol dropped
        all of them; only this I/O thread hands buffers out, so none can be taken meanwhile.
        Memory touched before costs no page faults: on a GPU party every frame is copied to
        the device at once, so its buffer comes back by the next frame."""
        kept = self._received
        for i in range(len(kept)):
            size = kept[i].size
            if n <= size <= n + n // 4 and sys.getrefcount(kept[i]) == 2:
                arr = kept[i]
                del kept[i]
                kept.append(arr)               # most recently used last
                return arr[:n]
        arr = np.empty(n, dtype=np.uint8)
        kept.append(arr)
        total = sum(a.size for a in kept)
        while len(kept) > self._RECEIVED_KEPT or (len(kept) > 1 and
                                                  total > self._RECEIVED_MAX_BYTES):
            total -= kept.popleft().size       # forgotten here; freed once the protocol is done
        return arr[:n]

    def _set_eof(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _split_frames(self) -> bool:
        """Move whole frames out of the staging buffer (and start a frame too large for it in
        a buffer of its own); False on an error."""
        frames = []
        pos, end, buf = 0, self._stage_len, self._stage
        while end - pos >= _PREFIX.size:
            (length,) = _PREFIX.unpack_from(buf, pos)
            if length > self.max_frame:
                self._fail(f"incoming frame of {length} bytes exceeds the limit of "
                           f"{self.max_frame} (malformed or hostile frame)")
                return False
            start = pos + _PREFIX.size
            if end - start >= length:
                frames.append(buf[start:start + length])      # a bytearray slice: one copy
                pos = start + length
            elif _PREFIX.size + length > len(buf):        # does not fit: its own buffer
                # uninitialised: it is delivered only once the socket has filled every
                # byte; zero-filling 8 MB frames cost as much as receiving them
                self._body = memoryview(self._body_buffer(length))
                self._body_got = end - start
                self._body[:self._body_got] = self._stage_view[start:end]
                pos = end
                break
            else:
                break
        if pos:
            rest = end - pos
            buf[:rest] = buf[pos:end]
            self._stage_len = rest
        return self._deliver(frames) if frames else True

    def _deliver(self, frames: list[bytearray | memoryview]) -> bool:
        """Hand complete frames to the protocol thread (goodbyes and aborts are noted, not
        queued); False if the unread bytes exceed the queue cap."""
        with self._cond:
            for f in frames:
                control = isinstance(f, bytearray)   # goodbyes are small: never a body buffer
                if control and f == _BYE:
                    self._peer_bye = True
                elif control and f.startswith(_ABORT) and len(f) > len(_ABORT):
                    self._peer_abort = (f[len(_ABORT)],
                                        bytes(f[len(_ABORT) + 1:]).decode("utf-8", "replace"))
                    self._peer_bye = True
                else:
                    self._frames.append(f)
                    self._in_bytes += len(f)
            self._cond.notify_all()
            unread = self._in_bytes
        if unread > self.max_queued:
            self._fail(f"{unread} bytes of frames arrived that this party has not read yet "
                       f"(limit {self.max_queued}): party {self.peer} sends far ahead of "
                       "the protocol (hostile or out of step); if that is legitimate, "
                       "raise max_queued on every party")
            return False
        return True


# --- connection set-up ---------------------------------------------------------------------

PARTY_NAMES = {0: "client", 1: "server", 2: "helper"}


def party_common_name(role: int) -> str:
    """The certificate common name that identifies party ``role``."""
    return f"secure-inference party {role} ({PARTY_NAMES[role]})"


def _tls_advice(cfg: "TLSConfig", name: str, folder: Path) -> str:
    """What to do about missing TLS files: only the CA certificate, only this party's, or all."""
    own = [p for p in (cfg.cert_file, cfg.key_file) if not p.exists()]
    if not own:
        return (f"copy the CA certificate ca.pem (public; from whoever runs the CA, or the "
                f"folder si-certificates init-ca wrote) into {folder}")
    if cfg.ca_file.exists() and cfg.cert_file.exists():
        return (f"{name}.key is this host's private key: it is created next to the request "
                f"by si-certificates request --role {name} and never leaves the host")
    return (f"on this host run si-certificates request --role {name} --host ADDRESS --out "
            f"{folder} and have the CA sign the request (or, all parties on one machine: "
            f"si-certificates local {folder}); see si-certificates --help")


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
            raise FileNotFoundError(f"TLS files missing for party {role}: {missing}; "
                                    + _tls_advice(cfg, name, folder))
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


def _secure(sock: socket.socket, me: int, expected: int, tls: TLSConfig | None,
            host: str) -> tuple[socket.socket, int]:
    """Dialling side: TLS handshake (if any) and hello; returns the socket and the peer role.

    The dialler sends its hello first; the listener answers only once it has accepted the
    dialler (certificate, role), so a connection closed here means the listener refused us.
    """
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
    if magic != _HELLO_MAGIC or peer not in PARTY_NAMES:
        raise ProtocolError(f"party {me}: peer at {host} is not a secure-inference party")
    if peer != expected:
        raise ProtocolError(f"party {me}: expected party {expected} at {host}, it says {peer}")
    if tls is not None and _peer_role_from_cert(sock) != peer:
        raise ProtocolError(f"party {me}: peer says it is party {peer} but its certificate "
                            "belongs to another party")
    return sock, peer


class _Refused(Exception):
    """An incoming connection that is not an expected, authenticated party (dropped)."""


def _admit(raw: socket.socket, me: int, wanted: set[int], ctx: ssl.SSLContext | None,
           limit: float) -> tuple[socket.socket, int]:
    """Listening side, one incoming connection: TLS handshake (if any), the dialler's hello,
    checks, then our hello; all within ``limit`` seconds. Raises :class:`_Refused`."""
    deadline = time.monotonic() + limit
    sock = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(limit)
        if ctx is not None:
            sock = ctx.wrap_socket(raw, server_side=True)  # the socket timeout bounds it all
        magic, peer = _HELLO.unpack(_recv_exact(sock, _HELLO.size, deadline))
        if magic != _HELLO_MAGIC or peer not in PARTY_NAMES:
            raise _Refused("not a secure-inference party (bad hello)")
        if peer not in wanted:
            raise _Refused(f"says it is party {peer}, but party {me} accepts only parties "
                           f"{sorted(wanted)}")
        if ctx is not None:
            try:
                cert_role = _peer_role_from_cert(sock)
            except ProtocolError as exc:
                raise _Refused(str(exc)) from None
            if cert_role != peer:
                raise _Refused(f"says it is party {peer} but its certificate belongs to party "
                               f"{cert_role}")
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(_HELLO.pack(_HELLO_MAGIC, me))
        return sock, peer
    except BaseException as exc:
        try:
            sock.close()
        except OSError:
            pass
        if isinstance(exc, _Refused):
            raise
        if isinstance(exc, (socket.timeout, TimeoutError)) or time.monotonic() >= deadline:
            raise _Refused(f"no complete TLS handshake and hello within {limit:g} s "
                           "(silent or too slow)") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise _Refused(f"TLS certificate refused: {exc.verify_message} (not signed by this "
                           "session's CA?)") from None
        if isinstance(exc, (ssl.SSLError, OSError, ProtocolError)):
            raise _Refused(f"TLS handshake or hello failed: {exc}") from None
        raise


def _roles(roles) -> str:
    return " and ".join(f"party {r} ({PARTY_NAMES[r]})" for r in sorted(roles))


def _accept_peers(me: int, wanted: set[int], listener: socket.socket, tls: TLSConfig | None,
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
                raise _Refused(f"plaintext connection from {addr[0]} refused: without TLS "
                               "only loopback peers are accepted")
            sock, peer = _admit(raw, me, wanted, ctx,
                                max(0.001, min(handshake_timeout, deadline - time.monotonic())))
            outcome = (addr, sock, peer, None)
        except _Refused as exc:
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


def _check_own_certificate(me: int, tls: TLSConfig) -> None:
    """Refuse, before dialling, a certificate of this party that names another party (the
    peers would drop every connection this party makes, each with only a log line)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        cert = x509.load_pem_x509_certificate(Path(tls.cert_file).read_bytes())
    except (OSError, ValueError):
        return  # unreadable: loading the TLS context reports it
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if party_common_name(me) in names:
        return
    owner = [r for r in PARTY_NAMES if party_common_name(r) in names]
    whose = f"party {owner[0]} ({PARTY_NAMES[owner[0]]})" if owner else f"no party ({names})"
    raise ProtocolError(f"party {me}: this party's own certificate belongs to another party: "
                        f"{tls.cert_file} names {whose}, not party {me} "
                        f"({PARTY_NAMES[me]}); use {PARTY_NAMES[me]}.pem/.key from "
                        "make_certificates.py")


def connect_links(me: int, addresses: dict[int, tuple[str, int]], listener: socket.socket | None,
                  *, tls: TLSConfig | None, allow_plaintext: bool = False, timeout: float = 30.0,
                  max_frame: int = DEFAULT_MAX_FRAME, handshake_timeout: float | None = None,
                  max_queued: int | None = None) -> dict[int, SocketLink]:
    """Open one link to each other party.

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
        _check_own_certificate(me, tls)
    if handshake_timeout is None:
        handshake_timeout = HANDSHAKE_TIMEOUT
    deadline = time.monotonic() + timeout
    links: dict[int, SocketLink] = {}

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
            sock, _ = _secure(raw, me, peer, tls, host)
            links[peer] = make_link(sock, peer)
        lower = {r for r in addresses if r < me}
        if lower:
            if listener is None:
                raise ValueError(f"party {me} must listen for parties {sorted(lower)}")
            links.update(_accept_peers(me, lower, listener, tls, deadline, timeout,
                                       handshake_timeout, make_link))
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
