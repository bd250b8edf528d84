"""Harnesses that run the three parties of a session: in one process (three threads joined by
in-memory links, for tests) or as three processes over real loopback TCP with TLS
(:func:`run_local_processes`, what ``run_local`` uses), plus their fault handling.

Both warm every party up first (:func:`warm_up`), so no party pays torch's lazy imports or the
numba compilation inside a timed run.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Sequence, TypeVar

import torch
from cryptography.hazmat.primitives import serialization

from .prg import CIPHERS, DEFAULT_CIPHER, KEY_BYTES
from .ring import DEFAULT_FRAC_BITS
from .errors import ProtocolError
from .transport.addresses import listen
from .transport.connect import connect_links
from .transport.frames import DEFAULT_MAX_FRAME
from .transport.link import Link, QueueLink
from .transport.tls import TLSConfig

from .protocols import compare_kernels
from .runtime import DEFAULT_TIMEOUT, Party, PartyView
from .session import (ROLE_CLIENT, ROLES, SCOPE_HEADER, SCOPE_KEYS, SCOPE_PREPROCESS, SCOPE_REPORT,
                      SCOPE_SETUP)

T = TypeVar("T")
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


__all__ = ["warm_up", "run_in_process", "run_local_processes", "close_party", "abort_links", "abort_reason",
           "PartyView", "FAULT_PHASES", "party_device", "party_prg",
           "Devices", "PrgChoice"]


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
                   max_frame: int = DEFAULT_MAX_FRAME, prg: PrgChoice = DEFAULT_CIPHER
                   ) -> list[T]:
    """Run ``fn(party)`` for roles 0, 1, 2 in three threads joined by in-memory links.

    Returns the three results in role order. If a party raises, the others are aborted at
    their next send/receive and the first primary exception is re-raised (all parties' errors
    are attached as ``exc.party_errors``). ``timeout`` bounds every wait for a frame.
    ``prg``: the randomness cipher, one for all three or one per role (a mismatch is refused
    by :func:`~.party.check_program`; per role only for tests of that check).
    """
    return _run_threads(fn, Party.start, frac_bits=frac_bits, timeout=timeout, device=device,
                        max_frame=max_frame, prg=prg)


def _run_in_process_with_keys(fn: Callable[[Party], T], pair_keys: dict[tuple[int, int], bytes],
                              *, frac_bits: int = DEFAULT_FRAC_BITS, timeout: float = 30.0,
                              prg: PrgChoice = DEFAULT_CIPHER
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

    results = _run_threads(fn, begin, frac_bits=frac_bits, timeout=timeout, device="cpu",
                           max_frame=DEFAULT_MAX_FRAME, prg=prg)
    return results, views


def _run_threads(fn: Callable[[Party], T], begin: Callable[[Party], None], *, frac_bits: int,
                 timeout: float, device: Devices, max_frame: int,
                 prg: PrgChoice = DEFAULT_CIPHER) -> list[T]:
    """Body of :func:`run_in_process`; ``begin(party)`` starts each party's session."""
    abort = threading.Event()
    links: dict[int, dict[int, Link]] = {r: {} for r in ROLES}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        la, lb = QueueLink.pair(a, b, abort, max_frame)
        links[a][b], links[b][a] = la, lb
    results: dict[int, Any] = {}
    errors: dict[int, tuple[float, BaseException]] = {}

    def body(role: int) -> None:
        try:
            warm_up()
            party = Party(role, links[role], device=party_device(device, role),
                          frac_bits=frac_bits, prg=party_prg(prg, role),
                          timeout=timeout, max_frame=max_frame)
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

_EXIT_MAIN_GUARD = 86   # a party process re-ran the caller's script: see _refuse_in_bootstrap
FAULT_PHASES = ("keys", "setup", "preprocess", "online", "report")
_last_pids: dict[int, int] = {}   # pids of the latest run's party processes (tests)


def _send(conn, msg: tuple) -> None:
    """Send by value with plain pickle: torch's multiprocessing reductions would pass tensors
    through shared memory that disappears when the child exits."""
    conn.send_bytes(pickle.dumps(msg))


def _refuse_in_bootstrap() -> None:
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


def _arm_fault(party: Party, phase: str) -> None:
    """TEST HOOK (only through the private ``_fault`` keyword of :func:`run_local_processes`):
    SIGKILL this party's own process at its first message or scope of ``phase`` (one of
    :data:`FAULT_PHASES`: key agreement, weight opening, preprocessing, online, report)."""
    import signal
    seen = {"preprocess": False}

    def check() -> None:
        path = party.scope_path
        top = path.split("/", 1)[0]
        if top == SCOPE_PREPROCESS:
            seen["preprocess"] = True
        due = {"keys": top == SCOPE_KEYS,
               "setup": path.endswith(SCOPE_SETUP),
               "preprocess": top == SCOPE_PREPROCESS,
               "online": seen["preprocess"] and top not in (SCOPE_PREPROCESS, SCOPE_HEADER,
                                                             SCOPE_REPORT),
               "report": top == SCOPE_REPORT}[phase]
        if due:
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


def _memory_tls(material: tuple[bytes, bytes, bytes]) -> tuple[TLSConfig, Callable[[], None]]:
    """TLS files for this process only: CA certificate, certificate and key in anonymous
    memory files (Linux memfd; gone when the process ends, even if it is killed). Elsewhere
    a 0700 temporary folder, deleted by the returned cleanup once the links are up."""
    names = ("ca.pem", "party.pem", "party.key")
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = []
        for name, data in zip(names, material):
            fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
            os.write(fd, data)
            fds.append(fd)
        paths = [f"/proc/self/fd/{fd}" for fd in fds]

        def cleanup() -> None:
            for fd in fds:
                os.close(fd)
    else:  # pragma: no cover - non-Linux
        import shutil
        folder = tempfile.mkdtemp(prefix="si-party-tls-")
        paths = [os.path.join(folder, n) for n in names]
        for path, data in zip(paths, material):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)

        def cleanup() -> None:
            shutil.rmtree(folder, ignore_errors=True)
    from pathlib import Path
    return TLSConfig(Path(paths[0]), Path(paths[1]), Path(paths[2])), cleanup


def _throwaway_certificates(host: str) -> dict[int, tuple[bytes, bytes, bytes]]:
    """A fresh CA and one certificate per party, in memory only: per role (CA certificate,
    certificate, key) as PEM bytes. The CA key is never written anywhere and is dropped here."""
    from .certs import create_ca, create_party_certificate
    ca_key, ca_cert = create_ca()
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    out = {}
    for r in ROLES:
        key, cert = create_party_certificate(ca_key, ca_cert, r, ["localhost", host])
        out[r] = (ca_pem, cert.public_bytes(serialization.Encoding.PEM),
                  key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return out


def _process_main(role: int, fn: Callable[..., Any], conn, cfg: dict) -> None:
    """Body of one party process: listen, report the port, receive the addresses (and this
    role's TLS material and private input, through this process's own pipe), connect, run,
    report the outcome. After a failure the peers get an abort goodbye naming the cause."""
    try:
        torch.set_num_threads(cfg["threads"])  # three busy parties share the machine's cores
        listener = listen(cfg["host"], 0) if role != ROLE_CLIENT else None
        _send(conn, ("port", listener.getsockname()[1] if listener else None))
        if not conn.poll(cfg["timeout"]):
            raise ProtocolError(f"party {role}: no address list from the harness")
        addresses, material, private = pickle.loads(conn.recv_bytes())
        _watch_parent(conn)
        release: Callable[[], None] = lambda: None  # noqa: E731
        tls = None
        if cfg["tls"]:
            if material is not None:
                tls, release = _memory_tls(material)
            else:
                tls = TLSConfig.from_dir(cfg["certs_dir"], role)
        try:
            links = connect_links(role, addresses, listener, tls=tls,
                                  allow_plaintext=not cfg["tls"], timeout=cfg["timeout"],
                                  max_frame=cfg["max_frame"])
        finally:
            release()   # the links are up (or failed): the TLS files are no longer needed
            if listener is not None:
                listener.close()
        warm_up()
        party = Party(role, links, device=party_device(cfg["device"], role),
                      frac_bits=cfg["frac_bits"], prg=party_prg(cfg["prg"], role),
                      timeout=cfg["timeout"], max_frame=cfg["max_frame"])
        if cfg.get("fault") and cfg["fault"][0] == role:
            _arm_fault(party, cfg["fault"][1])
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
                        prg: PrgChoice = DEFAULT_CIPHER,
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
    A failure re-raises the first primary error (``exc.party_errors`` lists every party's).
    """
    _refuse_in_bootstrap()
    if _fault is not None and (_fault[0] not in ROLES or _fault[1] not in FAULT_PHASES):
        raise ValueError(f"_fault must be (role, phase) with a phase in {FAULT_PHASES}")
    guard = _TermGuard()
    try:
        return _run_processes(fn, guard, tls=tls, timeout=timeout, frac_bits=frac_bits,
                              device=device, certs_dir=certs_dir, host=host,
                              wall_timeout=wall_timeout, max_frame=max_frame, threads=threads,
                              private=private, fault=_fault, prg=prg)
    except _Terminated:
        pass
    finally:
        guard.restore()
    guard.redeliver()
    raise AssertionError("unreachable")  # pragma: no cover


def _run_processes(fn, guard: _TermGuard, *, tls, timeout, frac_bits, device, certs_dir, host,
                   wall_timeout, max_frame, threads, private, fault, prg) -> list:
    """Body of :func:`run_local_processes`."""
    # forkserver: children fork from a clean server that has imported the runtime (and torch)
    # once, so they start fast and never inherit a parent's busy OpenMP/thread state.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["secure_inference.mpc.harness", "secure_inference.mpc._preload"])
    material: dict[int, Any] = {r: None for r in ROLES}
    if tls and certs_dir is None:
        material = _throwaway_certificates(host)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // 3)
    cfg = dict(host=host, tls=tls, certs_dir=str(certs_dir) if certs_dir else None,
               timeout=timeout, frac_bits=frac_bits, device=device, max_frame=max_frame,
               threads=int(threads), private=private is not None, fault=fault, prg=prg)
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
