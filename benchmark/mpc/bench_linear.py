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
        python benchmark/mpc/bench_linear.py --kernels [--reps 7] [--json out.json]

``--kernels``: the preprocessing's ring products alone, in this process on one thread, for
every conv shape of ResNet18-CIFAR (batch 1): 64-bit × 64-bit (P0's conv(A, F), P2's
conv(A, B)) and 64-bit × small weights (P1's online conv), on torch's int64 conv2d, on
im2col + int64 matmul (cached Wᵀ), on the float64 convolutions of balanced 22-bit limbs
that were the CPU default before issue 21 (6 limb products, 3 with small weights), and on
the default backend (which picks per shape). Times are the thread's CPU time (min of
``--reps``), which the other jobs on a shared machine disturb far less than wall time;
every result is checked equal to torch's int64 conv2d.
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
from secure_inference.mpc import backends as B  # noqa: E402
from secure_inference.mpc.backends import CpuInt64Backend, LimbFloatBackend  # noqa: E402
from secure_inference.mpc.ring import encode  # noqa: E402
from secure_inference.mpc.stats import merge_stats  # noqa: E402
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


RESNET18_CIFAR_CONVS = [  # (x shape, w shape, stride, padding, layers of this shape)
    ((1, 3, 32, 32), (64, 3, 3, 3), 1, 1, 1), ((1, 64, 32, 32), (64, 64, 3, 3), 1, 1, 4),
    ((1, 64, 32, 32), (128, 64, 3, 3), 2, 1, 1), ((1, 128, 16, 16), (128, 128, 3, 3), 1, 1, 3),
    ((1, 64, 32, 32), (128, 64, 1, 1), 2, 0, 1), ((1, 128, 16, 16), (256, 128, 3, 3), 2, 1, 1),
    ((1, 256, 8, 8), (256, 256, 3, 3), 1, 1, 3), ((1, 128, 16, 16), (256, 128, 1, 1), 2, 0, 1),
    ((1, 256, 8, 8), (512, 256, 3, 3), 2, 1, 1), ((1, 512, 4, 4), (512, 512, 3, 3), 1, 1, 3),
    ((1, 256, 8, 8), (512, 256, 1, 1), 2, 0, 1)]


def old_limb_conv(x, w, stride, padding, small: bool):
    """The CPU default before issue 21: float64 convolutions of balanced 22-bit limbs (all
    pairs with shift < 64), split over input channels so every float sum stays below 2^53."""
    xl = [d.to(torch.float64) for d in B.balanced_limbs(x, 22, 3)]
    wl = [w.to(torch.float64)] if small else \
        [d.to(torch.float64) for d in B.balanced_limbs(w, 22, 3)]
    pairs = B._pairs_below_64(22, 3, len(wl))
    step = (1 << 11) // (w.shape[2] * w.shape[3]) - 1
    products = B._conv_products(x.shape[0], (stride, padding, 1, 1))
    out = None
    for c0 in range(0, x.shape[1], step):
        part = B._limb_combine([t[:, c0:c0 + step] for t in xl],
                               [t[:, c0:c0 + step] for t in wl], pairs, 22, products)
        out = part if out is None else out.add_(part)
    return out


def kernel_bench(reps: int) -> dict:
    """Thread CPU seconds per conv shape and kernel, and the per-image sums (see --kernels)."""
    torch.set_num_threads(1)
    hybrid = B.CpuHybridBackend()
    rows, totals = [], {}
    for xs, ws, s, p, count in RESNET18_CIFAR_CONVS:
        x, w = prg.private_stream().ring(xs), prg.private_stream().ring(ws)
        small = torch.randint(-(1 << 21) + 1, 1 << 21, ws)
        refs = {"full": F.conv2d(x, w, None, s, p), "small": F.conv2d(x, small, None, s, p)}
        kernels = {}
        for kind, wv in (("full", w), ("small", small)):
            kernels[f"{kind}/int64 conv2d"] = functools.partial(F.conv2d, x, wv, None, s, p)
            kernels[f"{kind}/im2col+matmul"] = functools.partial(hybrid._gemm_conv, x, wv, s, p,
                                                                 1)
            kernels[f"{kind}/f64 limbs (old)"] = functools.partial(old_limb_conv, x, wv, s, p,
                                                                   kind == "small")
            kernels[f"{kind}/default"] = functools.partial(hybrid.conv2d, x, wv, s, p,
                                                           small_weight=kind == "small")
        for name, fn in kernels.items():
            assert torch.equal(fn(), refs[name.split("/")[0]]), name
        best = dict.fromkeys(kernels, float("inf"))
        for _ in range(reps):          # interleaved, so load changes hit every kernel alike
            for name, fn in kernels.items():
                t0 = time.thread_time()
                fn()
                best[name] = min(best[name], time.thread_time() - t0)
        macs = refs["full"].numel() * ws[1] * ws[2] * ws[3]
        rows.append({"x": xs, "w": ws, "stride": s, "padding": p, "layers": count,
                     "path": hybrid.conv_path(xs, ws, s, p), "gmac": macs / 1e9, "s": best})
        for name, v in best.items():
            totals[name] = totals.get(name, 0.0) + v * count
    return {"rows": rows, "per_image_s": totals}


def print_kernels(res: dict) -> None:
    names = list(res["per_image_s"])
    print("thread CPU ms per conv (min of reps), one thread; 'full' = 64-bit x 64-bit (P0, P2 "
          "preprocessing), 'small' = x 64-bit weights below 2^21 (P1 online)")
    for r in res["rows"]:
        print(f"{str(r['x']):18s} {str(r['w']):18s} s{r['stride']} x{r['layers']} "
              f"[{r['path']}]  " + "  ".join(f"{n.split('/')[1]}:{r['s'][n] * 1e3:.1f}"
                                             for n in names if n.startswith("full")))
    print("per image (sum over ResNet18-CIFAR's convs):")
    for n in names:
        print(f"    {n:24s} {res['per_image_s'][n] * 1e3:8.1f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per op (default 5)")
    ap.add_argument("--plaintext", action="store_true", help="plaintext TCP instead of TLS")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    ap.add_argument("--kernels", action="store_true",
                    help="time the ring products of ResNet18-CIFAR's convs on each kernel")
    args = ap.parse_args(argv)
    if args.kernels:
        res = kernel_bench(args.reps)
        print_kernels(res)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0

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
