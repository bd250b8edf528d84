"""Per-link throughput of the parties' links against raw loopback sockets, in the same run.

Three parties in a ring: each sends SIZE MB to the next party and receives SIZE MB from the
previous one, in frames of FRAME MB, all three links busy at once (the pattern of a secure
layer). Measured three ways, each as three processes:

* ``raw``: plain TCP sockets, ``sendall`` / ``recv_into`` a preallocated buffer (the ceiling);
* ``raw TLS``: the same sockets wrapped in the parties' TLS 1.3 contexts (same certificates,
  same cipher negotiation): the ceiling for TLS links, raw sockets plus the encryption;
* ``links plaintext``: :func:`~secure_inference.mpc.harness.run_local_processes` with
  ``tls=False``, ``Party.send`` / ``Party.recv`` of uint8 tensors;
* ``links TLS``: the same with TLS 1.3 (what every real run uses).

Reports GB/s per link (bytes one party receives / its receive time) and the ratio to raw
(plaintext) or raw TLS (TLS).

    .venv/bin/python benchmark/mpc/bench_links.py [--size-mb 256] [--frame-mb 8]
"""
from __future__ import annotations

import argparse
import json
import functools
import multiprocessing as mp
import socket
import tempfile
import time
from pathlib import Path

import torch

from secure_inference.mpc.certs import create_certificates
from secure_inference.mpc.harness import run_local_processes


def _party_ring(party, size: int, frame: int) -> float:
    nxt, prv = (party.role + 1) % 3, (party.role + 2) % 3
    chunk = torch.full((frame,), party.role, dtype=torch.uint8)
    frames = size // frame
    start = time.perf_counter()
    for i in range(frames):   # send ahead by one frame, then receive: links stay busy
        party.send(nxt, chunk)
        if i:
            party.recv(prv, (frame,), torch.uint8)
    party.recv(prv, (frame,), torch.uint8)
    return time.perf_counter() - start


def _raw_member(role: int, ports: list[int], size: int, frame: int, out,
                certs: str | None = None) -> None:
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", ports[role]))
    lst.listen(1)
    deadline = time.monotonic() + 60
    while True:   # the next party may still be starting (spawned processes import slowly)
        try:
            send = socket.create_connection(("127.0.0.1", ports[(role + 1) % 3]))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    recv, _ = lst.accept()
    for s in (send, recv):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if certs is not None:   # the parties' own TLS contexts, no framing or I/O threads
        from secure_inference.mpc.transport.tls import TLSConfig
        import concurrent.futures
        tls = TLSConfig.from_dir(certs, role)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:   # both handshakes at once:
            server = pool.submit(tls.context(True).wrap_socket, recv, server_side=True)
            send = tls.context(False).wrap_socket(send, server_hostname="127.0.0.1")
            recv = server.result(timeout=60)   # (in turn, all three would wait as clients)
    payload = bytes(frame)
    buf = bytearray(frame)
    view = memoryview(buf)
    import threading

    def sender():
        for _ in range(size // frame):
            send.sendall(payload)
    start = time.perf_counter()
    t = threading.Thread(target=sender)
    t.start()
    got = 0
    while got < size:
        n = recv.recv_into(view[:min(frame, size - got)])
        if not n:
            break
        got += n
    t.join()
    out.put(time.perf_counter() - start)
    for s in (send, recv, lst):
        s.close()


def _free_ports(n: int) -> list[int]:
    """``n`` loopback ports the OS reports free (fixed port numbers could collide with the
    ephemeral ports of other connections and leave a member unable to listen)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def raw_ring(size: int, frame: int, certs: str | None = None) -> float:
    """Seconds for the slowest party to receive ``size`` bytes over raw loopback sockets
    (TLS-wrapped with the party certificates in ``certs`` if given)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ports = _free_ports(3)
    procs = [ctx.Process(target=_raw_member, args=(r, ports, size, frame, q, certs))
             for r in range(3)]
    for p in procs:
        p.start()
    secs = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return max(secs)


def links_ring(size: int, frame: int, tls: bool) -> float:
    fn = functools.partial(_party_ring, size=size, frame=frame)
    return max(run_local_processes(fn, tls=tls, timeout=600, threads=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--frame-mb", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs of each")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the rates (GB/s per link) to this file")
    args = ap.parse_args(argv)
    size, frame = args.size_mb << 20, args.frame_mb << 20
    best = {}
    with tempfile.TemporaryDirectory() as certs:
        create_certificates(certs, {r: ["localhost", "127.0.0.1"] for r in range(3)})
        for _ in range(args.repeats):   # interleaved, best of N: the machine is shared
            for name, run in (("raw", lambda: raw_ring(size, frame)),
                              ("raw TLS", lambda: raw_ring(size, frame, certs)),
                              ("links plaintext", lambda: links_ring(size, frame, False)),
                              ("links TLS", lambda: links_ring(size, frame, True))):
                secs = run()
                best[name] = min(best.get(name, float("inf")), secs)
    ceiling = {"raw": "raw", "raw TLS": "raw", "links plaintext": "raw", "links TLS": "raw TLS"}
    print(f"{args.size_mb} MB per link in {args.frame_mb} MB frames, three links at once")
    for name, secs in best.items():
        rate = size / secs / 1e9
        top = size / best[ceiling[name]] / 1e9
        print(f"  {name:16s} {rate:6.3f} GB/s per link  ({rate / top:5.1%} of "
              f"{ceiling[name]})")
    if args.json is not None:
        rates = {f"{name.replace('links ', '').replace(' ', '_').lower()}_GBps":
                 size / secs / 1e9
                 for name, secs in best.items()}
        args.json.write_text(json.dumps({"size_MB": args.size_mb, **rates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
