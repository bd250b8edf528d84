"""Service mode (--serve) over loopback with real processes: three concurrent then ten
sequential clients get the plaintext model's outputs with a one-shot session's bytes; garbage,
a reused session identifier, silent connections (more than the admission slots), an oversized
batch, a client killed among others and a session over --max-session-seconds end only what
they concern; SIGTERM drains (exit 0), a second signal ends every session at once (exit 1)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "research" / "secure_inference"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS reports free on ``host`` (bound to port 0, then closed)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _common(sp: int, hp: int) -> list[str]:
    return ["--model", "helpers.tiny_service_model:tiny", "--input-shape", "3", "8", "8",
            "--plaintext", "--server", f"127.0.0.1:{sp}", "--helper", f"127.0.0.1:{hp}",
            "--timeout", "20"]


def _start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLI / script), *map(str, args)], env=ENV,
                            stderr=subprocess.PIPE, text=True)


def _wait_ready(proc: subprocess.Popen, lines: list[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "ready: serving at" in line:
            return
        assert line, "".join(lines)
    raise AssertionError("".join(lines))


def _client(tmp: Path, common: list[str], i: int, *extra: str,
            images: str = "x.npy") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLI / "client.py"), *common, "--images",
                             str(tmp / images), "--output", str(tmp / f"out{i}.npz"),
                             "--report", str(tmp / f"r{i}.json"), *extra], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _long_client(tmp: Path, common: list[str], i: int, n: int = 600,
                 wait: bool = True) -> subprocess.Popen:
    """A client of ``n`` images (``tmp/long{i}.npy``) one per batch (seconds of online phase);
    ``wait``: returned once its session is running (:func:`_running`)."""
    np.save(tmp / f"long{i}.npy", np.random.default_rng(i).standard_normal(
        (n, 3, 8, 8)).astype(np.float32))
    cl = _client(tmp, common, i, images=f"long{i}.npy")
    return _running(cl, n) if wait else cl


def _running(cl: subprocess.Popen, n: int) -> subprocess.Popen:
    """``cl`` once its progress bar shows a first of its ``n`` images done."""
    seen = ""
    while not re.search(rf"\| [1-9][0-9]*/{n} \[", seen[-40:]):
        ch = cl.stderr.read(1)
        assert ch, seen
        seen += ch
    return cl


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(*services: subprocess.Popen) -> None:
    """SIGTERM every service; each must drain and exit 0."""
    for p in services:
        p.send_signal(signal.SIGTERM)
    for p in services:
        assert p.wait(60) == 0


def _kill_left(*procs: subprocess.Popen) -> None:
    """Kill whatever a test left running (a failed assertion before the services stopped)."""
    for p in procs:
        if p.poll() is None:
            p.kill()


def _sessions(log: str) -> list[dict]:
    """The session events of a ``--log-json`` log."""
    return [e for e in (json.loads(line) for line in log.splitlines() if line.startswith("{"))
            if e["event"] == "session"]


def _tiny_checkpoint(tmp: Path, seed: int) -> np.ndarray:
    """The services' tiny model (``helpers.tiny_service_model:tiny``) saved as ``tmp/ck.pth``
    and two images as ``tmp/x.npy``; returns the plaintext model's outputs for them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_service_model import tiny
    torch.manual_seed(seed)
    model = tiny().eval()
    torch.save(model.state_dict(), tmp / "ck.pth")
    x = torch.randn(2, 3, 8, 8)
    np.save(tmp / "x.npy", x.numpy())
    with torch.no_grad():
        return model(x).numpy()


def _plaintext(tmp: Path, images: str) -> np.ndarray:
    """The plaintext outputs of ``tmp/ck.pth`` (the tiny model) for ``tmp/images``."""
    from helpers.tiny_service_model import tiny
    model = tiny().eval()
    model.load_state_dict(torch.load(tmp / "ck.pth"))
    with torch.no_grad():
        return model(torch.from_numpy(np.load(tmp / images))).numpy()


def _id_probe(port: int, sid: bytes) -> bytes:
    """A plaintext client hello to the helper service with ``sid``: its answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("<8sB", b"SI-HELLO", 0))
        answer = s.recv(9)
        s.sendall(sid)
        return answer + s.recv(1)


def test_service_sessions_garbage_reused_id_and_sigterm(tmp_path):
    ref = _tiny_checkpoint(tmp_path, seed=0)
    # a one-shot session: the bytes every service session must equal
    ports = _free_ports(4)
    one = _common(ports[0], ports[1])
    procs = [_start("crypto_provider.py", *one), _start("server.py", *one, "--checkpoint",
                                                        tmp_path / "ck.pth")]
    c = _client(tmp_path, one, 0)
    assert c.wait(120) == 0, c.stderr.read()
    for p in procs:
        assert p.wait(60) == 0
    common = _common(ports[2], ports[3])
    helper = _start("crypto_provider.py", *common, "--serve", "--log-json")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve")
    hlines: list[str] = []
    slines: list[str] = []
    try:
        _wait_ready(helper, hlines)
        _wait_ready(server, slines)
        with socket.create_connection(("127.0.0.1", ports[2]), timeout=5) as s:  # garbage
            s.sendall(os.urandom(64))
        sid = os.urandom(32)
        assert _id_probe(ports[3], sid)[-1] == 0        # pending: accepted once ...
        assert _id_probe(ports[3], sid)[-1] == 1        # ... the same id again: refused
        clients = [_client(tmp_path, common, i) for i in (1, 2, 3)]     # concurrent
        for cl in clients:
            assert cl.wait(120) == 0, cl.stderr.read()
        for i in range(4, 14):                                          # then ten sequential
            cl = _client(tmp_path, common, i)
            assert cl.wait(120) == 0, cl.stderr.read()
        last = _client(tmp_path, common, 14)        # SIGTERM while it runs: it completes
        seen = ""
        while "secure inference" not in seen:       # its progress bar: it is connected
            ch = last.stderr.read(1)
            assert ch, seen
            seen += ch
        server.send_signal(signal.SIGTERM)
        helper.send_signal(signal.SIGTERM)
        assert last.wait(120) == 0, last.stderr.read()
        assert server.wait(60) == 0 and helper.wait(60) == 0
    finally:
        _kill_left(helper, server)
    slog = "".join(slines) + server.stderr.read()
    hlog = "".join(hlines) + helper.stderr.read()
    base = json.loads((tmp_path / "r0.json").read_text())
    for i in range(1, 15):
        out = np.load(tmp_path / f"out{i}.npz")["logits"]
        assert np.abs(out - ref).max() < 1e-3
        rep = json.loads((tmp_path / f"r{i}.json").read_text())
        for phase in ("setup", "preprocess", "online"):
            assert rep[phase]["bytes_sent"] == base[phase]["bytes_sent"], phase
        assert rep["online"]["rounds"] == base["online"]["rounds"]
    assert slog.count(" ok\n") == 14 and "dropped the connection" in slog, slog
    events = [json.loads(line) for line in hlog.splitlines() if line.startswith("{")]
    sessions = [e for e in events if e["event"] == "session"]
    assert len(sessions) == 14 and all(e["outcome"] == "ok" and e["images"] == 2
                                      for e in sessions), hlog
    assert any(e["event"] == "stopped" for e in events)


def test_service_busy_and_a_killed_client(tmp_path):
    """--max-sessions 1: a held session makes the next client stop with "busy"; a client
    killed mid-session ends only its session; the service keeps serving."""
    _tiny_checkpoint(tmp_path, seed=1)
    sp, hp = _free_ports(2)
    common = _common(sp, hp)
    helper = _start("crypto_provider.py", *common, "--serve")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve",
                    "--max-sessions", "1")
    lines: list[str] = []
    try:
        _wait_ready(helper, [])
        _wait_ready(server, lines)
        with socket.create_connection(("127.0.0.1", sp), timeout=5) as held:
            held.sendall(struct.pack("<8sB", b"SI-HELLO", 0))
            assert held.recv(9)[:8] == b"SI-SERVE"
            held.sendall(os.urandom(32))
            assert held.recv(1) == b"\0"                 # the one session slot is taken
            busy = _client(tmp_path, common, 1)
            assert busy.wait(120) == 1
            assert "is busy" in busy.stderr.read()
        killed = _client(tmp_path, common, 2)
        seen = ""
        while "secure inference" not in seen:
            ch = killed.stderr.read(1)
            assert ch, seen
            seen += ch
        killed.kill()
        killed.wait(30)
        ok = _client(tmp_path, common, 3)
        assert ok.wait(120) == 0, ok.stderr.read()
        _stop(server, helper)
    finally:
        _kill_left(helper, server)
    log = "".join(lines) + server.stderr.read()
    assert "busy: told" in log and log.count(" ok\n") >= 1, log
    assert log.count("server: session ") == 3, log       # held, killed (or done), ok


def test_service_over_tls_two_concurrent_clients(tmp_path):
    """The TLS path of service mode: three loopback addresses, certificates from
    make_certificates.py, two concurrent clients get the plaintext model's outputs."""
    ref = _tiny_checkpoint(tmp_path, seed=2)
    subprocess.run([sys.executable, str(CLI / "make_certificates.py"), str(tmp_path / "certs"),
                    "--client-host", "127.0.0.1", "--server-host", "127.0.0.2",
                    "--helper-host", "127.0.0.3"], check=True, capture_output=True, env=ENV)
    common = ["--model", "helpers.tiny_service_model:tiny", "--input-shape", "3", "8", "8",
              "--certs", str(tmp_path / "certs"), "--server",
              f"127.0.0.2:{_free_ports(1, '127.0.0.2')[0]}", "--helper",
              f"127.0.0.3:{_free_ports(1, '127.0.0.3')[0]}", "--client", "127.0.0.1",
              "--timeout", "20"]
    helper = _start("crypto_provider.py", *common, "--serve")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve")
    try:
        _wait_ready(helper, [])
        _wait_ready(server, [])
        clients = [_client(tmp_path, common, i) for i in (1, 2)]
        for cl in clients:
            assert cl.wait(120) == 0, cl.stderr.read()
        _stop(server, helper)
    finally:
        _kill_left(helper, server)
    for i in (1, 2):
        assert np.abs(np.load(tmp_path / f"out{i}.npz")["logits"] - ref).max() < 1e-3
        assert json.loads((tmp_path / f"r{i}.json").read_text())["meta"]["tls"] is True


def test_service_drops_silent_connections_and_keeps_serving(tmp_path):
    """Connections that never speak, more than the server's admission slots
    (MAX_ADMISSIONS, from several loopback addresses: one address gets at most
    MAX_ADMISSIONS_PER_ADDRESS) and a few to the helper: each is closed after the handshake
    limit (5 s), the parent does not spin while its slots are full, and a client that
    connects behind them is served."""
    from secure_inference.mpc.service import MAX_ADMISSIONS, MAX_ADMISSIONS_PER_ADDRESS
    ref = _tiny_checkpoint(tmp_path, seed=3)
    sp, hp = _free_ports(2)
    common = _common(sp, hp)
    helper = _start("crypto_provider.py", *common, "--serve")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve")
    slines: list[str] = []
    hlines: list[str] = []
    silent: list[socket.socket] = []
    try:
        _wait_ready(helper, hlines)
        _wait_ready(server, slines)
        opened = time.monotonic()
        for port, n in ((hp, 3), (sp, MAX_ADMISSIONS + 4)):
            for i in range(n):
                source = f"127.0.0.{2 + i // MAX_ADMISSIONS_PER_ADDRESS}"
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5,
                                                       source_address=(source, 0)))
                time.sleep(0.005)         # each one accepted before the next (no backlog)
        cpu = _cpu_seconds(server.pid)
        time.sleep(1.5)                   # every slot held by a silent connection
        assert _cpu_seconds(server.pid) - cpu < 0.3, "the service parent spins"
        cl = _client(tmp_path, common, 1)
        assert cl.wait(120) == 0, cl.stderr.read()
        assert np.abs(np.load(tmp_path / "out1.npz")["logits"] - ref).max() < 1e-3
        for s in silent:                  # the last 4 waited for a slot: two limits, + slack
            s.settimeout(max(0.1, opened + 20 - time.monotonic()))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - opened < 20
        _stop(helper, server)
    finally:
        for s in silent:
            s.close()
        _kill_left(helper, server)
    slog = "".join(slines) + server.stderr.read()
    hlog = "".join(hlines) + helper.stderr.read()
    assert slog.count("(silent or too slow)") == MAX_ADMISSIONS + 4, slog
    assert hlog.count("(silent or too slow)") == 3, hlog
    assert slog.count(" ok\n") == 1 and hlog.count(" ok\n") == 1


def test_service_oversized_batch_and_a_client_killed_among_others(tmp_path):
    """--max-batch 1: a client announcing batches of 2 is refused with the limit named, the
    session is logged as failed, and the next clients are served. A client killed in its
    online phase while two others are in theirs: they finish with the model's outputs, its
    session is logged as failed, and a client after it is served."""
    ref = _tiny_checkpoint(tmp_path, seed=4)
    sp, hp = _free_ports(2)
    common = _common(sp, hp)
    helper = _start("crypto_provider.py", *common, "--serve", "--max-batch", "1", "--log-json")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve",
                    "--max-batch", "1", "--log-json")
    try:
        _wait_ready(helper, [])
        _wait_ready(server, [])
        big = _client(tmp_path, common, 1, "--batch-size", "2")
        assert big.wait(120) == 1
        err = big.stderr.read()
        assert "announced a batch of 2 images" in err and "--max-batch" in err, err
        killed = _long_client(tmp_path, common, 2, n=2000)
        others = [_long_client(tmp_path, common, i, n=100, wait=False) for i in (3, 4)]
        for cl in others:
            _running(cl, 100)
        assert killed.poll() is None and all(cl.poll() is None for cl in others), \
            "a session ended before the kill"
        killed.kill()
        killed.wait(30)
        for cl in others:
            assert cl.wait(120) == 0, cl.stderr.read()
        after = _client(tmp_path, common, 5)
        assert after.wait(120) == 0, after.stderr.read()
        _stop(helper, server)
    finally:
        _kill_left(helper, server)
    assert np.abs(np.load(tmp_path / "out5.npz")["logits"] - ref).max() < 1e-3
    for i in (3, 4):
        assert np.abs(np.load(tmp_path / f"out{i}.npz")["logits"]
                      - _plaintext(tmp_path, f"long{i}.npy")).max() < 1e-3
    for log in (server.stderr.read(), helper.stderr.read()):
        outcomes = [e["outcome"] for e in _sessions(log)]
        assert len(outcomes) == 5 and outcomes.count("ok") == 3, log
        failed = [o for o in outcomes if o != "ok"]
        assert all(o.startswith("failed: ") for o in failed), log
        assert sum("announced a batch of 2 images" in o for o in failed) == 1, log


def test_service_max_session_seconds_ends_a_long_session(tmp_path):
    """--max-session-seconds 3: a longer session's processes are killed (gone, not zombies),
    the session is logged "killed: longer than --max-session-seconds 3", its client stops
    with an error, and the next client is served."""
    ref = _tiny_checkpoint(tmp_path, seed=5)
    sp, hp = _free_ports(2)
    common = _common(sp, hp)
    limit = ["--serve", "--max-session-seconds", "3", "--log-json"]
    helper = _start("crypto_provider.py", *common, *limit)
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", *limit)
    try:
        _wait_ready(helper, [])
        _wait_ready(server, [])
        start = time.monotonic()
        long = _long_client(tmp_path, common, 1, n=2000)
        kids = _children(server.pid) + _children(helper.pid)
        assert len(kids) == 2, kids
        assert long.wait(60) != 0
        assert time.monotonic() - start < 20      # 2000 images take far longer than that
        deadline = time.monotonic() + 10
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(k) for k in kids), kids
        ok = _client(tmp_path, common, 2)
        assert ok.wait(120) == 0, ok.stderr.read()
        _stop(helper, server)
    finally:
        _kill_left(helper, server)
    assert np.abs(np.load(tmp_path / "out2.npz")["logits"] - ref).max() < 1e-3
    slog, hlog = server.stderr.read(), helper.stderr.read()
    for log in (slog, hlog):
        sessions = _sessions(log)
        assert [e["outcome"] for e in sessions][1:] == ["ok"], log
        assert sessions[0]["seconds"] < 10, log
    # the limit is each party's own: both kill (whichever is first), or the other's session
    # fails when its peer's process is killed
    first = [_sessions(log)[0]["outcome"] for log in (slog, hlog)]
    assert "killed: longer than --max-session-seconds 3" in first, first
    assert all(o.startswith(("killed: longer than --max-session-seconds 3", "failed: "))
               for o in first), first


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
def test_service_second_signal_stops_at_once(tmp_path, second):
    """SIGTERM, then a second SIGTERM/SIGINT while a session runs: both services exit 1 at
    once (the grace period is 60 s), every session process is gone, the session is logged
    "killed: the service was stopped" and its client stops with an error."""
    _tiny_checkpoint(tmp_path, seed=6)
    sp, hp = _free_ports(2)
    common = _common(sp, hp)
    helper = _start("crypto_provider.py", *common, "--serve", "--log-json")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve",
                    "--log-json")
    try:
        _wait_ready(helper, [])
        _wait_ready(server, [])
        long = _long_client(tmp_path, common, 1, n=2000)
        kids = _children(server.pid) + _children(helper.pid)
        assert len(kids) == 2 and all(_alive(k) for k in kids), kids
        logs = {}
        for p in (server, helper):
            p.send_signal(signal.SIGTERM)
            lines = []
            while not any('"event": "stopping"' in line for line in lines):
                lines.append(p.stderr.readline())
                assert lines[-1], lines
            logs[p.pid] = "".join(lines)
        start = time.monotonic()
        for p in (server, helper):
            p.send_signal(second)
        assert server.wait(15) == 1 and helper.wait(15) == 1
        assert time.monotonic() - start < 10
        assert not any(_alive(k) for k in kids), kids
        assert long.wait(60) != 0
    finally:
        _kill_left(helper, server)
    outcomes = []
    for p in (server, helper):
        log = logs[p.pid] + p.stderr.read()
        outcomes += [e["outcome"] for e in _sessions(log)]
        assert '"event": "stopped"' in log, log
    # a session whose peer process was killed a moment before its own may end first (failed)
    assert len(outcomes) == 2 and "killed: the service was stopped" in outcomes, outcomes
    assert all(o.startswith(("killed: the service was stopped", "failed: ")) for o in outcomes)


# --- the service loop in a process forked from this one (no model to load) -------------------

class _InProcess:
    """``serve(...)`` run in a child of the test process, its stderr in ``self.log``.
    ``fail_forks``: that many of the service's first ``os.fork`` calls raise EAGAIN."""

    def __init__(self, tmp: Path, settings, run_session, fail_forks: int = 0):
        from secure_inference.mpc.service import serve
        from secure_inference.mpc.transport.addresses import listen
        listener = listen("127.0.0.1", 0)
        self.port = listener.getsockname()[1]
        self.log = tmp / f"service-{self.port}.log"
        self.pid = os.fork()
        if self.pid == 0:
            code = 70
            try:
                sys.stderr = open(self.log, "w", buffering=1)
                if fail_forks:
                    real, left = os.fork, [fail_forks]

                    def fork() -> int:
                        if left[0] > 0:
                            left[0] -= 1
                            raise BlockingIOError(11, "Resource temporarily unavailable")
                        return real()
                    os.fork = fork
                code = serve(listener, None, settings, run_session)
            except BaseException:  # noqa: BLE001 - reported in the log, seen by the test
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        listener.close()
        self.code: int | None = None

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, needle: str, limit: float = 20.0) -> str:
        """The log once it holds ``needle``."""
        deadline = time.monotonic() + limit
        while needle not in self.text():
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)
        return self.text()

    def stop(self) -> int:
        """SIGTERM; the exit status (SIGKILL after 30 s). Once stopped, the same status."""
        if self.code is not None:
            return self.code
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                return self.code
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.code


def _recv_upto(s: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes: fewer if the peer closes first."""
    data = b""
    while len(data) < n:
        try:
            chunk = s.recv(n - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _half(port: int, role: int, sid: bytes | None, source: str = "127.0.0.1"
          ) -> tuple[socket.socket, bytes]:
    """A plaintext connection from ``source`` claiming ``role``: hello, then (``sid`` given and
    the answer a service's) the identifier; returns the socket and every answer byte."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(struct.pack("<8sB", b"SI-HELLO", role))
    answer = _recv_upto(s, 9)
    if sid is not None and answer[:8] == b"SI-SERVE":
        s.sendall(sid)
        answer += _recv_upto(s, 1)
    return s, answer


def _closed(s: socket.socket, limit: float = 10.0) -> bool:
    """True once the service closed ``s`` (within ``limit`` s), reading what it sent."""
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _hold_session(socks: dict[int, socket.socket], sid: bytes) -> dict:
    """A stand-in session: tells every peer its oom_score_adj, then holds until one closes."""
    score = Path("/proc/self/oom_score_adj").read_text().strip().encode()
    for s in socks.values():
        s.sendall(b"go " + score + b"\n")
    for s in socks.values():
        s.settimeout(60)
        try:
            s.recv(1)
        except OSError:
            pass
        break
    return {"outcome": "ok", "images": 1, "bytes": 0}


def _settings(role: int, **kw):
    from secure_inference.mpc.service import ServiceSettings
    return ServiceSettings(name="server" if role == 1 else "helper", role=role,
                           wanted=frozenset({0} if role == 1 else {0, 1}), **kw)


@pytest.fixture(scope="module")
def tiny_program():
    """The services' tiny model compiled for batches of 1 (the helper needs no weights)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_service_model import tiny
    from secure_inference.mpc.compile import compile_model
    torch.manual_seed(7)
    return compile_model(tiny().eval(), (1, 3, 8, 8))


def _real_helper_session(program, setup_seconds: float = 10.0):
    """The helper's session function of ``--serve`` (cli/_service.py) for ``program``."""
    from secure_inference.cli._service import _session
    from secure_inference.mpc.options import SessionOptions
    options = SessionOptions(timeout=60)
    return lambda socks, sid: _session(2, socks, sid, {}, options, None, program, None, 1,
                                       setup_seconds)


def test_text_log_escapes_a_peers_abort_reason(tmp_path, tiny_program):
    """A client's abort goodbye whose reason holds a newline, a forged session line and an
    escape code: the helper logs one session line, with those characters escaped."""
    from secure_inference.mpc.transport.frames import PREFIX
    from secure_inference.mpc.transport.socket_link import _ABORT
    svc = _InProcess(tmp_path, _settings(2), _real_helper_session(tiny_program[0]))
    forged = "x\nhelper: session 00000000 client 10.0.0.9:1 images 9 bytes 9 seconds 0.00 ok" \
             "\x1b[2J\r\u2028"
    try:
        sid = os.urandom(32)
        client, a = _half(svc.port, 0, sid)
        server, b = _half(svc.port, 1, sid)
        assert a[-1] == b[-1] == 0
        body = _ABORT + bytes([0]) + forged.encode()
        client.sendall(PREFIX.pack(len(body)) + body)
        log = svc.wait_log("helper: session ")
        for s in (client, server):
            s.close()
    finally:
        assert svc.stop() == 0
    log = svc.text()
    lines = [line for line in log.splitlines() if line.startswith("helper: session ")]
    assert len(lines) == 1 and lines[0].startswith(f"helper: session {sid[:4].hex()} "), log
    assert "failed: " in lines[0] and "x\\nhelper: session 00000000" in lines[0], lines
    assert "\\x1b[2J\\r\\u2028" in lines[0], lines
    assert not any(ch in log for ch in "\x1b\r\u2028"), repr(log)


def test_text_log_escapes_control_characters_in_any_outcome(tmp_path):
    """Whatever a session reports (its outcome may quote a peer), the text log line is one
    line with every control character escaped; --log-json escapes them too."""
    def session(socks, sid):
        return {"outcome": "failed: a\nserver: session 00000000 ok\x1b[31m\x85", "images": 1}
    for log_json in (False, True):
        svc = _InProcess(tmp_path, _settings(1, log_json=log_json), session)
        try:
            s, answer = _half(svc.port, 0, os.urandom(32))
            assert answer[-1] == 0
            svc.wait_log('"session"' if log_json else "server: session ")
            s.close()
        finally:
            assert svc.stop() == 0
        log = svc.text()
        assert not any(ch in log for ch in "\x1b\x85"), repr(log)
        lines = [line for line in log.splitlines()
                 if line.startswith(("server: session ", '{"event": "session"'))]
        assert len(lines) == 1, log
        if log_json:
            assert json.loads(lines[0])["outcome"].startswith("failed: a\nserver: session")
        else:
            assert lines[0].endswith("failed: a\\nserver: session 00000000 ok\\x1b[31m\\x85")


def test_helper_half_sessions_are_capped_per_role_and_address(tmp_path):
    """Client halves that never meet their server: at most N per source address (answered
    "full", a distinct status from "reused"), 2N + 8 in all; they never block the server's
    halves; each is dropped after the pairing deadline, which frees its place."""
    from secure_inference.mpc.service import half_session_caps
    from secure_inference.mpc.transport.handshake import dial_session
    from secure_inference.mpc.errors import ProtocolError
    n = 2
    per_role, per_address = half_session_caps(n)
    assert (per_role, per_address) == (12, 2)
    svc = _InProcess(tmp_path, _settings(2, max_sessions=n, pair_timeout=3.0), _hold_session)
    held: list[socket.socket] = []
    try:
        sids = [os.urandom(32) for _ in range(per_role)]
        sources = [f"127.0.0.{2 + i // per_address}" for i in range(per_role)]
        for sid, src in zip(sids, sources):
            s, answer = _half(svc.port, 0, sid, src)
            held.append(s)
            assert answer == b"SI-SERVE\x02\x00", (src, answer)
        s, answer = _half(svc.port, 0, os.urandom(32), sources[0])   # its address is full
        assert answer[-1] == 2, answer
        s, answer = _half(svc.port, 0, sids[0], "127.0.0.99")        # reused: not "full"
        assert answer[-1] == 1, answer
        s, answer = _half(svc.port, 0, os.urandom(32), "127.0.0.99")  # all are full
        assert answer[-1] == 2, answer
        raw = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        with pytest.raises(ProtocolError, match="is busy: it holds as many sessions waiting"):
            dial_session(raw, 0, 2, None, "127.0.0.1", os.urandom(32))
        raw.close()
        # the server's halves are counted apart: it still pairs, and waits on its own
        server, answer = _half(svc.port, 1, sids[0], "127.0.0.99")
        assert answer[-1] == 0
        assert _recv_upto(server, 3) == b"go " and _recv_upto(held[0], 3) == b"go "
        lone, answer = _half(svc.port, 1, os.urandom(32), "127.0.0.99")
        assert answer[-1] == 0
        # after the pairing deadline every unpaired half is closed and its place is free
        assert all(_closed(s, 8) for s in held[1:] + [lone])
        s, answer = _half(svc.port, 0, os.urandom(32), sources[0])
        assert answer[-1] == 0, answer
        server.close()
        held[0].close()
    finally:
        for s in held:
            s.close()
        assert svc.stop() == 0
    log = svc.text()
    assert log.count("its other party never came within 3 s") >= per_role, log
    assert "answered full" in log, log


def test_paired_session_without_a_free_slot_is_answered_busy(tmp_path):
    """Two server halves pass their hellos while a slot is free; the first pairs and takes
    the only slot, the second is answered busy (status byte) and its waiting client half is
    closed: nobody is left with a silently closed connection after being accepted."""
    svc = _InProcess(tmp_path, _settings(2, max_sessions=1), _hold_session)
    try:
        sid1, sid2 = os.urandom(32), os.urandom(32)
        c1, a1 = _half(svc.port, 0, sid1)
        c2, a2 = _half(svc.port, 0, sid2, "127.0.0.2")   # one waiting half per address
        assert a1[-1] == a2[-1] == 0
        s1, h1 = _half(svc.port, 1, None)
        s2, h2 = _half(svc.port, 1, None)
        assert h1[:8] == h2[:8] == b"SI-SERVE"
        s1.sendall(sid1)
        assert _recv_upto(s1, 1) == b"\0" and _recv_upto(s1, 3) == b"go "
        s2.sendall(sid2)
        assert _recv_upto(s2, 1) == b"\x03"        # ID_BUSY
        assert _closed(s2, 5) and _closed(c2, 5)
        log = svc.wait_log("found no free slot")
        for s in (c1, s1):
            s.close()
    finally:
        assert svc.stop() == 0
    assert f"session {sid2[:4].hex()} found no free slot" in log, log


def test_setup_frames_are_the_clients_key_header_and_announcement(tiny_program):
    """SETUP_FRAMES (what --setup-seconds bounds) is the client's key frame plus the header
    frames the server receives from it before its first message outside the header."""
    from secure_inference.cli._service import SETUP_FRAMES
    from secure_inference.mpc.harness import run_in_process
    from secure_inference.mpc.party import run_party
    from secure_inference.mpc.session import SCOPE_HEADER
    program, weights = tiny_program
    events: list[tuple[str, str, int]] = []

    class Recorder:
        def __init__(self, link, party):
            self._inner, self._party = link, party

        def recv(self, timeout):
            body = self._inner.recv(timeout)
            events.append(("recv", self._party.scope_path, self._inner.peer))
            return body

        def send_tensor(self, *args, **kw):
            events.append(("send", self._party.scope_path, self._inner.peer))
            return self._inner.send_tensor(*args, **kw)

        def __getattr__(self, name):
            return getattr(self._inner, name)

    def body(party):
        if party.role == 1:          # after Party.start: the key frames are in
            party.wrap_links(lambda link: Recorder(link, party))
        return run_party(party, program, images=[torch.randn(1, 3, 8, 8)] if party.role == 0
                         else None, weights=weights if party.role == 1 else None)
    run_in_process(body, timeout=30)
    first_other = next(i for i, e in enumerate(events) if e[1] != SCOPE_HEADER)
    assert events[first_other][0] == "send"
    header_from_client = [e for e in events[:first_other] if e[0] == "recv" and e[2] == 0]
    assert SETUP_FRAMES == 1 + len(header_from_client) == 4, events[:first_other + 1]


def test_a_paired_client_that_stalls_frees_its_slot_at_the_setup_deadline(tmp_path,
                                                                          tiny_program):
    """--max-sessions 1, --setup-seconds 1.5, --timeout 60: a session whose client pairs and
    then sends nothing ends 1.5 s after it started (logged, naming the limit), not at the
    per-frame timeout, and the next client gets the slot."""
    svc = _InProcess(tmp_path, _settings(2, max_sessions=1),
                     _real_helper_session(tiny_program[0], setup_seconds=1.5))
    try:
        sid = os.urandom(32)
        client, a = _half(svc.port, 0, sid)
        server, b = _half(svc.port, 1, sid)
        assert a[-1] == b[-1] == 0
        start = time.monotonic()
        assert _closed(client, 15) and _closed(server, 15)
        took = time.monotonic() - start
        log = svc.wait_log("helper: session ")
        assert 1.3 < took < 6, took
        nxt, answer = _half(svc.port, 0, os.urandom(32))
        assert answer == b"SI-SERVE\x02\x00", answer        # the slot is free again
        nxt.close()
    finally:
        assert svc.stop() == 0
    assert "party 0 (client) did not complete the key agreement, header check and batch " \
           "announcement within 1.5 s" in log, log


def test_silent_connections_from_one_address_leave_room_for_others(tmp_path):
    """MAX_ADMISSIONS silent connections from 127.0.0.1 (handshake limit 30 s): beyond its
    per-address cap they are closed at once (logged once), and a connection from 127.0.0.2
    is admitted at once."""
    from secure_inference.mpc.service import MAX_ADMISSIONS, MAX_ADMISSIONS_PER_ADDRESS
    svc = _InProcess(tmp_path, _settings(1, handshake_timeout=30.0), _hold_session)
    silent: list[socket.socket] = []
    try:
        for _ in range(MAX_ADMISSIONS):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.connect(("127.0.0.1", svc.port))
            silent.append(s)
        start = time.monotonic()
        other, answer = _half(svc.port, 0, os.urandom(32), "127.0.0.2")
        assert answer == b"SI-SERVE\x01\x00" and time.monotonic() - start < 5, answer
        assert _recv_upto(other, 3) == b"go "
        other.close()
        closed = [_closed(s, 0.5) for s in silent[MAX_ADMISSIONS_PER_ADDRESS:]]
        assert all(closed), closed.count(False)
        assert not any(_closed(s, 0.01) for s in silent[:MAX_ADMISSIONS_PER_ADDRESS])
    finally:
        for s in silent:
            s.close()
        assert svc.stop() == 0
    log = svc.text()
    assert log.count("refused connections from 127.0.0.1") == 1, log


def test_a_failed_fork_ends_only_that_session(tmp_path):
    """The first os.fork of the service fails (EAGAIN): that session's connection is closed
    and logged failed, the service goes on; the next session's process runs with
    oom_score_adj 1000 (the out-of-memory killer's first choice)."""
    svc = _InProcess(tmp_path, _settings(1), _hold_session, fail_forks=1)
    try:
        first, answer = _half(svc.port, 0, os.urandom(32))
        assert answer[-1] == 0 and _closed(first, 10)
        svc.wait_log("could not start the session process")
        second, answer = _half(svc.port, 0, os.urandom(32))
        assert answer[-1] == 0
        assert _recv_upto(second, 8) == b"go 1000\n"
        second.close()
        svc.wait_log(" ok")
    finally:
        assert svc.stop() == 0
    log = svc.text()
    assert "failed: could not start the session process ([Errno 11]" in log, log
    assert log.count(" ok\n") == 1, log


def test_check_id_reserves_and_expired_ids_are_trimmed(monkeypatch):
    """The identifier check reserves at once (a second connection of the same role with the
    same identifier is refused before the first one finished its answer); identifiers used
    up by the pairing deadline are trimmed like started ones."""
    from types import SimpleNamespace

    from secure_inference.mpc import service
    from secure_inference.mpc.transport.addresses import listen
    from secure_inference.mpc.transport.handshake import ID_ACCEPTED, ID_REFUSED
    listener = listen("127.0.0.1", 0)
    try:
        svc = service._Service(listener, None, _settings(2, pair_timeout=0.0),
                               lambda socks, sid: {}, lambda host: True)

        def conn(peer: int, sid: bytes):        # each from its own address
            return SimpleNamespace(session_id=sid, peer=peer, addr=(sid.hex(), 1),
                                   fileno=lambda: -1, close=lambda: None, admitted=False)
        sid = os.urandom(32)
        assert svc._check_id(conn(0, sid)) == ID_ACCEPTED
        assert svc._check_id(conn(0, sid)) == ID_REFUSED
        monkeypatch.setattr(service, "MAX_USED_IDS", 3)
        for _ in range(5):
            assert svc._check_id(conn(0, os.urandom(32))) == ID_ACCEPTED
        svc.log = lambda *a, **k: None
        svc._expire()
        assert not svc.pending and len(svc.used) == 3
    finally:
        listener.close()


def test_a_session_process_orphaned_before_prctl_exits(tmp_path):
    """_die_with_parent(pid): a process whose parent is no longer ``pid`` exits at once."""
    from secure_inference.mpc.service import _die_with_parent
    codes = []
    for parent in (os.getpid(), os.getpid() + 1_000_000):
        pid = os.fork()
        if pid == 0:
            try:
                _die_with_parent(parent)
            finally:
                os._exit(0)
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    assert codes == [0, 1]


def test_serve_checks_cuda_without_initialising_it_in_the_parent(monkeypatch):
    """--serve: the device check runs with PYTORCH_NVML_BASED_CUDA_CHECK=1 (torch asks NVML,
    which leaves CUDA usable in the forked sessions). Only the order is checked here: no GPU."""
    import argparse

    from secure_inference.cli import _party, _service
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    seen = {}

    def resolve(args):
        seen["env"] = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
        raise SystemExit("stop here")
    monkeypatch.setattr(_party, "resolve", resolve)
    args = argparse.Namespace(max_sessions=1, max_session_seconds=10.0, grace_seconds=1.0,
                              setup_seconds=5.0, max_batch=1, max_images=1)
    with pytest.raises(SystemExit, match="stop here"):
        _service.serve_forever(2, args)
    assert seen == {"env": "1"}
