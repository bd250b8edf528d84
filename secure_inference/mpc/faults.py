"""Test-only fault hooks: a party that kills its own process at a chosen phase.

Nothing in a normal run arms them. The process harness arms one through its private
``_fault`` keyword (:func:`~.harness.run_local_processes`); the party command lines arm one
when the environment variable :data:`FAULT_ENV` is ``"ROLE:PHASE"`` (e.g. ``1:report``: the
server kills itself at the report exchange), which only the fault tests set.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .runtime import Party
from .session import SCOPE_HEADER, SCOPE_KEYS, SCOPE_PREPROCESS, SCOPE_REPORT, SCOPE_SETUP

__all__ = ["FAULT_PHASES", "FAULT_ENV", "arm_fault", "fault_from_environment"]

FAULT_PHASES = ("keys", "setup", "preprocess", "online", "report")
FAULT_ENV = "SI_TEST_FAULT"


def fault_from_environment(role: int) -> str | None:
    """The fault phase :data:`FAULT_ENV` asks of party ``role`` (``"ROLE:PHASE"``), else None."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault.startswith(f"{role}:"):
        return fault.split(":", 1)[1]
    return None


def arm_fault(party: Party, phase: str) -> None:
    """TEST HOOK (the harness's private ``_fault`` keyword, or :data:`FAULT_ENV` for the CLIs):
    SIGKILL this party's own process at its first message or scope of ``phase`` (one of
    :data:`FAULT_PHASES`: key agreement, weight opening, preprocessing, online, report; with
    the interleaved schedule preprocessing and online are the same first layer scope)."""
    import signal
    seen = {"preprocess": False, "setup": False}
    # the interleaved schedule has no preprocessing phase: its mask products run inside the
    # online layers, so "preprocess" is the first online scope after the set-up there
    interleaved = party.options.preprocess == "interleaved"

    def check() -> None:
        path = party.scope_path
        top = path.split("/", 1)[0]
        if path.endswith(SCOPE_SETUP):
            seen["setup"] = True
        in_layers = (top not in (SCOPE_PREPROCESS, SCOPE_HEADER, SCOPE_REPORT, SCOPE_KEYS)
                     and not path.endswith(SCOPE_SETUP))
        preprocessing = (seen["setup"] and in_layers) if interleaved else \
            top == SCOPE_PREPROCESS
        if preprocessing:
            seen["preprocess"] = True
        due = {"keys": top == SCOPE_KEYS,
               "setup": path.endswith(SCOPE_SETUP),
               "preprocess": preprocessing,
               "online": seen["preprocess"] and in_layers,
               "report": top == SCOPE_REPORT}[phase]
        if due:
            # a crash AT the phase: every frame of the phases before it has left the party
            # (without the wait, a frame still queued in a link's I/O thread died with the
            # process, and what the peers saw depended on thread timing: flaky tests)
            for link in party.links.values():
                link.wait_sent(5.0)
            os.kill(os.getpid(), signal.SIGKILL)

    send, recv, scope = party.send, party.recv, party.scope

    def send_(to, x):
        check()
        return send(to, x)

    def recv_(frm, shape, dtype=torch.int64):
        check()
        return recv(frm, shape, dtype)

    @contextlib.contextmanager
    def scope_(name):     # also on entering a scope: a party may have no message in a phase
        with scope(name):
            check()
            yield

    party.send, party.recv, party.scope = send_, recv_, scope_
