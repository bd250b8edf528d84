"""The one error type of the secure runtime's protocol: a malformed or unexpected message, or
a peer that failed, closed its link or went silent (torch-free, so the command lines can
classify errors before torch loads)."""
from __future__ import annotations

__all__ = ["ProtocolError"]


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
