"""``--serve`` of si-server and si-crypto-provider: load and compile once, then serve sessions
(each in its own process, :mod:`secure_inference.mpc.service`) until stopped."""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from typing import Any

from secure_inference.mpc.service import (DEFAULT_GRACE_SECONDS, DEFAULT_MAX_SESSION_SECONDS,
                                          DEFAULT_MAX_SESSIONS, DEFAULT_SETUP_SECONDS)

# the frames the client sends the server and the helper before anything else: its X25519 key
# (session-keys), then in the header its program fingerprint and settings, the batch count
# and the batch sizes; --setup-seconds bounds the wait for them (pinned by a test)
SETUP_FRAMES = 4


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """--serve and its limits (server and helper)."""
    g = parser.add_argument_group("service mode (docs/secure_inference.md, 'Service mode')")
    g.add_argument("--serve", action="store_true",
                   help="serve sessions until stopped (server and helper both) instead of one")
    g.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, metavar="N",
                   help="sessions at once; a client beyond them is told the service is busy "
                   f"(default {DEFAULT_MAX_SESSIONS})")
    g.add_argument("--max-session-seconds", type=float, default=DEFAULT_MAX_SESSION_SECONDS,
                   metavar="S", help="a longer session is ended "
                   f"(default {DEFAULT_MAX_SESSION_SECONDS:g})")
    g.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_SECONDS, metavar="S",
                   help="after SIGTERM, how long running sessions may take to finish "
                   f"(default {DEFAULT_GRACE_SECONDS:g})")
    g.add_argument("--setup-seconds", type=float, default=DEFAULT_SETUP_SECONDS, metavar="S",
                   help="a session's set-up: the helper drops a session whose other party has "
                   "not arrived within S, and a session ends that has not completed its key "
                   "agreement, header check and batch announcement S after it started "
                   f"(default {DEFAULT_SETUP_SECONDS:g})")
    g.add_argument("--log-json", action="store_true", help="log lines as JSON objects")


class SetupDeadline:
    """The client's link in a service session: until the client's first :data:`SETUP_FRAMES`
    frames (key agreement, header check, batch announcement) have arrived, no receive waits
    past ``deadline`` (monotonic; ``seconds`` after the session started); every other
    attribute is the wrapped link's. A client that pairs and then stalls frees its slot."""

    def __init__(self, link, deadline: float, seconds: float) -> None:
        self._inner, self._deadline, self._seconds = link, deadline, seconds
        self._left = SETUP_FRAMES

    def _late(self):
        from secure_inference.mpc.errors import ProtocolError
        err = ProtocolError(f"party {self._inner.me}: party 0 (client) did not complete the key "
                            "agreement, header check and batch announcement within "
                            f"{self._seconds:g} s of the session's start (--setup-seconds); "
                            "the session ended")
        err.failed_party = 0
        return err

    def recv(self, timeout: float) -> bytes:
        """A frame from the client (bounded by the set-up deadline until it is over)."""
        if self._left <= 0:
            return self._inner.recv(timeout)
        from secure_inference.mpc.errors import ProtocolError
        wait = self._deadline - time.monotonic()
        if wait <= 0:
            raise self._late()
        try:
            body = self._inner.recv(min(timeout, wait))
        except ProtocolError as exc:
            if wait < timeout and time.monotonic() >= self._deadline:
                raise self._late() from exc
            raise
        self._left -= 1
        return body

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _session(role: int, socks: dict[int, socket.socket], sid: bytes, cfg: dict[str, Any],
             options, tls, program, weights, threads: int,
             setup_seconds: float = DEFAULT_SETUP_SECONDS) -> dict[str, Any]:
    """One session in its forked process: (server) dial the helper with the identifier, then
    run the program exactly as a one-shot session does; the client's link is bounded by
    :class:`SetupDeadline` (``setup_seconds`` from now)."""
    start = time.monotonic()
    import torch

    from secure_inference.mpc.errors import ProtocolError
    from secure_inference.mpc.faults import fault_from_environment
    from secure_inference.mpc.lifecycle import abort_links, close_party, open_party
    from secure_inference.mpc.party import gather_results, run_party
    from secure_inference.mpc.session_config import party_addresses
    from secure_inference.mpc.transport.connect import connect_session
    from secure_inference.mpc.transport.socket_link import SocketLink
    torch.set_num_threads(threads)
    links: dict[int, Any] = {peer: SocketLink(sock, role, peer, options.max_frame)
                             for peer, sock in socks.items()}
    links[0] = SetupDeadline(links[0], start + setup_seconds, setup_seconds)
    if role == 1:
        addresses = party_addresses(cfg)
        try:
            helper, served = connect_session(1, {1: addresses[1], 2: addresses[2]}, None,
                                             tls=tls, allow_plaintext=bool(cfg["plaintext"]),
                                             timeout=options.timeout,
                                             max_frame=options.max_frame, session_id=sid)
            if served is None:
                for link in helper.values():
                    link.close()
                raise ProtocolError("party 1: the helper does not run as a service: start it "
                                    "with --serve too")
        except BaseException as exc:   # the client learns why (e.g. the helper is busy)
            abort_links(links, 1, exc)
            raise
        links.update(helper)
    party = open_party(role, links, dataclasses.replace(options, session_id=sid),
                       fault=fault_from_environment(role))
    try:
        party.start()
        result = run_party(party, program, weights=weights)
        gather_results(party, result)
    except BaseException as exc:
        close_party(party, exc)
        raise
    party.close()
    total = result["stats"].total()
    return {"outcome": "ok", "images": sum(result["batch_sizes"]),
            "bytes": int(total.sent + total.received)}


def serve_forever(role: int, args: argparse.Namespace, checkpoint: str | None = None) -> int:
    """The ``--serve`` command of the listening parties."""
    from ._party import (UserError, build_model, check_addresses, compile_for, limits_from,
                         options_for, resolve, tls_config)
    if args.max_sessions < 1 or args.max_session_seconds <= 0 or args.grace_seconds < 0 \
            or args.setup_seconds <= 0:
        raise UserError("--max-sessions must be >= 1, --max-session-seconds > 0, "
                        "--grace-seconds >= 0 and --setup-seconds > 0")
    # the parent forks its sessions: its --device check must not initialise CUDA (torch's
    # default check does, through the CUDA runtime, and a forked child could not use CUDA
    # then); torch asks NVML instead with this set (docs: "Service mode", GPUs)
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import torch
    name = "server" if role == 1 else "helper"
    limits = limits_from(args)
    cfg = resolve(args)
    threads = int(cfg.get("threads") or torch.get_num_threads())
    torch.set_num_threads(1)    # OpenMP threads must not run in a parent that forks
    check_addresses(cfg)
    tls = tls_config(role, cfg)
    options = options_for(cfg, limits)
    model, shape = build_model(cfg, checkpoint=checkpoint)
    program, weights = compile_for(model, shape, 1, cfg)
    del model
    from secure_inference.mpc.lifecycle import warm_up
    from secure_inference.mpc.service import ServiceSettings, serve
    from secure_inference.mpc.session_config import party_addresses
    from secure_inference.mpc.transport.addresses import is_loopback, listen
    from secure_inference.mpc.transport.tls import check_own_certificate
    warm_up()
    addresses = party_addresses(cfg)
    host, port = addresses[role]
    if tls is None:
        if not cfg["plaintext"] or not all(is_loopback(h) for h, _ in addresses.values()):
            raise UserError("plaintext links are only allowed on loopback addresses (this "
                            "party's listening address included): use TLS (--certs)")
    else:
        check_own_certificate(role, tls)
    try:
        listener = listen(host, port)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(f"{name}: compiled {len(program.layers)} secure layers", file=sys.stderr, flush=True)
    settings = ServiceSettings(
        name=name, role=role, wanted=frozenset({0} if role == 1 else {0, 1}),
        max_sessions=args.max_sessions, max_session_seconds=args.max_session_seconds,
        grace_seconds=args.grace_seconds, pair_timeout=args.setup_seconds,
        log_json=args.log_json)
    ctx = tls.context(True) if tls is not None else None
    return serve(listener, ctx, settings,
                 lambda socks, sid: _session(role, socks, sid, cfg, options, tls, program,
                                             weights if role == 1 else None, threads,
                                             args.setup_seconds),
                 allow_peer=(lambda h: True) if tls is not None else is_loopback)
