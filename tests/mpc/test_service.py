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
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
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
        server.send_signal(signal.SIGTERM)
        helper.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0 and helper.wait(60) == 0
    finally:
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
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
        server.send_signal(signal.SIGTERM)
        helper.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0 and helper.wait(60) == 0
    finally:
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
    for i in (1, 2):
        assert np.abs(np.load(tmp_path / f"out{i}.npz")["logits"] - ref).max() < 1e-3
        assert json.loads((tmp_path / f"r{i}.json").read_text())["meta"]["tls"] is True


def test_service_drops_silent_connections_and_keeps_serving(tmp_path):
    """Connections that never speak, more than the server's admission slots
    (MAX_ADMISSIONS) and a few to the helper: each is closed after the handshake limit (5 s),
    the parent does not spin while its slots are full, and a client that connects behind
    them is served."""
    from secure_inference.mpc.service import MAX_ADMISSIONS
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
            for _ in range(n):
                silent.append(socket.create_connection(("127.0.0.1", port), timeout=5))
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
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
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
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
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
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
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
        for p in (helper, server):
            if p.poll() is None:
                p.kill()
    outcomes = []
    for p in (server, helper):
        log = logs[p.pid] + p.stderr.read()
        outcomes += [e["outcome"] for e in _sessions(log)]
        assert '"event": "stopped"' in log, log
    # a session whose peer process was killed a moment before its own may end first (failed)
    assert len(outcomes) == 2 and "killed: the service was stopped" in outcomes, outcomes
    assert all(o.startswith(("killed: the service was stopped", "failed: ")) for o in outcomes)
