"""Framing checks, failure handling (malformed frames, wrong sizes, stalled/killed peers, wrong
certificates) and real three-process loopback runs over TLS."""
import functools
import shutil
import socket
import threading
import struct
import time
from pathlib import Path

import pytest
import torch

from secure_inference.mpc.certs import create_certificates
from secure_inference.mpc.ring import decode, encode
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.stats import merge_stats
from secure_inference.mpc.harness import run_in_process, run_local_processes
from secure_inference.mpc.transport.addresses import listen
from secure_inference.mpc.transport.connect import connect_links
from secure_inference.mpc.transport.frames import decode_frame, encode_frame, scope_hash, split_prefix
from secure_inference.mpc.transport.socket_link import SocketLink
from secure_inference.mpc.transport.tls import TLSConfig

from helpers import mpc_process_fns as fns
from helpers.links import connect_three

ROOT = Path(__file__).resolve().parents[2]
HOSTS = {r: ["localhost", "127.0.0.1"] for r in range(3)}


# --- frames -------------------------------------------------------------------------------

def _decode(frame: bytes, dtype=torch.int64, shape=(2, 3), scope="s"):
    body = split_prefix(frame, 1 << 20, peer=1)
    return decode_frame(body, dtype=dtype, shape=shape, scope=scope_hash(scope), scope_name=scope,
                        peer=1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32, torch.int8,
                                   torch.float64, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4, 2)])
def test_frame_roundtrip_every_dtype_and_shape_and_is_a_copy(dtype, shape):
    """Frames are built in an uninitialised buffer: every byte must be written, for every wire
    dtype and shape (0-d, empty, non-contiguous), and the payload is a copy of the tensor."""
    g = torch.Generator().manual_seed(len(shape))
    full = torch.randint(-100, 100, (2 * max(1, int(torch.tensor(shape).prod())),), generator=g)
    x = full[::2][:int(torch.tensor(shape).prod())].reshape(shape)   # a strided view
    x = x.bool() if dtype == torch.bool else x.to(dtype)
    frame = encode_frame(x, scope_hash("s"), clock=3)
    want = x.clone()
    if x.numel():
        x.view(-1)[0] = 1 if dtype != torch.bool else not bool(x.view(-1)[0])  # changed after
    body = split_prefix(frame, 1 << 20, peer=1)
    got = decode_frame(body, dtype=dtype, shape=shape, scope=scope_hash("s"), scope_name="s",
                       peer=1)
    assert torch.equal(got.tensor, want) and got.clock == 3
    assert len(frame) == got.frame_bytes


def test_frame_roundtrip_and_header_checks():
    x = torch.arange(6, dtype=torch.int64).reshape(2, 3) - 3
    frame = bytes(encode_frame(x, scope_hash("s"), clock=7))   # bytes: the test edits it
    got = _decode(frame)
    assert torch.equal(got.tensor, x) and got.clock == 7 and got.payload_bytes == 48
    with pytest.raises(ProtocolError, match="expected torch.int64 \\[3, 2\\]"):
        _decode(frame, shape=(3, 2))
    with pytest.raises(ProtocolError, match="expected torch.uint8"):
        _decode(frame, dtype=torch.uint8)
    with pytest.raises(ProtocolError, match="different scope"):
        _decode(frame, scope="t")
    with pytest.raises(ProtocolError, match="length prefix says"):
        _decode(frame[:-8])                                   # truncated payload
    bad_len = struct.pack("<I", len(frame) - 4 - 8) + frame[4:-8]
    with pytest.raises(ProtocolError, match="does not match shape"):
        _decode(bad_len)                                      # header/payload disagree
    with pytest.raises(ProtocolError, match="magic"):
        _decode(frame[:4] + b"XX" + frame[6:])
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        split_prefix(struct.pack("<I", 1 << 30) + b"\0" * 10, 1 << 20, peer=2)
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(torch.zeros(1000, dtype=torch.int64), 0, 0, max_frame=100)
    with pytest.raises(TypeError):
        encode_frame(torch.zeros(3), 0, 0)                    # float32 is not a wire dtype


# --- in-process failures ------------------------------------------------------------------

def _wrong_size(p):
    if p.role == 0:
        p.send(1, torch.zeros(3, dtype=torch.int64))
    elif p.role == 1:
        p.recv(0, (4,))
    else:
        p.recv(1, (1,))          # never sent: must be released by the abort, not hang


def test_wrong_size_is_an_error_and_nobody_hangs():
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="expected torch.int64 \\[4\\], got torch.int64 \\[3\\]") \
            as info:
        run_in_process(_wrong_size, timeout=30)
    assert time.monotonic() - start < 20  # released by the abort well before the 30 s timeout
    assert set(info.value.party_errors) == {1, 2}


def _stall(p):
    if p.role == 1:
        p.recv(0, (1,))   # P0 never sends and never finishes: P1 must time out


def test_silent_peer_times_out_with_a_clear_error():
    with pytest.raises(ProtocolError, match="no frame from party 0 within 0.5 s|closed the link"):
        run_in_process(_stall, timeout=0.5)


def _raises_in_party(p):
    if p.role == 2:
        raise KeyError("boom in the helper")
    p.recv(2, (1,))


def test_exception_in_one_party_propagates():
    with pytest.raises(KeyError, match="boom"):
        run_in_process(_raises_in_party, timeout=30)


# --- socket links directly ----------------------------------------------------------------

def _socket_link_pair():
    a, b = socket.socketpair()
    return SocketLink(a, 0, 1, max_frame=1 << 16, linger=1.0), b


def test_socket_link_refuses_oversized_frame_and_reports_close():
    link, raw = _socket_link_pair()
    try:
        raw.sendall(struct.pack("<I", 1 << 20))     # announces more than max_frame
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            link.recv(5.0)
    finally:
        link.close()
        raw.close()
    link, raw = _socket_link_pair()
    try:
        good = encode_frame(torch.ones(2, dtype=torch.int64), scope_hash(""), 0)
        raw.sendall(good)
        raw.close()                                 # peer goes away after one frame
        assert split_prefix(good, 1 << 16, 1)[:2] == link.recv(5.0)[:2]
        with pytest.raises(ProtocolError, match="closed the link"):
            link.recv(5.0)
    finally:
        link.close()


def test_peer_abort_reason_is_capped_and_its_control_characters_escaped():
    """A hostile peer's abort goodbye (far over the sender's 600-byte cap, with a newline, a
    forged log line, carriage return, escape codes and a Unicode line separator): the error
    this party raises, and prints, holds one line of at most the cap, those characters
    escaped."""
    from secure_inference.mpc.transport.socket_link import _ABORT, _ABORT_REASON_MAX
    link, raw = _socket_link_pair()
    try:
        reason = "bad\nserver: session 00000000 client 1.2.3.4:5 ok\r\x1b[2J\x9b\u2028" + "y" * 5000
        body = _ABORT + bytes([0]) + reason.encode()
        raw.sendall(struct.pack("<I", len(body)) + body)
        with pytest.raises(ProtocolError) as info:
            link.recv(5.0)
    finally:
        link.close()
        raw.close()
    msg = str(info.value)
    assert msg.startswith("party 0: party 0 failed (reported by party 1"), msg[:200]
    assert "bad\\nserver: session 00000000 client 1.2.3.4:5 ok\\r\\x1b[2J\\x9b\\u2028y" in msg
    assert not any(ch in msg for ch in "\n\r\x1b\x9b\u2028"), repr(msg[:200])
    cause = msg.split(": ", 2)[2]
    assert len(cause) <= _ABORT_REASON_MAX, len(cause)


def test_listen_backlog_is_the_systems_largest(monkeypatch):
    """listen() asks for socket.SOMAXCONN pending connections (the kernel's cap), so a burst
    of connections waits in the kernel rather than being refused."""
    seen = []
    real = socket.socket.listen

    def spy(self, backlog):
        seen.append(backlog)
        return real(self, backlog)
    monkeypatch.setattr(socket.socket, "listen", spy)
    listen("127.0.0.1", 0).close()
    assert seen == [socket.SOMAXCONN]


def test_socket_link_stall_and_large_concurrent_exchange(link_pair):
    la, lb = link_pair
    with pytest.raises(ProtocolError, match="within 0.2 s"):
        la.recv(0.2)
    big = encode_frame(torch.arange(2_000_000, dtype=torch.int64), 0, 0)
    la.send(big)           # both send 16 MB before either receives: no deadlock
    lb.send(big)
    assert la.recv(30.0) == big[4:] and lb.recv(30.0) == big[4:]


def test_socket_link_wait_sent_waits_for_the_send_queue():
    """wait_sent is False while a frame is still queued (nobody reads the other end) and True
    once the peer has taken it all (what the fault hook waits for before it kills a party)."""
    a, b = socket.socketpair()
    la = SocketLink(a, 0, 1, linger=0.2)
    try:
        # far more than the two socket buffers hold (the link enlarges its own)
        big = encode_frame(torch.arange(6_000_000, dtype=torch.int64), 0, 0)
        la.send(big)
        assert la.wait_sent(0.3) is False
        got = bytearray()

        def drain():
            while len(got) < len(big):
                got.extend(b.recv(1 << 20))
        reader = threading.Thread(target=drain)
        reader.start()
        assert la.wait_sent(30.0) is True
        reader.join(30)
        assert bytes(got) == bytes(big)
    finally:
        b.close()
        la.close()


def _connect_all(addresses, listeners, tls_for, allow_plaintext=False, timeout=5.0):
    """(links by role, errors by role, TLS versions seen) of three parties connecting."""
    def inspect(out):
        versions = {getattr(link._sock, "version", lambda: "plain")()
                    for links in out.values() for link in links.values()}
        return dict(out), versions
    (out, versions), errs = connect_three(addresses, listeners, tls_for, inspect,
                                          allow_plaintext=allow_plaintext, timeout=timeout)
    return out, errs, versions


@pytest.fixture
def link_pair():
    """Two socket links joined by a socket pair (parties 0 and 1), closed after the test."""
    a, b = socket.socketpair()
    la, lb = SocketLink(a, 0, 1, linger=1.0), SocketLink(b, 1, 0, linger=1.0)
    yield la, lb
    la.close()
    lb.close()


def _listeners():
    ls = {r: listen("127.0.0.1", 0) for r in (1, 2)}
    addr = {0: ("127.0.0.1", 0), **{r: ("127.0.0.1", s.getsockname()[1]) for r, s in ls.items()}}
    return ls, addr


def test_tls_links_connect_with_matching_certificates(tmp_path):
    create_certificates(tmp_path, HOSTS)
    ls, addr = _listeners()
    out, errs, versions = _connect_all(addr, ls, lambda r: TLSConfig.from_dir(tmp_path, r))
    assert not errs and sorted(out) == [0, 1, 2]
    assert versions == {"TLSv1.3"}


def test_certificate_from_another_ca_is_refused(tmp_path):
    good, other = tmp_path / "good", tmp_path / "other"
    create_certificates(good, HOSTS)
    create_certificates(other, HOSTS)
    for ext in ("pem", "key"):   # the server presents a certificate signed by another CA
        shutil.copy(other / f"server.{ext}", good / f"server.{ext}")
    ls, addr = _listeners()
    out, errs, _ = _connect_all(addr, ls, lambda r: TLSConfig.from_dir(good, r), timeout=3.0)
    assert errs, "a certificate from another CA must be refused"
    msgs = " | ".join(str(e) for e in errs.values())
    assert "certificate" in msgs
    assert all(isinstance(e, ProtocolError) for e in errs.values())


def test_certificate_of_another_party_is_refused(tmp_path):
    create_certificates(tmp_path, HOSTS)
    for ext in ("pem", "key"):   # the server presents the client's (valid) certificate
        shutil.copy(tmp_path / f"client.{ext}", tmp_path / f"server.{ext}")
    ls, addr = _listeners()
    out, errs, _ = _connect_all(addr, ls, lambda r: TLSConfig.from_dir(tmp_path, r), timeout=3.0)
    assert any("certificate belongs to another party" in str(e) for e in errs.values())


def test_plaintext_only_on_loopback_and_only_when_asked():
    with pytest.raises(ValueError, match="refusing plaintext"):
        connect_links(0, {0: ("127.0.0.1", 0), 1: ("127.0.0.1", 1), 2: ("127.0.0.1", 2)}, None,
                      tls=None)
    with pytest.raises(ValueError, match="only allowed on loopback"):
        connect_links(0, {0: ("10.1.2.3", 0), 1: ("10.1.2.4", 1), 2: ("127.0.0.1", 2)}, None,
                      tls=None, allow_plaintext=True)


def test_plaintext_refuses_a_listener_on_every_interface():
    """A helper told to listen on 0.0.0.0 without TLS while its peers are on loopback was
    accepted, and then any host's unauthenticated hello could take a role (security review):
    the party's own address and its listener's are checked too."""
    import socket
    listener = socket.socket()
    try:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        addresses = {0: ("127.0.0.1", 0), 1: ("127.0.0.1", 1),
                     2: ("0.0.0.0", listener.getsockname()[1])}
        with pytest.raises(ValueError, match="this party's listening address included"):
            connect_links(2, addresses, listener, tls=None, allow_plaintext=True, timeout=2)
        loop = {**addresses, 2: ("127.0.0.1", listener.getsockname()[1])}
        with pytest.raises(ValueError, match="0.0.0.0"):   # the listener itself is checked
            connect_links(2, loop, listener, tls=None, allow_plaintext=True, timeout=2)
    finally:
        listener.close()


# --- three processes over loopback --------------------------------------------------------


@pytest.mark.processes
def test_protocols_over_tls_between_three_processes():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    y = torch.randn(2, 3, 8, 8)
    w, b = torch.randn(4, 3, 3, 3) * 0.3, torch.randn(4)
    fn = functools.partial(fns.linear_pipeline, x=encode(x), y=encode(y), w=w, b=b)
    res = run_local_processes(fn, tls=True, timeout=30, wall_timeout=240)
    conv, prod, pooled = (decode(t) for t in res[0][0])
    assert torch.allclose(conv, torch.nn.functional.conv2d(x.double(), w.double(), b.double(),
                                                           padding=1), atol=2e-3)
    assert torch.allclose(prod, (x * y).double(), atol=1e-3)
    assert torch.allclose(pooled, x.double().mean((2, 3)), atol=1e-3)
    assert res[1][0] is None and res[2][0] is None
    stats = [r[1] for r in res]
    n, out = x.numel(), 2 * 4 * 8 * 8
    assert merge_stats(stats, "conv1")["bytes"] == 8 * (w.numel() + n + out)
    assert merge_stats(stats, "mul")["bytes"] == 8 * n + 2 * 8 * 2 * n


@pytest.mark.processes
def test_killed_peer_gives_clear_errors_without_hanging():
    start = time.monotonic()
    with pytest.raises(ProtocolError, match="party 1 died") as info:
        run_local_processes(fns.server_dies, tls=False, timeout=20, wall_timeout=120)
    assert time.monotonic() - start < 60   # the survivors noticed the dead link, not a timeout
    errs = info.value.party_errors
    assert "closed the link" in errs[0] or "reset" in errs[0]
    assert "closed the link" in errs[2] or "reset" in errs[2]


@pytest.mark.processes
def test_stalled_peer_in_processes_times_out():
    with pytest.raises(ProtocolError, match="within 1 s") as info:
        run_local_processes(fns.server_stalls, tls=False, timeout=1.0, wall_timeout=120)
    assert "within 1 s" in info.value.party_errors[0]


@pytest.mark.processes
def test_wrong_certificate_in_processes(tmp_path):
    good, other = tmp_path / "good", tmp_path / "other"
    create_certificates(good, HOSTS)
    create_certificates(other, HOSTS)
    for ext in ("pem", "key"):
        shutil.copy(other / f"helper.{ext}", good / f"helper.{ext}")
    with pytest.raises(ProtocolError, match="certificate|TLS"):
        run_local_processes(fns.noop, tls=True, certs_dir=good, timeout=5, wall_timeout=120)


# --- certificates CLI ---------------------------------------------------------------------

def _load_cli():
    import importlib.util
    script = ROOT / "research" / "secure_inference" / "make_certificates.py"
    spec = importlib.util.spec_from_file_location("make_certificates", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_certificates_cli(tmp_path, capsys):
    cli = _load_cli()
    with pytest.raises(SystemExit) as ok:
        cli.main(["--help"])
    assert ok.value.code == 0
    help_text = capsys.readouterr().out
    assert "copy" in help_text and "ca.key" in help_text and "--server-host" in help_text
    out = tmp_path / "certs"
    assert cli.main([str(out), "--server-host", "10.0.0.5", "--server-host", "server.example"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["ca.key", "ca.pem", "client.key", "client.pem", "helper.key", "helper.pem",
                     "server.key", "server.pem"]
    assert all((out / n).stat().st_mode & 0o077 == 0 for n in names if n.endswith(".key"))
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "server.example" in san.get_values_for_type(x509.DNSName)
    capsys.readouterr()
    with pytest.raises(SystemExit) as again:
        cli.main([str(out)])
    assert again.value.code != 0 and "already exist" in capsys.readouterr().err


def test_socket_link_lends_sent_buffers_again_without_mixing_frames(link_pair):
    """Frames built in frame_buffer memory and sent with reuse=True are lent again once
    written to the socket, never earlier: frames queued ahead of the reader all arrive with
    their own content although the sender keeps building new frames."""
    la, lb = link_pair
    n = (2 << 20) // 8                        # 2 MiB frames: above the reuse threshold
    sent = []
    for rnd in range(3):
        for i in range(6):                # six frames queued before the peer reads
            k = 6 * rnd + i
            x = torch.full((n,), k, dtype=torch.int64)
            x[::1000] = -k
            la.send(encode_frame(x, 0, k, alloc=la.frame_buffer), reuse=True)
            sent.append(x)
        for k in range(6 * rnd, 6 * rnd + 6):
            got = decode_frame(lb.recv(30.0), dtype=torch.int64, shape=(n,), scope=0,
                               scope_name="", peer=0)
            assert got.clock == k and torch.equal(got.tensor, sent[k])
    assert la.wait_sent(30.0)               # every frame written: all its buffers returned
    spares = {arr.ctypes.data for arr in la._spare}
    total = len(encode_frame(sent[0], 0, 0))
    assert la.frame_buffer(total).data_ptr() in spares    # a sent buffer, lent again
    assert la.frame_buffer(100).numel() == 100              # small frames: always fresh
    before = len(la._spare)
    la.send(encode_frame(sent[0], 0, 0))                    # reuse=False: never lent
    lb.recv(30.0)
    assert la.wait_sent(30.0)
    assert len(la._spare) == before


def test_socket_link_reuses_received_buffers_only_once_every_tensor_is_dropped(link_pair):
    """A large frame lands in a received frame's buffer only when no tensor made from it is
    alive: tensors kept by the protocol keep their content while later frames arrive, and a
    buffer whose tensors were dropped is filled again (same memory)."""
    la, lb = link_pair
    n = (2 << 20) // 8                        # 2 MiB frames: larger than the staging buffer

    def exchange(k: int) -> torch.Tensor:
        x = torch.full((n,), k, dtype=torch.int64)
        x[::777] = -k
        la.send(encode_frame(x, 0, k))
        got = decode_frame(lb.recv(30.0), dtype=torch.int64, shape=(n,), scope=0,
                           scope_name="", peer=0)
        assert got.clock == k and torch.equal(got.tensor, x)
        return got.tensor

    kept = [exchange(k) for k in range(4)]          # all alive: four distinct buffers
    assert len({t.data_ptr() for t in kept}) == 4
    view = kept[1][10:20]                           # a view keeps its frame's buffer too
    dropped = {kept[k].data_ptr() for k in (0, 1, 2)}
    del kept[0:3]
    for k in range(4, 12):                          # later frames, kept tensors checked
        t = exchange(k)
        assert t.data_ptr() not in (kept[0].data_ptr(), view.data_ptr() - 10 * 8)
        assert torch.equal(kept[0], torch.where(torch.arange(n) % 777 == 0, -3, 3))
        assert torch.equal(view, torch.full((10,), 1))
        reused = t.data_ptr() in dropped
        del t
    assert reused                                   # a dropped frame's memory came back


@pytest.mark.parametrize("sndbuf", [None, 1 << 16])
def test_plaintext_link_writes_large_tensors_directly_with_copy_semantics(link_pair, sndbuf):
    """send_tensor on a plaintext socket link writes what the socket takes at once straight
    from the tensor and queues a copy of the rest: tensors changed in place right after
    sending, small frames in between and a peer that reads late all leave every frame
    intact and in order (with a 64 KiB send buffer most of each frame takes the copy)."""
    la, lb = link_pair
    if sndbuf:   # the link enlarges its buffers; shrink them to force partial direct writes
        la._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sent, shapes = [], []
    for k in range(12):
        n = (3 << 20) // 8 + 13 * k if k % 3 else 5      # large frames and small ones
        x = torch.arange(n, dtype=torch.int64) * (k + 1)
        length = la.send_tensor(x, scope_hash("s"), k, 1 << 26)
        assert length == len(encode_frame(x, scope_hash("s"), k))
        sent.append(x.clone())
        shapes.append((n,))
        x.fill_(-1)                                      # changed after sending
    for k in range(12):
        got = decode_frame(lb.recv(30.0), dtype=torch.int64, shape=shapes[k],
                           scope=scope_hash("s"), scope_name="s", peer=0)
        assert got.clock == k and torch.equal(got.tensor, sent[k])


def test_small_frames_and_tls_links_take_the_copying_path(link_pair, tmp_path, monkeypatch):
    """Only large CPU tensors on plaintext links are written directly: a TLS socket may not
    be used by two threads, so a TLS link never calls the direct writer (and its frames
    arrive intact); neither does a small frame on a plaintext link."""
    calls = []
    original = SocketLink._write_now
    monkeypatch.setattr(SocketLink, "_write_now",
                        lambda self, h, p: calls.append(p.numel()) or original(self, h, p))
    la, lb = link_pair
    la.send_tensor(torch.zeros(10, dtype=torch.int64), 0, 0, 1 << 20)
    lb.recv(30.0)
    deadline = time.monotonic() + 10
    while la._out and time.monotonic() < deadline:   # written and dequeued
        time.sleep(0.01)
    la.send_tensor(torch.zeros(1 << 15, dtype=torch.int64), 0, 1, 1 << 20)
    lb.recv(30.0)
    assert calls == [8 << 15]   # the small frame did not call it; the large one did
    calls.clear()
    create_certificates(tmp_path, HOSTS)
    ls, addr = _listeners()
    x = torch.arange(1 << 17, dtype=torch.int64)

    def inspect(links):
        links[0][1].send_tensor(x, 0, 0, 1 << 22)
        got = decode_frame(links[1][0].recv(30.0), dtype=torch.int64, shape=x.shape, scope=0,
                           scope_name="", peer=0)
        return torch.equal(got.tensor, x)
    intact, errs = connect_three(addr, ls, lambda r: TLSConfig.from_dir(tmp_path, r), inspect)
    assert not errs and intact and calls == []
