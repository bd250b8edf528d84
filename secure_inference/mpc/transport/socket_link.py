"""The TCP link (TLS or, on loopback only, plaintext) between two parties.

Sending never waits for the peer: the socket link hands frames to its I/O thread, which writes
and reads concurrently (so two parties sending large frames to each other at once cannot
deadlock, and sends overlap computation). Closing a socket link sends a goodbye frame,
flushes, and waits (bounded) for the peer's goodbye so that no data is cut off by a reset.
Each socket link bounds the bytes it holds: frames queued for sending wait (at most
``send_timeout``) while more than ``max_queued`` bytes are unsent, and more than
``max_queued`` bytes of received but unread frames fail the link (default
:data:`QUEUE_FACTOR` × ``max_frame`` each way).
"""
from __future__ import annotations

import collections
import selectors
import socket
import ssl
import sys
import threading
import time

import numpy as np
import torch

from ..errors import ProtocolError
from .frames import DEFAULT_MAX_FRAME, PREFIX, assemble, frame_parts
from .handshake import printable
from .link import Link

__all__ = ["SocketLink", "QUEUE_FACTOR", "DEFAULT_SEND_TIMEOUT"]

QUEUE_FACTOR = 2             # a socket link holds at most QUEUE_FACTOR × max_frame bytes each way
DEFAULT_SEND_TIMEOUT = 120.0  # longest wait for room in a full outgoing queue
_BYE = b"SI-BYE"
_ABORT = b"SI-ABORT"   # + u8 party that failed first + utf-8 cause: a goodbye after a failure
_ABORT_REASON_MAX = 600


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
            frame = assemble(header, payload, sent, self.frame_buffer)
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

    def wait_sent(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until the send queue is empty (every frame written to
        the socket) or the link broke; True if the queue is empty."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._out and self._error is None and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            return not self._out

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
                    self._out.append(memoryview(PREFIX.pack(len(bye)) + bye))
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
            end = PREFIX.size if self._after_large and self._stage_len == 0 else len(self._stage)
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
        while end - pos >= PREFIX.size:
            (length,) = PREFIX.unpack_from(buf, pos)
            if length > self.max_frame:
                self._fail(f"incoming frame of {length} bytes exceeds the limit of "
                           f"{self.max_frame} (malformed or hostile frame)")
                return False
            start = pos + PREFIX.size
            if end - start >= length:
                frames.append(buf[start:start + length])      # a bytearray slice: one copy
                pos = start + length
            elif PREFIX.size + length > len(buf):        # does not fit: its own buffer
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
                    # the peer's text goes into this party's errors and logs: capped, and
                    # every control character (newline, escape, ...) made a visible escape
                    cause = bytes(f[len(_ABORT) + 1:len(_ABORT) + 1 + _ABORT_REASON_MAX])
                    self._peer_abort = (f[len(_ABORT)], printable(
                        cause.decode("utf-8", "replace"), _ABORT_REASON_MAX))
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
