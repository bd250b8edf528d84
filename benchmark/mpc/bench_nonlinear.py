"""Benchmark of the secure non-linear protocols: bytes, rounds and throughput on loopback.

Three party processes talk over real loopback TCP (``--tls`` for TLS 1.3 with mutual
authentication). Measures, for the exact DReLU and an approximate one:

* bytes (payload, summed over all parties) and rounds per DReLU, per ReLU and per pixel of a
  3×3 Block-ReLU, checked against the analytic counts and compared with the named baseline:
  the original research code's measured costs (SecureNN-based: 496 B/DReLU, 536 B/ReLU,
  83 B per 3×3 Block-ReLU pixel);
* throughput in DReLUs per second for each ``--sizes`` (wall time of the slowest party);
* the approximate DReLU's error rate against the exact sign on Gaussian fixed-point activations
  (measured through the protocol, and the analytic expectation).

Example: ``python benchmark/mpc/bench_nonlinear.py --sizes 100000 1000000 --json out.json``

Each party process runs torch single-threaded (``OMP_NUM_THREADS=1`` unless set): three
processes with several OpenMP threads each on a small machine spin against each other and run
about ten times slower.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported (also in the children)

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from secure_inference.mpc.protocols import drelu as D  # noqa: E402
from secure_inference.mpc.protocols import relu as R  # noqa: E402
from secure_inference.mpc.ring import encode  # noqa: E402
from secure_inference.mpc.stats import merge_stats
from secure_inference.mpc.harness import run_in_process, run_local_processes

BASELINE = {"name": "original research code (SecureNN-based), measured",
            "drelu": 496.0, "relu": 536.0, "block_relu_3x3_pixel": 83.0}


def _share(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.randint(-(1 << 63), (1 << 63) - 1, x.shape, dtype=torch.int64)
    return x0, x - x0


def _run(x: torch.Tensor, ops, tls: bool, timeout: float):
    x0, x1 = _share(x)
    res = run_local_processes(functools.partial(R.run_on_shares, shares=(x0, x1), ops=ops),
                              tls=tls, timeout=timeout)
    outs = [None if a is None else a + b for a, b in zip(res[0][0], res[1][0])]
    return outs, [r[1] for r in res], [max(r[2][i] for r in res) for i in range(len(ops))]


def measure_costs(config: D.DReLUConfig, shape=(1, 16, 33, 33), frac_bits: int = 16,
                  tls: bool = False, timeout: float = 300.0) -> dict:
    """Bytes/rounds per DReLU, ReLU and 3×3 Block-ReLU pixel in one session on one input."""
    x = encode(torch.randn(shape, dtype=torch.float64), frac_bits)
    sizes = [[3, 3]] * shape[1]
    ops = [(D.drelu, {"config": config}), (R.relu, {"config": config}),
           (R.block_relu, {"block_sizes": sizes, "config": config})]
    outs, stats, _ = _run(x, ops, tls, timeout)
    n = x.numel()
    out = {}
    for name, scope, per, analytic in (
            ("drelu", "drelu", n, D.drelu_bytes(n, config)),
            ("relu", "relu", n, R.relu_bytes(n, config)),
            ("block_relu_3x3_pixel", "block_relu", n, R.block_relu_bytes(shape, sizes, config))):
        st = merge_stats(stats, scope)
        if st["bytes"] != analytic:
            raise RuntimeError(f"{name}: measured {st['bytes']} bytes != analytic {analytic}")
        out[name] = {"bytes_per_unit": st["bytes"] / per, "rounds": st["rounds"],
                     "ratio_to_baseline": st["bytes"] / per / BASELINE[name],
                     "elements": per}
    if config.exact:
        if not torch.equal(outs[0], D.plain_drelu(x)) or not torch.equal(outs[1], x.clamp(min=0)):
            raise RuntimeError("exact DReLU/ReLU disagree with plaintext")
    return out


def measure_throughput(config: D.DReLUConfig, n: int, frac_bits: int = 16, tls: bool = False,
                       timeout: float = 600.0) -> dict:
    """DReLUs per second for one batched DReLU of n Gaussian fixed-point activations."""
    x = encode(torch.randn(n, dtype=torch.float64), frac_bits)
    outs, stats, secs = _run(x, [(D.drelu, {"config": config})], tls, timeout)
    wrong = int((outs[0] != D.plain_drelu(x)).sum())
    if config.exact and wrong:
        raise RuntimeError(f"exact DReLU wrong on {wrong} elements")
    st = merge_stats(stats, "drelu")
    return {"n": n, "seconds": secs[0], "drelus_per_s": n / secs[0], "bytes": st["bytes"],
            "rounds": st["rounds"], "wrong_vs_exact": wrong}


def measure_error_rate(config: D.DReLUConfig, n: int = 200_000, frac_bits: int = 16,
                       sigma: float = 1.0) -> dict:
    """Error rate of ``config`` vs the exact sign on N(0, sigma²) activations (in process)."""
    x = encode(torch.randn(n, dtype=torch.float64) * sigma, frac_bits)
    lo, hi = config.valid_range()
    x0, x1 = _share(x)

    def fn(party):
        return D.drelu(party, [x0, x1, party.placeholder((n,))][party.role], config)

    r0, r1, _ = run_in_process(fn, timeout=600)
    wrong = (r0 + r1) != D.plain_drelu(x)
    return {"config": str(config), "n": n, "sigma": sigma, "frac_bits": frac_bits,
            "measured_error_rate": float(wrong.double().mean()),
            "expected_error_rate": float(config.error_probability(x).mean()),
            "max_abs_error_of_relu_real": (1 << config.drop_bits) / 2 ** frac_bits,
            "out_of_range": int(((x < lo) | (x >= hi)).sum()),
            "bytes_per_drelu": D.drelu_bytes(n, config) / n}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                    help="batch sizes (DReLUs) for the throughput runs")
    ap.add_argument("--approx-max-bits", type=int, default=26,
                    help="approximate DReLU: inputs assumed below 2^this in fixed-point units")
    ap.add_argument("--approx-drop-bits", type=int, default=10,
                    help="approximate DReLU: low bits ignored")
    ap.add_argument("--frac-bits", type=int, default=16, help="fixed-point fractional bits")
    ap.add_argument("--error-drop-bits", type=int, nargs="*", default=[0, 6, 10, 14],
                    help="drop-bits values for the error-rate table (with --approx-max-bits)")
    ap.add_argument("--error-samples", type=int, default=200_000)
    ap.add_argument("--tls", action="store_true", help="TLS 1.3 links instead of plaintext TCP")
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    args = ap.parse_args(argv)
    approx = D.DReLUConfig.approximate(args.approx_max_bits, args.approx_drop_bits)
    configs = {"exact": D.EXACT, "approx": approx}
    now = datetime.datetime.now(datetime.timezone.utc)
    results: dict = {"date": now.isoformat(timespec="seconds"),
                     "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
                     "machine": f"{platform.processor() or platform.machine()}, "
                                f"Python {platform.python_version()}, torch {torch.__version__}",
                     "transport": "TLS 1.3 loopback" if args.tls else "plaintext TCP loopback",
                     "omp_threads_per_party": os.environ.get("OMP_NUM_THREADS"),
                     "baseline": BASELINE, "configs": {k: str(v) for k, v in configs.items()},
                     "costs": {}, "throughput": {}, "error_rates": []}
    jobs = [("costs", k) for k in configs] + [("throughput", k, n) for k in configs
                                              for n in args.sizes]
    jobs += [("error", d) for d in args.error_drop_bits]
    for job in tqdm(jobs, desc="benchmark", unit="run"):
        if job[0] == "costs":
            results["costs"][job[1]] = measure_costs(configs[job[1]], frac_bits=args.frac_bits,
                                                     tls=args.tls)
        elif job[0] == "throughput":
            results["throughput"].setdefault(job[1], []).append(
                measure_throughput(configs[job[1]], job[2], args.frac_bits, args.tls))
        else:
            cfg = D.DReLUConfig.approximate(args.approx_max_bits, job[1])
            results["error_rates"].append(measure_error_rate(cfg, args.error_samples,
                                                             args.frac_bits))
    _print_tables(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def _print_tables(res: dict) -> None:
    print(f"\n{res['date']}  {res['machine']}  {res['transport']}")
    print(f"baseline: {res['baseline']['name']}\n")
    print("| protocol | config | bytes/unit | rounds | ratio to baseline |")
    print("|---|---|---|---|---|")
    for cfg, rows in res["costs"].items():
        for name, r in rows.items():
            print(f"| {name} | {res['configs'][cfg]} | {r['bytes_per_unit']:.1f} | {r['rounds']} | "
                  f"{r['ratio_to_baseline']:.3f} |")
    print("\n| config | n | seconds | DReLUs/s | bytes | rounds |")
    print("|---|---|---|---|---|---|")
    for cfg, rows in res["throughput"].items():
        for r in rows:
            print(f"| {res['configs'][cfg]} | {r['n']:,} | {r['seconds']:.2f} | "
                  f"{r['drelus_per_s']:,.0f} | {r['bytes']:,} | {r['rounds']} |")
    print("\n| config | bytes/DReLU | measured error rate | expected | max ReLU error (real) |")
    print("|---|---|---|---|---|")
    for r in res["error_rates"]:
        print(f"| {r['config']} | {r['bytes_per_drelu']:.1f} | {r['measured_error_rate']:.2e} | "
              f"{r['expected_error_rate']:.2e} | {r['max_abs_error_of_relu_real']:.2e} |")


if __name__ == "__main__":
    main()
