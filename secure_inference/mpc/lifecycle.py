"""The lifecycle of one party: warm-up, open (the one place a :class:`~.runtime.Party` is
assembled from its links and settings), close, and abort after a failure.

The harnesses (:mod:`.harness`) and the party command lines (:mod:`secure_inference.cli`) all
go through these functions, so a party is built, warmed up and shut down the same way
whichever way it runs.
"""
from __future__ import annotations

import torch

from .errors import ProtocolError
from .faults import arm_fault
from .options import SessionOptions
from .protocols import compare_kernels
from .runtime import Party
from .transport.link import Link

__all__ = ["warm_up", "open_party", "close_party", "abort_reason", "abort_links"]

_WARM = False


def warm_up() -> None:
    """Load what torch imports lazily on the first operation on shape-only ('meta') tensors
    (its Python meta kernels pull in sympy: about 1.6 s of CPU here), and compile the DReLU's
    numba kernels (or load them from numba's cache). The helper computes on meta tensors
    throughout and the others for shapes, so without this a party pays that inside the first
    image's timed run. Idempotent; called by the harnesses and the CLIs before a
    party starts, and preloaded by the local process harness's fork server."""
    global _WARM
    if _WARM:
        return
    a = torch.empty((1, 1, 2, 2), dtype=torch.int64, device="meta")
    torch.nn.functional.conv2d(a + a - a, a[:, :, :1, :1])
    torch.matmul(a, a)
    compare_kernels.warm_up()
    _WARM = True


def open_party(role: int, links: dict[int, Link], options: SessionOptions, *,
               fault: str | None = None) -> Party:
    """Warm this process up (:func:`warm_up`) and assemble party ``role`` on ``links`` with
    the session's ``options`` (not started: the caller agrees the keys with
    :meth:`~.runtime.Party.start`). ``fault``: a test-only fault phase
    (:func:`.faults.arm_fault`); None in every real run."""
    warm_up()
    party = Party(role, links, options)
    if fault:
        arm_fault(party, fault)
    return party


def close_party(party: Party, exc: BaseException | None = None) -> None:
    """Close a party's links. After a failure (``exc``), each peer gets an abort goodbye
    naming the party that failed first and why, so a survivor's error names the cause rather
    than whichever link happened to close first."""
    if exc is None:
        party.close()
        return
    abort_links(party._links, party.role, exc)


def abort_reason(exc: BaseException) -> str:
    """What a failed party tells its peers about its failure. A :class:`ProtocolError` speaks
    only of the protocol (parties, scopes, shapes, limits: public) and travels whole; any other
    error may quote private data (a server's weight, a path, an input value), so only its type
    goes out and the message stays in the failed party's own log."""
    if isinstance(exc, ProtocolError):
        return str(exc)
    return f"{type(exc).__name__} (its message stays in that party's log)"


def abort_links(links: dict[int, Link], me: int, exc: BaseException) -> None:
    """Close ``links`` after party ``me`` failed with ``exc``: an abort goodbye tells each peer
    which party failed first (the peer a link error blames, else ``me``) and
    :func:`abort_reason`."""
    origin = getattr(exc, "failed_party", None)
    origin = me if origin is None else int(origin)
    reason = abort_reason(exc)
    for link in links.values():
        try:
            link.close(abort=(origin, reason))
        except TypeError:          # a link without abort goodbyes (in-memory links)
            link.close()
        except Exception:  # noqa: BLE001 - closing after a failure is best effort
            pass
