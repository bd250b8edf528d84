"""The link interface between two parties, and the in-memory link of the thread harness.

A :class:`Link` sends whole frames (:mod:`.frames`) and receives frame bodies; a closed, dead
or silent peer raises :class:`~secure_inference.mpc.errors.ProtocolError` in
:meth:`Link.recv` within the timeout. :class:`QueueLink` joins two parties in one process
(one queue per direction); :class:`~.socket_link.SocketLink` joins them over TCP.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from ..errors import ProtocolError
from .frames import DEFAULT_MAX_FRAME, encode_frame, split_prefix
from .handshake import printable

__all__ = ["Link", "QueueLink"]


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
            origin, reason = abort[0], printable(str(abort[1]))   # the peer's text, one line
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

    def wait_sent(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until every queued frame has been handed to the
        operating system; True if none is left. Links without a send queue: True."""
        return True

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
