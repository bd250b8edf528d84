"""Hostile or unlucky input to the server and helper: stray connections to a listening port
(silent, garbage, plaintext hello, another CA, another party's certificate) are dropped and the
real session still completes; the client's batch announcement is checked against the
server's/helper's limits before anything is allocated; the bytes queued per link are capped."""
from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from secure_inference.mpc import party as party_mod
from secure_inference.mpc.certs import create_certificates
from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.local import run_program
from secure_inference.mpc.options import SessionLimits, SessionOptions
from secure_inference.mpc.party import _announce_batches, run_party
from secure_inference.mpc.session import SCOPE_HEADER
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.runtime import Party
from secure_inference.mpc.harness import run_in_process
from secure_inference.mpc.session import PARTY_NAMES
from secure_inference.mpc.transport.addresses import listen
from secure_inference.mpc.transport.connect import connect_links
from secure_inference.mpc.transport.frames import encode_frame, scope_hash
from secure_inference.mpc.transport.socket_link import SocketLink
from secure_inference.mpc.transport.tls import TLSConfig

HOSTS = {r: ["localhost", "127.0.0.1"] for r in range(3)}
HELLO = struct.Struct("<8sB")
LOGGER = "secure_inference.mpc.transport"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    """This session's certificates, and a second CA's."""
    good, other = tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("other")
    create_certificates(good, HOSTS)
    create_certificates(other, HOSTS)
    return {"good": good, "other": other}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    program, weights = compile_model(model, (2, 3, 6, 6))
    with torch.no_grad():
        ref = model(x).double()
    return program, weights, x, ref


# --- hostile connections ------------------------------------------------------------------

def _tls_client(cert_dir: Path, name: str) -> ssl.SSLContext:
    """A TLS client that presents ``name``'s certificate and does not check the listener's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert_dir / f"{name}.pem"), str(cert_dir / f"{name}.key"))
    return ctx


def _wait_dropped(sock: socket.socket, limit: float = 10.0) -> None:
    """Read until the listener closes the connection (it dropped us)."""
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except (OSError, ssl.SSLError):
        pass


def _hostile(kind: str, addr: tuple[str, int], target: int, certs: dict[str, Path]):
    """Open one hostile connection to ``addr``; returns the socket to keep open (or None once
    the listener has dropped it)."""
    raw = socket.create_connection(addr, timeout=10)
    claim = target - 1   # a role the listener does expect
    if kind == "silent":
        return raw       # connects and says nothing
    if kind == "garbage":
        raw.sendall(os.urandom(517))
    elif kind == "plaintext_hello":
        raw.sendall(HELLO.pack(b"SI-HELLO", claim))
    else:
        cert_dir, name = ((certs["other"], PARTY_NAMES[claim]) if kind == "other_ca" else
                          (certs["good"], PARTY_NAMES[{1: 2, 2: 0}[target]]))
        try:
            raw = _tls_client(cert_dir, name).wrap_socket(raw)
            raw.sendall(HELLO.pack(b"SI-HELLO", claim))   # claims an expected role
        except (OSError, ssl.SSLError):
            pass
    _wait_dropped(raw)
    raw.close()
    return None


def _party_body(role, addresses, listener, tls, program, weights, xs, handshake_timeout,
                out, errs, connect_seconds, limits=None):
    try:
        start = time.monotonic()
        links = connect_links(role, addresses, listener, tls=tls, timeout=30,
                              allow_plaintext=tls is None, handshake_timeout=handshake_timeout)
        connect_seconds[role] = time.monotonic() - start
        party = Party(role, links, SessionOptions(timeout=30))
        try:
            party.start()
            out[role] = run_party(party, program, images=xs if role == 0 else None,
                                  weights=weights if role == 1 else None, limits=limits)
        finally:
            party.close()
    except Exception as exc:  # noqa: BLE001 - inspected by the test
        errs[role] = exc


KINDS = ["silent", "garbage", "plaintext_hello", "other_ca", "wrong_party_cert"]


@pytest.mark.parametrize("target", [2, 1], ids=["helper", "server"])
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_connection_before_the_peer_does_not_stop_the_session(kind, target, certs, tiny,
                                                                      caplog):
    """A stray connection to a listening party, made before its real peer dials, is dropped
    (with a log line) and the real session over TLS still completes with correct outputs.
    The silent connection must not hold up the others: connecting takes far less than the
    per-connection handshake deadline."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    program, weights, x, ref = tiny
    handshake = 8.0 if kind == "silent" else 2.0
    listeners = {r: listen("127.0.0.1", 0) for r in (1, 2)}
    addresses = {0: ("127.0.0.1", 0),
                 **{r: ("127.0.0.1", s.getsockname()[1]) for r, s in listeners.items()}}
    out, errs, secs = {}, {}, {}
    threads = {r: threading.Thread(
        target=_party_body, daemon=True,
        args=(r, addresses, listeners.get(r), TLSConfig.from_dir(certs["good"], r), program,
              weights, [x], handshake, out, errs, secs)) for r in range(3)}
    keep = None
    try:
        first = range(target, 3)         # the target listens (the server dials the helper first)
        for r in first:
            threads[r].start()
        keep = _hostile(kind, addresses[target], target, certs)
        for r in range(3):
            if r not in first:
                threads[r].start()
        for t in threads.values():
            t.join(60)
    finally:
        if keep is not None:
            keep.close()
        for s in listeners.values():
            s.close()
    assert not errs, errs
    assert torch.allclose(out[0]["outputs"][0], ref, atol=1e-2)
    assert secs[target] < handshake, secs   # nobody waited for the hostile connection
    if kind != "silent":
        dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert dropped and f"party {target} ({PARTY_NAMES[target]})" in dropped[0], dropped


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_only_the_session_timeout_fails_a_listener(tls, certs):
    """Bad connections alone never end the wait; when no legitimate peer arrives within the
    session timeout the error names the missing parties, the address and what was dropped."""
    listener = listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    addresses = {0: ("127.0.0.1", 0), 1: ("127.0.0.1", 1), 2: ("127.0.0.1", port)}

    def spam():
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                _wait_dropped(s, 5)
    spammer = threading.Thread(target=spam, daemon=True)
    spammer.start()
    start = time.monotonic()
    try:
        with pytest.raises(ProtocolError) as info:
            connect_links(2, addresses, listener,
                          tls=TLSConfig.from_dir(certs["good"], 2) if tls else None,
                          allow_plaintext=not tls, timeout=2.0, handshake_timeout=0.5)
    finally:
        listener.close()
        spammer.join(10)
    took = time.monotonic() - start
    msg = str(info.value)
    assert "party 2 (helper)" in msg and "party 0 (client) and party 1 (server) never arrived" \
        in msg and f"127.0.0.1:{port}" in msg and "3 other connection(s) were dropped" in msg, msg
    assert 1.9 < took < 6.0, took


def test_dialler_refused_by_the_listener_gets_a_clear_error(certs):
    """A real party the listener does not expect (the helper dialled as if it were the server)
    is dropped at the listener; the dialler's own error says it was refused and why to look."""
    listener = listen("127.0.0.1", 0)
    port = listener.getsockname()[1]
    result = {}

    def helper():
        try:
            connect_links(2, {0: ("127.0.0.1", 0), 2: ("127.0.0.1", port)}, listener,
                          tls=TLSConfig.from_dir(certs["good"], 2), timeout=3.0,
                          handshake_timeout=1.0)
        except ProtocolError as exc:
            result["helper"] = exc
    t = threading.Thread(target=helper, daemon=True)
    t.start()
    try:
        with pytest.raises(ProtocolError, match="closed the connection during the hello: it "
                                                "refused this party"):
            # party 1 dials, but this helper expects only party 0
            connect_links(1, {1: ("127.0.0.1", 0), 2: ("127.0.0.1", port)}, None,
                          tls=TLSConfig.from_dir(certs["good"], 1), timeout=3.0)
    finally:
        t.join(10)
        listener.close()
    assert "never arrived" in str(result["helper"])


def test_dialler_names_a_foreign_program_on_the_peers_port(certs):
    """Another program holds the helper's port and never speaks TLS: the server's error says
    so (it used to time out with a hint about certificates)."""
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", 0))
    foreign.listen(1)
    port = foreign.getsockname()[1]
    try:
        with pytest.raises(ProtocolError, match="did not complete a TLS handshake in time: it "
                                                "is probably not party 2"):
            connect_links(1, {1: ("127.0.0.1", 0), 2: ("127.0.0.1", port)}, None,
                          tls=TLSConfig.from_dir(certs["good"], 1), timeout=1.5)
    finally:
        foreign.close()


def test_a_busy_answer_counts_only_from_the_party_its_certificate_names(certs):
    """A listener holding the client's certificate answers "busy" claiming to be the server:
    the dialler refuses it for its certificate (checked before the busy answer) instead of
    stopping with "busy"; the real server's busy answer still reads as busy."""
    from secure_inference.mpc.transport.handshake import BUSY_MAGIC, dial_session
    for holder, expect in ((0, "certificate belongs to another party"), (1, "is busy")):
        listener = listen("127.0.0.1", 0)
        ctx = TLSConfig.from_dir(certs["good"], holder).context(True)

        def answer_busy():
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(HELLO.size)
                    tls.sendall(HELLO.pack(BUSY_MAGIC, 1))
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
        t = threading.Thread(target=answer_busy, daemon=True)
        t.start()
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        try:
            with pytest.raises(ProtocolError, match=expect):
                dial_session(raw, 0, 1, TLSConfig.from_dir(certs["good"], 0), "127.0.0.1",
                             os.urandom(32))
        finally:
            raw.close()
            t.join(10)
            listener.close()


# --- batch and session limits -------------------------------------------------------------

def _no_preprocessing(monkeypatch) -> list[int]:
    """Record which parties reach the preprocessing (allocation) step."""
    called: list[int] = []
    real = party_mod.preprocess_batch

    def spy(party, program, batch):
        called.append(party.role)
        return real(party, program, batch)
    monkeypatch.setattr(party_mod, "preprocess_batch", spy)
    return called


@pytest.mark.parametrize("batches,limits,expect", [
    ([3], SessionLimits(max_batch=2, max_images=100),
     ["batch of 3 images", "1 to 2 per batch", "--max-batch"]),
    ([2, 2], SessionLimits(max_batch=2, max_images=3),
     ["announced 4 images", "at most 3", "--max-images"]),
], ids=["batch", "session"])
def test_announcement_over_the_limits_is_refused_before_allocation(batches, limits, expect,
                                                                   tiny, monkeypatch):
    """Over real sockets (no in-process abort), so the server and the helper each refuse the
    announcement on their own, before their preprocessing allocates anything."""
    program, weights, _, _ = tiny
    called = _no_preprocessing(monkeypatch)
    xs = [torch.randn(n, 3, 6, 6) for n in batches]
    listeners = {r: listen("127.0.0.1", 0) for r in (1, 2)}
    addresses = {0: ("127.0.0.1", 0),
                 **{r: ("127.0.0.1", s.getsockname()[1]) for r, s in listeners.items()}}
    out, errs, secs = {}, {}, {}
    threads = [threading.Thread(target=_party_body, daemon=True,
                                args=(r, addresses, listeners.get(r), None, program, weights, xs,
                                      2.0, out, errs, secs, limits)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in listeners.values():
        s.close()
    for role, name in ((1, "server"), (2, "helper")):
        msg = str(errs[role])
        assert isinstance(errs[role], ProtocolError) and f"party {role} ({name})" in msg, errs
        for text in expect:
            assert text in msg, msg
    assert not [r for r in called if r in (1, 2)], called


def test_announcement_within_the_limits_runs(tiny):
    program, weights, x, ref = tiny
    res = run_program(program, weights, [x[:1], x[1:]], in_process=True, timeout=30,
                      limits=SessionLimits(max_batch=1, max_images=2))
    assert torch.allclose(torch.cat(res[0]["outputs"]), ref, atol=1e-2)


def _huge_count(p, role):
    if p.role == 0:
        with p.scope(SCOPE_HEADER):
            p.send(role, torch.tensor([10 ** 6], dtype=torch.int64))
        return None
    if p.role == role:
        return _announce_batches(p, None, SessionLimits(max_images=1000))
    return None


@pytest.mark.parametrize("role", [1, 2], ids=["server", "helper"])
def test_huge_batch_count_is_refused_before_the_list_is_received(role):
    """A count of 10^6 batches is refused at once: the list of sizes is never received."""
    with pytest.raises(ProtocolError) as info:
        run_in_process(lambda p: _huge_count(p, role), timeout=10)
    msg = str(info.value)
    assert f"party {role} ({PARTY_NAMES[role]})" in msg and "announced 1000000 batches" in msg \
        and "--max-images" in msg, msg


def test_default_limits_and_cli_flags(capsys, monkeypatch):
    assert SessionLimits() == SessionLimits(max_batch=64, max_images=100_000)
    assert SessionLimits.admitting([128, 5]).max_batch == 128
    with pytest.raises(ValueError, match="max_batch"):
        SessionLimits(max_batch=0)
    import importlib.util
    root = Path(__file__).resolve().parents[2] / "research" / "secure_inference"
    monkeypatch.syspath_prepend(str(root))
    for script in ("server.py", "crypto_provider.py"):
        spec = importlib.util.spec_from_file_location(f"cli_{script[:-3]}", root / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with pytest.raises(SystemExit) as ok:
            module.main(["--help"])
        text = capsys.readouterr().out
        assert ok.value.code == 0 and "--max-batch" in text and "--max-images" in text, text
        with pytest.raises(SystemExit, match="max_batch must be"):
            module.main(["--max-batch", "0", "--model", "resnet18"] +
                        (["--checkpoint", "none.pth"] if script == "server.py" else []))


# --- bytes queued per link ----------------------------------------------------------------

def test_unread_incoming_frames_are_capped():
    """A peer that sends far ahead of the protocol fails the link instead of filling memory."""
    a, b = socket.socketpair()
    link = SocketLink(a, 0, 1, max_frame=1 << 16, max_queued=1 << 17, linger=0.5)
    frame = encode_frame(torch.zeros(7000, dtype=torch.int64), scope_hash(""), 0)  # 56 kB
    try:
        b.settimeout(1.0)
        try:
            for _ in range(40):     # 2.2 MB, far over the 128 kB cap
                b.sendall(frame)
        except OSError:
            pass                    # the link stopped reading: fine
        with pytest.raises(ProtocolError, match="not read yet \\(limit 131072\\)"):
            for _ in range(40):
                link.recv(5.0)
        assert link._in_bytes <= (1 << 17) + len(frame)
    finally:
        link.close()
        b.close()


def test_outgoing_queue_is_capped():
    """Frames to a peer that reads nothing wait for room, then fail clearly."""
    a, b = socket.socketpair()
    link = SocketLink(a, 0, 1, max_frame=1 << 16, max_queued=1 << 17, linger=0.5,
                      send_timeout=0.5)
    frame = encode_frame(torch.zeros(7000, dtype=torch.int64), scope_hash(""), 0)
    try:
        with pytest.raises(ProtocolError, match="queued for sending \\(limit 131072\\)"):
            for _ in range(2000):   # 112 MB: more than the socket buffers and the cap
                link.send(frame)
        assert link._out_bytes <= 1 << 17
    finally:
        link.close()
        b.close()


def test_max_queued_below_max_frame_is_refused():
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="at least max_frame"):
        SocketLink(a, 0, 1, max_frame=1 << 16, max_queued=1 << 10)
    a.close()
    b.close()
