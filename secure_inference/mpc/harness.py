"""Harnesses that run the three parties of a session: in one process (three threads joined by
in-memory links, for tests) or as three processes over real loopback TCP with TLS
(:func:`run_local_processes`, what ``run_local`` uses): failure propagation (the first
primary error is re-raised, every party's attached), and for the processes the signal guard
and the in-memory TLS material (:mod:`.local_tls`).

Every party is assembled and shut down by :mod:`.lifecycle` (warmed up first, so no party pays
torch's lazy imports or the numba compilation inside a timed run); the test-only fault hooks
are in :mod:`.faults`.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import threading
import time
import traceback
from dataclasses import replace
from typing import Any, Callable, Sequence, TypeVar

import torch

from .errors import ProtocolError
from .faults import FAULT_PHASES
from .lifecycle import close_party, open_party
from .local_tls import memory_tls, throwaway_certificates
from .options import (CIPHERS, DEFAULT_CIPHER, DEFAULT_FRAC_BITS, DEFAULT_MAX_FRAME,
                      DEFAULT_TIMEOUT, SessionOptions)
from .prg import KEY_BYTES
from .runtime import Party, PartyView
from .session import ROLE_CLIENT, ROLES
from .transport.addresses import listen
from .transport.connect import connect_links
from .transport.link import Link, QueueLink
from .transport.tls import TLSConfig

T = TypeVar("T")

Devices = str | torch.device | Sequence[str | torch.device]


def party_device(device: Devices, role: int) -> torch.device:
    """The device of party ``role``: one device for all three, or one per role (client,
    server, helper), e.g. ``("cpu", "cuda:0", "cuda:0")``. Results and bytes do not depend on
    where a party runs."""
    if isinstance(device, (str, torch.device)):
        return torch.device(device)
    devices = list(device)
    if len(devices) != 3:
        raise ValueError(f"give one device or three (client, server, helper), got {devices}")
    return torch.device(devices[role])


PrgChoice = str | Sequence[str]


def party_prg(prg: PrgChoice, role: int) -> str:
    """The randomness cipher of party ``role``: one name for all three (a session's normal
    case), or one per role (client, server, helper), which only the mismatch tests use."""
    if isinstance(prg, str):
        return prg
    names = list(prg)
    if len(names) != 3:
        raise ValueError(f"give one prg or three (client, server, helper), got {names}")
    if any(n not in CIPHERS for n in names):
        raise ValueError(f"prg must be one of {', '.join(CIPHERS)}, got {names}")
    return names[role]


RoleOptions = SessionOptions | Sequence[SessionOptions]


def role_options(base: SessionOptions, device: Devices | None = None,
                 prg: PrgChoice | None = None) -> list[SessionOptions]:
    """The options of the three parties (client, server, helper): ``base`` with each role's
    device and cipher (one for all three or one per role; None: ``base``'s)."""
    return [replace(base, device=base.device if device is None else str(party_device(device, r)),
                    prg=base.prg if prg is None else party_prg(prg, r)) for r in ROLES]


def _per_role(options: RoleOptions) -> list[SessionOptions]:
    """One SessionOptions per role: the same for all three, or the three given."""
    if isinstance(options, SessionOptions):
        return [options] * len(ROLES)
    options = list(options)
    if len(options) != len(ROLES):
        raise ValueError(f"give one SessionOptions or three (client, server, helper), got "
                         f"{len(options)}")
    return options


__all__ = ["run_in_process", "run_local_processes", "refuse_in_bootstrap", "PartyView",
           "party_device", "party_prg", "role_options", "Devices", "PrgChoice", "RoleOptions"]


# --- in-process harness -------------------------------------------------------------------

def _pick_root(errors: dict[int, tuple[float, BaseException]]) -> BaseException:
    """The error to re-raise: the earliest primary one (not a consequence of another failure)."""
    ordered = sorted(errors.items(), key=lambda kv: kv[1][0])
    primary = [e for _, (_, e) in ordered if not getattr(e, "secondary", False)]
    root = primary[0] if primary else ordered[0][1][1]
    try:
        root.party_errors = {r: f"{type(e).__name__}: {e}" for r, (_, e) in errors.items()}
    except AttributeError:
        pass
    return root


def run_in_process(fn: Callable[[Party], T], *, frac_bits: int = DEFAULT_FRAC_BITS,
                   timeout: float = 30.0, device: Devices = "cpu",
                   max_frame: int = DEFAULT_MAX_FRAME, prg: PrgChoice = DEFAULT_CIPHER,
                   options: RoleOptions | None = None) -> list[T]:
    """Run ``fn(party)`` for roles 0, 1, 2 in three threads joined by in-memory links.

    Returns the three results in role order. If a party raises, the others are aborted at
    their next send/receive and the first primary exception is re-raised (all parties' errors
    are attached as ``exc.party_errors``). ``timeout`` bounds every wait for a frame.
    ``prg``: the randomness cipher, one for all three or one per role (a mismatch is refused
    by :func:`~.party.check_program`; per role only for tests of that check).
    ``options``: the parties' :class:`~.options.SessionOptions` (one, or one per role, see
    :func:`role_options`) instead of the settings above.
    """
    if options is None:
        options = role_options(SessionOptions(frac_bits=frac_bits, timeout=timeout,
                                              max_frame=max_frame), device, prg)
    return _run_threads(fn, Party.start, _per_role(options))


def _run_in_process_with_keys(fn: Callable[[Party], T], pair_keys: dict[tuple[int, int], bytes],
                              *, frac_bits: int = DEFAULT_FRAC_BITS, timeout: float = 30.0,
                              prg: PrgChoice = DEFAULT_CIPHER, preprocess: str = "ahead"
                              ) -> tuple[list[T], list[PartyView]]:
    """TEST HOOK, deliberately not reachable from the CLIs, ``run_local`` or any public option:
    run ``fn`` in three threads with the given pair keys (``{(0, 1): k01, (0, 2): k02,
    (1, 2): k12}``) instead of agreeing fresh ones, and record every party's view.

    The view tests use it to hold a receiver's own keys fixed while the key of the other two
    parties changes: every message the receiver gets must change with it (it is masked by
    randomness the receiver does not hold). Protocols draw no other randomness, so with all
    three keys fixed a run is deterministic.
    """
    if sorted(pair_keys) != [(0, 1), (0, 2), (1, 2)]:
        raise ValueError("pair_keys needs exactly the keys (0, 1), (0, 2) and (1, 2)")
    if any(not isinstance(k, bytes) or len(k) != KEY_BYTES for k in pair_keys.values()):
        raise ValueError(f"pair keys are {KEY_BYTES}-byte strings")
    views = [PartyView() for _ in ROLES]

    def begin(party: Party) -> None:
        party._pair_keys = {p: pair_keys[tuple(sorted((party.role, p)))]
                            for p in ROLES if p != party.role}
        party._view = views[party.role]

    options = role_options(SessionOptions(frac_bits=frac_bits, timeout=timeout,
                                          preprocess=preprocess), "cpu", prg)
    results = _run_threads(fn, begin, options)
    return results, views


def _run_threads(fn: Callable[[Party], T], begin: Callable[[Party], None],
                 options: list[SessionOptions]) -> list[T]:
    """Body of :func:`run_in_process`; ``begin(party)`` starts each party's session."""
    abort = threading.Event()
    links: dict[int, dict[int, Link]] = {r: {} for r in ROLES}
    for a, b in ((0, 1), (0, 2), (1, 2)):   # each end checks frames against its own limit
        qa, qb = queue.Queue(), queue.Queue()
        links[a][b] = QueueLink(a, b, qa, qb, abort, options[a].max_frame)
        links[b][a] = QueueLink(b, a, qb, qa, abort, options[b].max_frame)
    results: dict[int, Any] = {}
    errors: dict[int, tuple[float, BaseException]] = {}

    def body(role: int) -> None:
        try:
            party = open_party(role, links[role], options[role])
            begin(party)
            results[role] = fn(party)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors[role] = (time.monotonic(), exc)
            abort.set()  # before closing, so the others see an abort, not a plain close
        finally:
            for link in links[role].values():
                link.close()

    threads = [threading.Thread(target=body, args=(r,), name=f"party-{r}", daemon=True)
               for r in ROLES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise _pick_root(errors)
    return [results[r] for r in ROLES]


# --- process harness ----------------------------------------------------------------------

_EXIT_MAIN_GUARD = 86   # a party process re-ran the caller's script: see refuse_in_bootstrap
_last_pids: dict[int, int] = {}   # pids of the latest run's party processes (tests)


def _send(conn, msg: tuple) -> None:
    """Send by value with plain pickle: torch's multiprocessing reductions would pass tensors
    through shared memory that disappears when the child exits."""
    conn.send_bytes(pickle.dumps(msg))


def refuse_in_bootstrap() -> None:
    """End this process at once if it is a multiprocessing child importing the caller's main
    module: the caller's script then runs ``run_local`` at import time (no main guard), and
    every party process would start the whole run again. The parent recognises the exit code
    and says how to fix it; without this the user got a bootstrapping RuntimeError and an
    ``AssertionError`` from a cleanup that joined an unstarted process."""
    if getattr(mp.process.current_process(), "_inheriting", False):
        os.write(2, b"secure_inference: a party process imported the caller's main module, "
                    b"which starts a secure run at import time; put that call under "
                    b"`if __name__ == \"__main__\":`\n")
        os._exit(_EXIT_MAIN_GUARD)



def _watch_parent(conn) -> None:
    """End this party process when the harness's end of its pipe closes (the caller exited or
    was killed): the caller sends nothing after the start message, so any readability is EOF.
    Without this, a SIGKILLed caller left its three parties (and so the fork server and the
    resource tracker, which wait for them) running."""
    def watch() -> None:
        try:
            conn.poll(None)
        except Exception:  # noqa: BLE001 - a broken pipe means the same
            pass
        os._exit(70)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _process_main(role: int, fn: Callable[..., Any], conn, cfg: dict) -> None:
    """Body of one party process: listen, report the port, receive the addresses (and this
    role's TLS material and private input, through this process's own pipe), connect, run,
    report the outcome. After a failure the peers get an abort goodbye naming the cause."""
    try:
        options: SessionOptions = cfg["options"][role]
        torch.set_num_threads(cfg["threads"])  # three busy parties share the machine's cores
        listener = listen(cfg["host"], 0) if role != ROLE_CLIENT else None
        _send(conn, ("port", listener.getsockname()[1] if listener else None))
        if not conn.poll(options.timeout):
            raise ProtocolError(f"party {role}: no address list from the harness")
        addresses, material, private = pickle.loads(conn.recv_bytes())
        _watch_parent(conn)
        release: Callable[[], None] = lambda: None  # noqa: E731
        tls = None
        if cfg["tls"]:
            if material is not None:
                tls, release = memory_tls(material)
            else:
                tls = TLSConfig.from_dir(cfg["certs_dir"], role)
        try:
            links = connect_links(role, addresses, listener, tls=tls,
                                  allow_plaintext=not cfg["tls"], timeout=options.timeout,
                                  max_frame=options.max_frame)
        finally:
            release()   # the links are up (or failed): the TLS files are no longer needed
            if listener is not None:
                listener.close()
        fault = cfg["fault"][1] if cfg.get("fault") and cfg["fault"][0] == role else None
        party = open_party(role, links, options, fault=fault)
        try:
            party.start()
            result = fn(party) if not cfg["private"] else fn(party, private)
        except BaseException as exc:
            failed_at = time.time()  # before closing: peers see the close only afterwards
            close_party(party, exc)
            raise
        party.close()
        _send(conn, ("ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        tb = traceback.format_exc()
        failed_at = locals().get("failed_at", time.time())
        try:
            payload = pickle.dumps(exc)
        except Exception:  # noqa: BLE001 - unpicklable exception: send its text
            payload = pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))
        try:
            _send(conn, ("error", payload, tb, failed_at))
        except OSError:
            pass


class _Terminated(BaseException):
    """Raised by the temporary SIGTERM handler so that the harness's cleanup runs."""


class _TermGuard:
    """While a run is in progress (main thread only), SIGTERM raises :class:`_Terminated`, so
    the harness ends its party processes before the caller goes; :meth:`restore` puts the
    previous handler back and :meth:`redeliver` then acts as that handler would have."""

    def __init__(self) -> None:
        import signal
        self.prev: Any = None
        self.armed = self.got = False
        if threading.current_thread() is not threading.main_thread():
            return
        prev = signal.getsignal(signal.SIGTERM)
        if prev is signal.SIG_IGN or prev is None:
            return                # ignored (or set outside Python): leave it alone
        self.prev, self.armed = prev, True
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.got = True
        if self.armed:
            self.armed = False
            raise _Terminated()

    def hold(self) -> None:
        """From here on a SIGTERM is only noted (cleanup must not be interrupted)."""
        self.armed = False

    def restore(self) -> None:
        import signal
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)

    def redeliver(self) -> None:
        """Act on a SIGTERM that arrived during the run, now that everything is cleaned up."""
        import signal
        signal.raise_signal(signal.SIGTERM)   # the previous handler (default: terminate)
        raise ProtocolError("the secure run was stopped by SIGTERM; its party processes were "
                            "ended")


def run_local_processes(fn: Callable[[Party], T], *, tls: bool = True,
                        timeout: float = DEFAULT_TIMEOUT, frac_bits: int = DEFAULT_FRAC_BITS,
                        device: Devices = "cpu", certs_dir: str | os.PathLike | None = None,
                        host: str = "127.0.0.1", wall_timeout: float | None = None,
                        max_frame: int = DEFAULT_MAX_FRAME, threads: int | None = None,
                        private: dict[int, Any] | None = None,
                        prg: PrgChoice = DEFAULT_CIPHER, options: RoleOptions | None = None,
                        _fault: tuple[int, str] | None = None) -> list[T]:
    """Run ``fn(party)`` in three processes over real loopback TCP (TLS 1.3 unless ``tls=False``).

    ``fn`` must be picklable (a module-level function or a functools.partial of one) and its
    results too. Without ``certs_dir`` a throw-away CA and party certificates are made in
    memory; each party gets only its own key, through its own pipe, and never on disk.
    ``private``: each role's private input (e.g. the client's images, the server's weights),
    sent by value through that role's pipe only (no files) and passed as
    ``fn(party, private[role])`` (None for a role without one).
    ``timeout`` bounds every wait for a peer; ``wall_timeout`` (default: none) bounds the whole
    run, after which the processes are killed. Every child process is ended before returning,
    also when the caller gets SIGTERM (then the signal is passed on), and a party process ends
    by itself when its caller dies (even by SIGKILL).
    ``threads``: torch threads per party (default: a third of the cores, at least one; with
    torch's default every party would spin on every core and all three slow down ~10×).
    ``prg``: the randomness cipher (:mod:`.prg`), one for all or one per role.
    ``options``: the parties' :class:`~.options.SessionOptions` (one, or one per role, see
    :func:`role_options`) instead of ``timeout``, ``frac_bits``, ``device``, ``max_frame``
    and ``prg``.
    A failure re-raises the first primary error (``exc.party_errors`` lists every party's).
    """
    refuse_in_bootstrap()
    if _fault is not None and (_fault[0] not in ROLES or _fault[1] not in FAULT_PHASES):
        raise ValueError(f"_fault must be (role, phase) with a phase in {FAULT_PHASES}")
    if options is None:
        options = role_options(SessionOptions(frac_bits=frac_bits, timeout=timeout,
                                              max_frame=max_frame), device, prg)
    options = _per_role(options)
    guard = _TermGuard()
    try:
        return _run_processes(fn, guard, tls=tls, options=options, certs_dir=certs_dir,
                              host=host, wall_timeout=wall_timeout, threads=threads,
                              private=private, fault=_fault)
    except _Terminated:
        pass
    finally:
        guard.restore()
    guard.redeliver()
    raise AssertionError("unreachable")  # pragma: no cover


def _run_processes(fn, guard: _TermGuard, *, tls, options: list[SessionOptions], certs_dir, host,
                   wall_timeout, threads, private, fault) -> list:
    """Body of :func:`run_local_processes`."""
    # forkserver: children fork from a clean server that has imported the runtime (and torch)
    # once, so they start fast and never inherit a parent's busy OpenMP/thread state.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["secure_inference.mpc.harness", "secure_inference.mpc._preload"])
    material: dict[int, Any] = {r: None for r in ROLES}
    if tls and certs_dir is None:
        material = throwaway_certificates(host)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // 3)
    cfg = dict(host=host, tls=tls, certs_dir=str(certs_dir) if certs_dir else None,
               options=options, threads=int(threads), private=private is not None, fault=fault)
    timeout = max(o.timeout for o in options)
    pipes, procs, stuck = {}, {}, set()
    _last_pids.clear()
    deadline = None if wall_timeout is None else time.monotonic() + wall_timeout
    outcomes: dict[int, tuple] = {}
    try:
        for r in ROLES:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_main, args=(r, fn, child, cfg),
                               name=f"secure-inference-party-{r}", daemon=True)
            pipes[r] = parent
            try:
                proc.start()
            finally:
                child.close()
            procs[r] = proc          # only started processes are joined in the cleanup
            _last_pids[r] = proc.pid
        ports: dict[int, Any] = {}
        for r in ROLES:  # each child reports its listening port (or fails first)
            msg = _wait_message(pipes[r], procs[r], timeout + 30.0)
            if msg[0] == "port":
                ports[r] = msg[1]
            else:
                outcomes[r] = msg
        if len(ports) < len(ROLES):  # a party failed before listening: stop the others now
            for r in ports:
                procs[r].kill()
                outcomes[r] = ("aborted",)
        else:
            addresses = {r: (host, ports[r] or 0) for r in ROLES}
            for r in ROLES:
                mine = None if private is None else private.get(r)
                _send(pipes[r], (addresses, material[r], mine))
        for r in ROLES:
            while r not in outcomes:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    stuck.add(r)
                    outcomes[r] = ("error", pickle.dumps(ProtocolError(
                        f"party {r} did not finish within wall_timeout={wall_timeout:g} s")),
                        "", time.time())
                    break
                outcomes[r] = _wait_message(pipes[r], procs[r], left)
    except _Terminated:
        stuck.update(procs)          # stopping: kill every party at once, do not wait
        raise
    finally:
        guard.hold()
        for r, p in procs.items():
            if r not in stuck:  # a party that reported exits by itself in a moment
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for c in pipes.values():
            c.close()
        material = None
    if guard.got:
        raise _Terminated()
    errors: dict[int, tuple[float, BaseException]] = {}
    for r, msg in outcomes.items():
        if msg[0] == "ok":
            continue
        if msg[0] == "aborted":
            errors[r] = (float("inf"), ProtocolError(
                f"party {r} was stopped because another party failed at start-up", secondary=True))
        elif msg[0] == "died":
            if msg[1] == _EXIT_MAIN_GUARD:
                raise RuntimeError(
                    "the party processes could not start: the script that calls run_local (or "
                    "run_local_processes) does so at import time, and every party process "
                    "imports the main module, so it started the run again. Put the call under "
                    "`if __name__ == \"__main__\":` (see the multiprocessing docs, 'safe "
                    "importing of main module')")
            how = (f"was killed by signal {-msg[1]}" if isinstance(msg[1], int) and msg[1] < 0
                   else f"died (exit code {msg[1]})")
            errors[r] = (0.0, ProtocolError(f"party {r} {how} without a result"))
        else:
            exc = pickle.loads(msg[1])
            exc.__notes__ = [f"party {r} traceback:\n{msg[2]}"]
            errors[r] = (msg[3], exc)
    if errors:
        raise _pick_root(errors)
    return [outcomes[r][1] for r in ROLES]


def _wait_message(conn, proc, timeout: float | None) -> tuple:
    """The next message from a child, ('died', exitcode) if it exits without one, or a
    ('error', ...) after ``timeout`` seconds of silence."""
    start = time.monotonic()
    while True:
        if conn.poll(0.05):
            try:
                return pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                proc.join(timeout=5.0)
                return ("died", proc.exitcode)
        if not proc.is_alive() and not conn.poll(0):
            return ("died", proc.exitcode)
        if timeout is not None and time.monotonic() - start > timeout:
            return ("error", pickle.dumps(ProtocolError(
                f"{proc.name}: no message within {timeout:g} s")), "", time.time())
