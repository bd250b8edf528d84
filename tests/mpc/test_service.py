"""Service mode (--serve) over loopback with real processes: concurrent and sequential
clients get the plaintext model's outputs with a one-shot session's bytes; garbage and a
reused session identifier are refused without disturbing the service; SIGTERM exits 0."""
from __future__ import annotations

import json
import os
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


def _client(tmp: Path, common: list[str], i: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLI / "client.py"), *common, "--images",
                             str(tmp / "x.npy"), "--output", str(tmp / f"out{i}.npz"),
                             "--report", str(tmp / f"r{i}.json")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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
    one = _common(7461, 7462)
    procs = [_start("crypto_provider.py", *one), _start("server.py", *one, "--checkpoint",
                                                        tmp_path / "ck.pth")]
    c = _client(tmp_path, one, 0)
    assert c.wait(120) == 0, c.stderr.read()
    for p in procs:
        assert p.wait(60) == 0
    common = _common(7463, 7464)
    helper = _start("crypto_provider.py", *common, "--serve", "--log-json")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve")
    hlines: list[str] = []
    slines: list[str] = []
    try:
        _wait_ready(helper, hlines)
        _wait_ready(server, slines)
        with socket.create_connection(("127.0.0.1", 7463), timeout=5) as s:   # garbage
            s.sendall(os.urandom(64))
        sid = os.urandom(32)
        assert _id_probe(7464, sid)[-1] == 0            # pending: accepted once ...
        assert _id_probe(7464, sid)[-1] == 1            # ... the same id again: refused
        clients = [_client(tmp_path, common, i) for i in (1, 2, 3)]     # concurrent
        for cl in clients:
            assert cl.wait(120) == 0, cl.stderr.read()
        for i in (4, 5):                                                # then sequential
            cl = _client(tmp_path, common, i)
            assert cl.wait(120) == 0, cl.stderr.read()
        last = _client(tmp_path, common, 6)         # SIGTERM while it runs: it completes
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
    for i in range(1, 7):
        out = np.load(tmp_path / f"out{i}.npz")["logits"]
        assert np.abs(out - ref).max() < 1e-3
        rep = json.loads((tmp_path / f"r{i}.json").read_text())
        for phase in ("setup", "preprocess", "online"):
            assert rep[phase]["bytes_sent"] == base[phase]["bytes_sent"], phase
        assert rep["online"]["rounds"] == base["online"]["rounds"]
    assert slog.count(" ok\n") == 6 and "dropped the connection" in slog, slog
    events = [json.loads(line) for line in hlog.splitlines() if line.startswith("{")]
    sessions = [e for e in events if e["event"] == "session"]
    assert len(sessions) == 6 and all(e["outcome"] == "ok" and e["images"] == 2
                                      for e in sessions), hlog
    assert any(e["event"] == "stopped" for e in events)


def test_service_busy_and_a_killed_client(tmp_path):
    """--max-sessions 1: a held session makes the next client stop with "busy"; a client
    killed mid-session ends only its session; the service keeps serving."""
    _tiny_checkpoint(tmp_path, seed=1)
    common = _common(7465, 7466)
    helper = _start("crypto_provider.py", *common, "--serve")
    server = _start("server.py", *common, "--checkpoint", tmp_path / "ck.pth", "--serve",
                    "--max-sessions", "1")
    lines: list[str] = []
    try:
        _wait_ready(helper, [])
        _wait_ready(server, lines)
        with socket.create_connection(("127.0.0.1", 7465), timeout=5) as held:
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
              "--certs", str(tmp_path / "certs"), "--server", "127.0.0.2:7467", "--helper",
              "127.0.0.3:7468", "--client", "127.0.0.1", "--timeout", "20"]
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
