"""Three-party secure runtime: ring, randomness, links, parties and the linear/pooling protocols.

Start with :func:`run_in_process` (threads, in-memory links) or :func:`run_local_processes`
(three processes over loopback TCP/TLS); protocols live in :mod:`secure_inference.mpc.protocols`.
"""
from .ring import DEFAULT_FRAC_BITS, decode, encode, truncate_share
from .runtime import (ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER, CommStats, Party, ProtocolError,
                      merge_stats, run_in_process, run_local_processes)

__all__ = ["DEFAULT_FRAC_BITS", "decode", "encode", "truncate_share", "ROLE_CLIENT",
           "ROLE_SERVER", "ROLE_HELPER", "CommStats", "Party", "ProtocolError", "merge_stats",
           "run_in_process", "run_local_processes"]
