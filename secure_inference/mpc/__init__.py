"""Three-party secure runtime: ring, randomness, links, parties, protocols and whole networks.

For a whole network start with :func:`run_local` (compile a torch model, run the client,
server and crypto provider as three local processes over loopback TCP/TLS, return the revealed
outputs and the run report). For single protocols use :func:`run_in_process` (threads,
in-memory links) or :func:`run_local_processes`; protocols live in
:mod:`secure_inference.mpc.protocols`.
"""
from .ring import DEFAULT_FRAC_BITS, decode, encode, truncate_share
from .errors import ProtocolError
from .runtime import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER, CommStats, Party, merge_stats
from .harness import run_in_process, run_local_processes

__all__ = ["DEFAULT_FRAC_BITS", "decode", "encode", "truncate_share", "ROLE_CLIENT",
           "ROLE_SERVER", "ROLE_HELPER", "CommStats", "Party", "ProtocolError", "merge_stats",
           "run_in_process", "run_local_processes", "run_local", "compile_model"]


def __getattr__(name: str):
    # the compiler pulls in model-tracing code; load it only when asked for
    if name == "run_local":
        from .local import run_local
        return run_local
    if name == "compile_model":
        from .compile import compile_model
        return compile_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
