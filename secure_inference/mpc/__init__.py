"""Three-party secure runtime: ring, randomness, links, parties, protocols and whole networks.

For a whole network start with :func:`run_local` (compile a torch model, run the client,
server and crypto provider as three local processes over loopback TCP/TLS, return the revealed
outputs and the run report). For single protocols use :func:`run_in_process` (threads,
in-memory links) or :func:`run_local_processes`; protocols live in
:mod:`secure_inference.mpc.protocols`.

Importing this package loads no torch: the names below load on first use, so the command
lines can read :mod:`.options` and :mod:`.session_config` before answering ``--help``.
"""
from __future__ import annotations

from .._lazy import lazy_exports


_EXPORTS = {
    "options": ("DEFAULT_FRAC_BITS", "SessionOptions", "SessionLimits"),
    "ring": ("decode", "encode", "truncate_share"),
    "session": ("ROLE_CLIENT", "ROLE_SERVER", "ROLE_HELPER"),
    "stats": ("CommStats", "merge_stats"),
    "runtime": ("Party",),
    "errors": ("ProtocolError",),
    "harness": ("run_in_process", "run_local_processes"),
    "local": ("run_local",),
    "trace": ("compile_model",),
}

__all__ = ["DEFAULT_FRAC_BITS", "decode", "encode", "truncate_share", "ROLE_CLIENT",
           "ROLE_SERVER", "ROLE_HELPER", "CommStats", "Party", "ProtocolError", "merge_stats",
           "run_in_process", "run_local_processes", "run_local", "compile_model",
           "SessionOptions", "SessionLimits"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
