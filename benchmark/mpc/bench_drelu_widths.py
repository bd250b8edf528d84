"""DReLU throughput per comparison width ℓ, this checkout against a baseline commit, interleaved.

For each width ℓ (``DReLUConfig(ring_bits=ℓ)``; 64 is the exact DReLU) and each batch size n,
three party processes run one batched DReLU of n Gaussian fixed-point activations (f = 16)
over loopback TLS 1.3 (``--no-tls``: plaintext TCP). The same measurement runs with the code of
a baseline tree (``--baseline-tree``, e.g. ``git worktree add /tmp/si_baseline 879830e``:
the script only reads it, through ``PYTHONPATH``), alternating baseline and new run by run so
both see the same machine load. Each run is its own Python process (fresh numba caches loaded,
no state shared between the variants).

Reported per (variant, ℓ, n): DReLUs per second (wall time of the slowest party; median over
``--repeats``), CPU seconds of each party (``time.process_time`` around the DReLU, all threads of
the process), payload bytes per DReLU and rounds (baseline and new must agree exactly: the
script fails otherwise), and the new/baseline throughput ratio. Outputs are checked against
the plaintext sign (every input lies in the exact range of each width ≥ 20 bits).

Example::

    git worktree add /tmp/si_baseline 879830e
    .venv/bin/python benchmark/mpc/bench_drelu_widths.py --widths 64 24 27 32 \\
        --sizes 1000000 --repeats 3 --baseline-tree /tmp/si_baseline --json /tmp/widths.json

``--profile DIR`` (one variant, no baseline) writes a cProfile of each party's DReLU to
``DIR/p{role}_l{ℓ}_n{n}.prof``. Party processes run torch single-threaded
(``OMP_NUM_THREADS=1`` unless set), as in ``bench_nonlinear.py``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (also in the children)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FRAC_BITS = 16
WARM_UP = os.environ.get("SI_BENCH_NO_WARMUP", "") == ""   # --no-warm-up sets it for workers


def _party_body(party, share, bits: int, n: int, prof_dir: str | None):
    """One party's DReLU (module level, so the party processes can unpickle it)."""
    import cProfile

    from secure_inference.mpc.protocols import drelu as D
    from secure_inference.mpc.stats import merge_stats

    cfg = D.DReLUConfig(ring_bits=bits)
    x = share if share is not None else party.placeholder((n,))
    if WARM_UP:
        # a 64-element DReLU first, in its own scope: numba kernels loaded and all three
        # parties past their start-up, so the clock below measures the DReLU, not the
        # slowest process's start (~0.6 s here, a fixed cost that made 10^7 look faster
        # per DReLU than 10^6)
        tiny = x[:64] if share is not None else party.placeholder((64,))
        D.drelu(party, tiny, cfg, scope="warm-up")
    prof = cProfile.Profile(time.process_time) if prof_dir else None   # CPU time: load-robust
    c0, t0 = time.process_time(), time.perf_counter()
    if prof:
        prof.enable()
    out = D.drelu(party, x, cfg)
    if prof:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if prof:
        prof.dump_stats(os.path.join(prof_dir, f"p{party.role}_l{bits}_n{n}.prof"))
    st = merge_stats([party.stats], "drelu")
    return (None if party.role == 2 else out), wall, cpu, st["bytes"], st["rounds"]


def _worker(args) -> None:
    """Run one measurement with whatever ``secure_inference`` is first on the path; print JSON."""
    import functools

    import torch

    import secure_inference
    me = sys.modules[__name__]   # the party processes re-import this script as their main
    from secure_inference.mpc.harness import run_local_processes
    from secure_inference.mpc.protocols import drelu as D
    from secure_inference.mpc.ring import encode

    n, bits = args.n, args.width
    x = encode(torch.randn(n, dtype=torch.float64), FRAC_BITS)
    x0 = torch.randint(-(1 << 63), (1 << 63) - 1, (n,), dtype=torch.int64)
    x1 = x - x0
    private = {0: x0, 1: x1}
    body = functools.partial(me._party_body, bits=bits, n=n, prof_dir=args.profile)
    res = run_local_processes(body, tls=not args.no_tls, timeout=900.0, private=private)
    got = res[0][0] + res[1][0]
    wrong = int((got != D.plain_drelu(x)).sum())
    byts = sum(r[3] for r in res)
    rounds = max(r[4] for r in res)
    print(json.dumps({"code": os.path.dirname(os.path.dirname(secure_inference.__file__)),
                      "width": bits, "n": n, "seconds": max(r[1] for r in res),
                      "cpu_s": [r[2] for r in res], "bytes": byts, "rounds": rounds,
                      "wrong": wrong}))


def _run_worker(tree: str, width: int, n: int, no_tls: bool, profile: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--width", str(width),
           "--n", str(n)]
    if no_tls:
        cmd.append("--no-tls")
    if profile:
        cmd += ["--profile", profile]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    if proc.returncode:
        raise RuntimeError(f"worker failed ({tree}, ℓ={width}, n={n}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if os.path.realpath(row["code"]) != os.path.realpath(tree):
        raise RuntimeError(f"worker imported {row['code']}, not {tree}")
    if row["wrong"]:
        raise RuntimeError(f"{tree}: ℓ={width} n={n}: {row['wrong']} wrong DReLUs")
    del row["code"]   # a path of this machine: the results name commits instead
    return row


def _portable(arg: str, variants: dict[str, str]) -> str:
    """A command-line argument with this machine's checkout paths named by their role."""
    for v, tree in variants.items():
        if os.path.realpath(arg) == os.path.realpath(tree):
            return f"<{v}-tree>"
    return os.path.relpath(arg, REPO) if os.path.isabs(arg) and arg.startswith(REPO) else arg


def _describe_tree(tree: str) -> str:
    """The commit a checkout is at (``+dirty`` with uncommitted changes), for the results:
    paths of this machine mean nothing elsewhere."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", tree, *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 24, 27, 32],
                    help="comparison widths ℓ (DReLUConfig(ring_bits=ℓ); 64 = exact)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000],
                    help="DReLUs per batched call")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant, width and size")
    ap.add_argument("--baseline-tree", type=str, default=None,
                    help="checkout of the baseline commit (git worktree); omitted: new code only")
    ap.add_argument("--new-tree", type=str, default=REPO, help="checkout of the new code")
    ap.add_argument("--no-tls", action="store_true", help="plaintext TCP instead of TLS 1.3")
    ap.add_argument("--no-warm-up", action="store_true",
                    help="time from each party's start (as the issue's first figures did) "
                         "instead of after a 64-element warm-up DReLU that synchronises the "
                         "three processes")
    ap.add_argument("--profile", type=str, default=None,
                    help="directory for a cProfile of each party (new code, one repeat)")
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.no_warm_up:
        os.environ["SI_BENCH_NO_WARMUP"] = "1"   # inherited by the workers and their parties
    if args.worker:
        _worker(args)
        return {}
    variants = {"new": args.new_tree}
    if args.baseline_tree and not args.profile:
        variants = {"baseline": args.baseline_tree, "new": args.new_tree}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    results: dict = {"date": now.isoformat(timespec="seconds"),
                     "command": " ".join(["python"] + [_portable(a, variants) for a in sys.argv]),
                     "machine": f"{platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
                     "transport": "plaintext TCP loopback" if args.no_tls else "TLS 1.3 loopback",
                     "trees": {v: _describe_tree(t) for v, t in variants.items()},
                     "runs": [], "summary": []}
    for n in args.sizes:
        for width in args.widths:
            rows: dict[str, list[dict]] = {v: [] for v in variants}
            for rep in range(1 if args.profile else args.repeats):
                order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                for v in order:
                    row = _run_worker(variants[v], width, n, args.no_tls, args.profile)
                    row["variant"] = v
                    rows[v].append(row)
                    results["runs"].append(row)
                    print(f"  {v:8s} ℓ={width:2d} n={n:,}: {n / row['seconds'] / 1e6:.3f} M/s, "
                          f"cpu {['%.2f' % c for c in row['cpu_s']]}", file=sys.stderr)
            summary = {"width": width, "n": n}
            for v, rs in rows.items():
                secs = statistics.median(r["seconds"] for r in rs)
                summary[v] = {"seconds": secs, "mdrelu_per_s": n / secs / 1e6,
                              "cpu_s": [statistics.median(r["cpu_s"][p] for r in rs)
                                        for p in range(3)],
                              "bytes_per_drelu": rs[0]["bytes"] / n, "rounds": rs[0]["rounds"]}
                if any(r["bytes"] != rs[0]["bytes"] or r["rounds"] != rs[0]["rounds"]
                       for r in rs):
                    raise RuntimeError(f"{v}: bytes or rounds vary between runs")
            if len(variants) == 2:
                b, nw = summary["baseline"], summary["new"]
                if (b["bytes_per_drelu"], b["rounds"]) != (nw["bytes_per_drelu"], nw["rounds"]):
                    raise RuntimeError(f"ℓ={width} n={n}: bytes/rounds differ between baseline "
                                       f"{b} and new {nw}")
                summary["ratio_new_over_baseline"] = nw["mdrelu_per_s"] / b["mdrelu_per_s"]
            results["summary"].append(summary)
    _print_table(results, list(variants))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def _print_table(res: dict, variants: list[str]) -> None:
    print(f"\n{res['date']}  {res['machine']}  {res['transport']}")
    head = "| ℓ | n | " + " | ".join(f"{v} M DReLU/s | {v} CPU-s P0/P1/P2" for v in variants)
    head += " | bytes/DReLU | rounds |" + (" new/baseline |" if len(variants) == 2 else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for s in res["summary"]:
        cells = [str(s["width"]), f"{s['n']:,}"]
        for v in variants:
            cells += [f"{s[v]['mdrelu_per_s']:.3f}", "/".join(f"{c:.2f}" for c in s[v]["cpu_s"])]
        cells += [f"{s[variants[-1]]['bytes_per_drelu']:.2f}", str(s[variants[-1]]["rounds"])]
        if len(variants) == 2:
            cells.append(f"{s['ratio_new_over_baseline']:.2f}×")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
