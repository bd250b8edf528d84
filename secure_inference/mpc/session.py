"""The session contract shared by every part of the secure runtime: the three roles and the
statistics scopes whose names other modules (the report, the fault hooks) rely on.

Roles: P0 client (holds the image, learns the output), P1 server (holds the weights), P2
helper (deals correlated randomness, sees only masked values). ``Role`` is an ``IntEnum``, so
``Role.SERVER == 1`` and roles index lists and frames as plain integers.

Scopes: every protocol step runs in a named statistics scope (:meth:`.runtime.Party.scope`);
the names below are the ones with a meaning outside the step itself. Renaming one here renames
it everywhere, which is the point: the report derives the phases of a run from them.
"""
from __future__ import annotations

from enum import IntEnum

__all__ = ["Role", "ROLE_CLIENT", "ROLE_SERVER", "ROLE_HELPER", "ROLES", "PARTY_KEYS", "PARTY_NAMES",
           "SCOPE_KEYS", "SCOPE_HEADER", "SCOPE_SETUP", "SCOPE_PREPROCESS", "SCOPE_OUTPUT",
           "SCOPE_REPORT"]


class Role(IntEnum):
    """The three parties; ``key`` is the lower-case name used in reports and files."""

    CLIENT = 0
    SERVER = 1
    HELPER = 2

    @property
    def key(self) -> str:
        return self.name.lower()


ROLE_CLIENT, ROLE_SERVER, ROLE_HELPER = Role.CLIENT, Role.SERVER, Role.HELPER
ROLES = (ROLE_CLIENT, ROLE_SERVER, ROLE_HELPER)
PARTY_KEYS = tuple(r.key for r in ROLES)        # ("client", "server", "helper")
PARTY_NAMES = {int(r): r.key for r in ROLES}    # role number -> name (messages, TLS files)

SCOPE_KEYS = "session-keys"     # pair-key agreement at session start
SCOPE_HEADER = "header"         # program fingerprint and settings, batch sizes, ready barrier
SCOPE_SETUP = "open-weights"    # sub-scope of each server-weight layer: F = W − B, once
SCOPE_PREPROCESS = "preprocess" # per batch, the input-independent half of the linear layers
SCOPE_OUTPUT = "output"         # revealing the result to the client
SCOPE_REPORT = "report"         # traffic counters and timings sent to the client at the end
