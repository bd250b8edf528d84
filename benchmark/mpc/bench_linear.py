#!/usr/bin/env python
"""Linear-layer benchmark of the secure runtime: bytes, rounds and time per image.

Runs over real loopback TCP between three processes (TLS 1.3 by default) and reports, for a
convolution with the server's weights, a linear layer with the server's weights and a
shared × shared (Beaver) matrix product:

* measured payload bytes and rounds against the analytic count of
  :mod:`secure_inference.mpc.protocols.linear` (they must be equal);
* the median wall time per image of the secure op (max over the three parties);
* the same product computed in plaintext in the same run, as baselines: float32 torch, the
  CPU int64 ring backend (exact mod 2^64), the float64 limb backend (the CUDA algorithm, on
  CPU) and, for the convolution, Python integers on a reduced slice (extrapolated per MAC).

Usage:  python benchmark/mpc/bench_linear.py [--reps 5] [--plaintext] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from secure_inference.mpc import prg  # noqa: E402
from secure_inference.mpc import protocols as P  # noqa: E402
from secure_inference.mpc.backends import CpuInt64Backend, LimbFloatBackend  # noqa: E402
from secure_inference.mpc.ring import encode  # noqa: E402
from secure_inference.mpc.runtime import merge_stats  # noqa: E402
from secure_inference.mpc.harness import run_local_processes  # noqa: E402

CONV = dict(x=(1, 64, 32, 32), w=(64, 64, 3, 3), padding=1)     # a ResNet-18 CIFAR layer
LIN = dict(x=(64, 1024), w=(1024, 1024))                        # batch of 64 through 1024->1024
MM = dict(x=(256, 256), y=(256, 256))                           # shared x shared


def _sync(p) -> None:
    """All three parties meet (so timings start together)."""
    with p.scope("sync"):
        one = torch.zeros(1, dtype=torch.int64)
        for peer in sorted({0, 1, 2} - {p.role}):
            p.send(peer, one)
        for peer in sorted({0, 1, 2} - {p.role}):
            p.recv(peer, (1,))


def party_bench(p, reps: int):
    """Executed by each party: returns per-op times (s) and the party's statistics."""
    w = torch.randn(CONV["w"]) * 0.05 if p.role == 1 else None
    lw = torch.randn(LIN["w"]) * 0.03 if p.role == 1 else None
    x = P.share(p, encode(torch.randn(CONV["x"])) if p.role == 0 else None, 0, CONV["x"])
    xl = P.share(p, encode(torch.randn(LIN["x"])) if p.role == 0 else None, 0, LIN["x"])
    a = P.share(p, encode(torch.randn(MM["x"])) if p.role == 0 else None, 0, MM["x"])
    b = P.share(p, encode(torch.randn(MM["y"])) if p.role == 1 else None, 1, MM["y"])
    times = {"conv": [], "linear": [], "matmul": []}
    for i in range(reps + 1):              # call 0 also opens the weights: not timed
        for op in times:
            _sync(p)
            t = time.perf_counter()
            with p.scope(f"rep{i}"):
                if op == "conv":
                    P.conv2d(p, x, w, None, weight_shape=CONV["w"], padding=1, name="conv")
                elif op == "linear":
                    P.linear(p, xl, lw, None, weight_shape=LIN["w"], name="linear")
                else:
                    P.matmul(p, a, b)
            if i:
                times[op].append(time.perf_counter() - t)
    return times, p.stats


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def plaintext_baselines(reps: int) -> dict[str, dict[str, float]]:
    """Local times of the same products: float32, int64 ring, float64 limbs, Python ints."""
    cpu, limb = CpuInt64Backend(), LimbFloatBackend()
    xf, wf = torch.randn(CONV["x"]), torch.randn(CONV["w"])
    xr, wr = prg.private_stream().ring(CONV["x"]), prg.private_stream().ring(CONV["w"])
    lx, lwf = torch.randn(LIN["x"]), torch.randn(LIN["w"])
    lxr, lwr = prg.private_stream().ring(LIN["x"]), prg.private_stream().ring(LIN["w"])
    ma, mb = prg.private_stream().ring(MM["x"]), prg.private_stream().ring(MM["y"])
    out = {
        "conv": {"float32": _median_time(lambda: F.conv2d(xf, wf, padding=1), reps),
                 "int64": _median_time(lambda: cpu.conv2d(xr, wr, 1, 1), reps),
                 "limb-float64": _median_time(lambda: limb.conv2d(xr, wr, 1, 1), max(1, reps // 2))},
        "linear": {"float32": _median_time(lambda: F.linear(lx, lwf), reps),
                   "int64": _median_time(lambda: cpu.matmul(lxr, lwr.T), reps),
                   "limb-float64": _median_time(lambda: limb.matmul(lxr, lwr.T), max(1, reps // 2))},
        "matmul": {"float32": _median_time(lambda: ma.float() @ mb.float(), reps),
                   "int64": _median_time(lambda: cpu.matmul(ma, mb), reps),
                   "limb-float64": _median_time(lambda: limb.matmul(ma, mb), max(1, reps // 2))},
    }
    # Python integers: one output pixel of every output channel (extrapolated per MAC)
    xs, ws = xr[0, :, :3, :3].tolist(), wr.tolist()
    t = time.perf_counter()
    for o in range(CONV["w"][0]):
        acc = 0
        for c in range(CONV["w"][1]):
            for u in range(3):
                for v in range(3):
                    acc += xs[c][u][v] * ws[o][c][u][v]
        acc %= 1 << 64
    per_mac = (time.perf_counter() - t) / (CONV["w"][0] * CONV["w"][1] * 9)
    macs = CONV["w"][0] * CONV["w"][1] * 9 * CONV["x"][2] * CONV["x"][3]
    out["conv"]["python-int (extrapolated)"] = per_mac * macs
    return out


def analytic_bytes() -> dict[str, dict[str, int]]:
    """Payload bytes per image from the protocol definitions (linear.py docstring)."""
    n_x = 1
    for s in CONV["x"]:
        n_x *= s
    conv_out = CONV["x"][0] * CONV["w"][0] * CONV["x"][2] * CONV["x"][3]
    lin_x, lin_out = LIN["x"][0] * LIN["x"][1], LIN["x"][0] * LIN["w"][0]
    mm_a, mm_b, mm_out = MM["x"][0] * MM["x"][1], MM["y"][0] * MM["y"][1], MM["x"][0] * MM["y"][1]
    wc, wl = 1, LIN["w"][0] * LIN["w"][1]
    for s in CONV["w"]:
        wc *= s
    return {"conv": {"per_image": 8 * (n_x + conv_out), "once": 8 * wc},
            "linear": {"per_image": 8 * (lin_x + lin_out), "once": 8 * wl},
            "matmul": {"per_image": 8 * mm_out + 16 * (mm_a + mm_b), "once": 0}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per op (default 5)")
    ap.add_argument("--plaintext", action="store_true", help="plaintext TCP instead of TLS")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)

    res = run_local_processes(functools.partial(party_bench, reps=args.reps),
                              tls=not args.plaintext, timeout=300, wall_timeout=1800)
    stats = [r[1] for r in res]
    want = analytic_bytes()
    base = plaintext_baselines(args.reps)
    report = {}
    for op in ("conv", "linear", "matmul"):
        first = merge_stats(stats, f"rep0/{op}")
        later = [merge_stats(stats, f"rep{i}/{op}") for i in range(1, args.reps + 1)]
        secure = max(statistics.median(r[0][op]) for r in res)
        report[op] = {
            "bytes_per_image": later[0]["bytes"], "analytic_per_image": want[op]["per_image"],
            "bytes_first_call": first["bytes"],
            "analytic_first_call": want[op]["per_image"] + want[op]["once"],
            "rounds_per_image": later[0]["rounds"], "secure_s": secure,
            "baselines_s": base[op],
            "ratio_secure_vs": {k: secure / v for k, v in base[op].items()},
        }
        assert all(l["bytes"] == want[op]["per_image"] for l in later), (op, later)
        assert first["bytes"] == want[op]["per_image"] + want[op]["once"], (op, first)
    print(f"secure linear layers over loopback ({'plaintext' if args.plaintext else 'TLS 1.3'}), "
          f"median of {args.reps}")
    for op, r in report.items():
        print(f"\n{op}: {r['bytes_per_image']:,} B/image (analytic {r['analytic_per_image']:,}), "
              f"first call {r['bytes_first_call']:,} B (weights opened once), "
              f"{r['rounds_per_image']} round(s), secure {r['secure_s'] * 1e3:.1f} ms")
        for k, v in r["baselines_s"].items():
            print(f"    plaintext {k:26s} {v * 1e3:10.2f} ms   secure/plain = "
                  f"{r['ratio_secure_vs'][k]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
