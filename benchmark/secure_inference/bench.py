#!/usr/bin/env python
"""Secure inference benchmark: seconds and bytes per image, three processes on loopback TLS.

ResNet18-CIFAR-100 (mmpretrain config, 32x32) with all ReLUs and with a 6% DReLU spec;
optionally ResNet50 at 224x224 (--resnet50). Weights are random: cost does not depend on them.
The 6% spec gives every channel 4x4 patches (6.25% of its ReLUs) and then makes channels of
the largest sites identity until the DReLU count is <= 6% of the all-ReLU count: the same
DReLU budget a knapsack solution at --ratio 0.06 has (its mix of patch sizes differs; the
bytes follow the DReLU count plus 24 bytes per non-identity pixel).

    .venv/bin/python benchmark/secure_inference/bench.py [--crypten] [--resnet50]

Devices (issue 16): --devices cpu cuda runs every case on each device (all three parties on
it) in the same run, --batch-sizes 1 8 32 at each batch size (seconds and bytes are per
image), --prg chacha20 draws the randomness on the device. --throughput-sizes 1e6 1e7 1e8
adds secure DReLU and ReLU throughput per device (three processes, loopback TLS).
--link-mb 256 first measures this machine's loopback bandwidth (raw sockets, and the
project's TLS links, in the three-party ring of benchmark/mpc/bench_links.py) and gives each
row its wire bound: bytes per image over the measured TLS bandwidth of one link, i.e. the time
the bytes alone need, and the share of the measured time that bound is.

Compared with the published reference of the original research code (same model sizes) and,
with --crypten, with CrypTen 0.4.1 on the same machine in the same run: the script creates a
separate virtual environment for it (--crypten-venv; CrypTen is not a project dependency),
which reuses the project's torch through a .pth file and installs CrypTen and its real
dependencies with pinned versions, then runs crypten_resnet18.py (ResNet18-CIFAR-100, all ReLUs).
The comparison interleaves the two sides (ours all ReLUs, ours 6%, CrypTen; --crypten-repeats
times, each run after waiting up to --crypten-quiet seconds for a quiet machine), both at
--crypten-threads torch threads per party process, keeps every run (seconds, CPU, load, other
work's CPU) and reports medians, ranges and the median of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import secure_inference as si  # noqa: E402

PUBLISHED = {  # seconds, GB per image (original research code)
    ("resnet18_cifar100", "all"): (2.86, 0.49), ("resnet18_cifar100", "6%"): (1.51, 0.21),
    ("resnet50_in1k", "all"): (31.6, 6.36), ("resnet50_in1k", "6%"): (5.83, 0.93),
}


def spec_at(model, chw, ratio: float) -> dict:
    sites = si.find_relu_sites(model, chw)
    total = si.total_relus(sites)
    spec = {s.name: np.tile(np.array([[4, 4]], np.int32), (s.channels, 1)) for s in sites}
    count = si.count_drelus(spec, sites)["total"]
    for s in sorted(sites, key=lambda s: -s.height * s.width):
        per = si.block_cost(4, 4, s.height, s.width)
        for c in range(s.channels):
            if count <= ratio * total:
                break
            spec[s.name][c] = (0, 1)
            count -= per
    assert count <= ratio * total
    return spec


CRYPTEN_PINS = ["crypten==0.4.1", "onnx==1.23.2", "protobuf==7.36.2", "ml_dtypes==0.6.0",
                "omegaconf==2.4.0", "antlr4-python3-runtime==4.9.3"]


def crypten_venv(path: Path) -> Path:
    """A virtual environment with CrypTen 0.4.1 that borrows this project's torch/numpy/sklearn
    (its metadata asks for the dead 'sklearn' package and unpinned torch: --no-deps)."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        import site as _site
        Path(site, "secure_inference_project.pth").write_text(_site.getsitepackages()[0] + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *CRYPTEN_PINS],
                       check=True)
    return python


def machine_sample() -> tuple[float, float, float, float]:
    """(time, 1-min load average, busy CPU seconds, steal seconds) of the whole machine
    (/proc/stat counts every process on this kernel, other containers' too): the difference
    over a run, less the run's own CPU, is what other work took from it."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = steal = 0.0
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6)) / tick   # user nice system irq softirq
        steal = (fields[7] if len(fields) > 7 else 0) / tick
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), os.getloadavg()[0], busy, steal


def machine_delta(before: tuple[float, float, float, float], own_cpu_s: float) -> dict:
    """Load before/after and the machine's CPU over a run that used ``own_cpu_s`` itself."""
    after = machine_sample()
    busy = after[2] - before[2]
    return {"load_average_before": before[1], "load_average_after": after[1],
            "machine_busy_cpu_s": busy, "steal_s": after[3] - before[3],
            "other_cpu_s": max(0.0, busy - own_cpu_s), "interval_s": after[0] - before[0]}


def wait_quiet(max_wait_s: float, window_s: float = 2.0, share: float = 0.1) -> dict:
    """Wait (at most ``max_wait_s``) until other work uses under ``share`` of the machine's
    cores over ``window_s``, so that a run does not start inside someone else's burst; this
    process is idle meanwhile. Returns the seconds waited and the busy share last seen."""
    start = time.perf_counter()
    cores = os.cpu_count() or 1
    while True:
        a = machine_sample()
        time.sleep(window_s)
        b = machine_sample()
        busy = (b[2] - a[2]) / ((b[0] - a[0]) * cores)
        waited = time.perf_counter() - start
        if busy < share or waited >= max_wait_s:
            return {"quiet_wait_s": waited, "busy_share_before": busy, "quiet": busy < share}


def run_crypten(python: Path, threads: int = 1) -> dict:
    """One run of crypten_resnet18.py in its own process with ``threads`` OpenMP/torch threads
    per CrypTen process; adds the process's wall and CPU seconds (parties and TTP, imports and
    encryption included) to the JSON it prints."""
    import resource
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([str(python), str(Path(__file__).with_name("crypten_resnet18.py")),
                           "--threads", str(threads)],
                          capture_output=True, text=True, env=env, timeout=1800,
                          cwd=tempfile_dir())
    wall = time.perf_counter() - start
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"CrypTen run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise RuntimeError(f"CrypTen run failed: {out['error']}\n{proc.stderr[-3000:]}")
    out["process_wall_s"] = wall
    out["process_cpu_s"] = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
    return out


def calibrated(model, chw, spec, images: int, drop_budget: float = 0.0) -> dict:
    """``spec`` calibrated on ``images`` Gaussian images (the benchmark's own input
    distribution; the weights are random, so there are no training images): a spec carrying
    per-layer ranges, so every DReLU layer compares only the bits it needs (margin 8)."""
    from secure_inference.mpc.calibrate import calibrate
    gen = torch.Generator().manual_seed(1234)   # public calibration data, not a secret
    return calibrate(model, torch.randn((images,) + chw, generator=gen), spec,
                     drop_budget=drop_budget)


def run_ours_for_crypten(model, chw, spec, threads: int, preprocess: str = "ahead") -> dict:
    """One run of ours as the main loop does it (run_local, CPU, AES, TLS, batch 1) with
    ``threads`` torch threads per party and the ``preprocess`` schedule; the figures the
    CrypTen comparison needs."""
    from secure_inference.mpc.local import run_local
    cpu = time.process_time()
    start = time.perf_counter()
    res = run_local(model, torch.randn((1,) + chw), spec, tls=True, timeout=3600,
                    device="cpu", prg="aes", threads=threads, preprocess=preprocess)
    wall = time.perf_counter() - start
    return {**report_figures(res.report), "run_local_wall_s": wall,
            "bench_process_cpu_s": time.process_time() - cpu, "threads_per_party": threads,
            "preprocess": preprocess}


def report_figures(rep: dict) -> dict:
    """The figures of one run_local report every row of this benchmark records."""
    return {"drelus": rep["online"]["drelus"],
            "cpu_s_all_parties": sum(rep["cpu_seconds"].values()),
            "online_s": rep["per_image"]["online_seconds"],
            "preprocess_s": rep["per_image"]["preprocess_seconds"],
            "preprocess_plus_online_s": rep["per_image"]["seconds_preprocess_and_online"],
            "online_GB": rep["online"]["bytes"] / 1e9,
            "preprocess_GB": rep["preprocess"]["bytes"] / 1e9,
            "setup_GB": rep["setup"]["bytes"] / 1e9, "setup_s": rep["setup"]["wall_s"],
            "rounds": rep["online"]["rounds"]}


def _spread(values: list[float]) -> dict | None:
    """Median, min and max of a list of measurements (None for none: --skip-ours)."""
    if not values:
        return None
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def crypten_comparison(python: Path, repeats: int, threads: int, rows: dict,
                       with_ours: bool, out: Path, quiet_s: float = 0.0,
                       calibration_images: int = 0, schedules: tuple = ("ahead",),
                       drop_budget: float = 0.0) -> None:
    """Ours (ResNet18-CIFAR-100, all ReLUs and 6%) and CrypTen (all ReLUs) interleaved:
    ours, CrypTen, ours, CrypTen, ... ``repeats`` times, both sides at ``threads`` threads
    per party process, so drift in the machine's speed or load hits both alike. Every
    repetition is kept (seconds, CPU, load, threads); medians, ranges and the median of the
    per-pair ratios go into ``rows``. ``quiet_s``: before each run wait up to this long for
    the machine to be quiet (:func:`wait_quiet`; 0: no wait). ``schedules``: the preprocessing
    schedules of ours (``interleaved`` cases are labelled so); ``drop_budget`` > 0 adds an
    all-ReLU case calibrated with dropped low bits (opt-in, :mod:`secure_inference.mpc.dropped_bits`)."""
    from secure_inference.mpc.local import default_threads
    cases = []
    if with_ours:
        model, chw = build("resnet18_cifar100")
        six = spec_at(model, chw, 0.06)
        cases = [("all", None), ("6%", six)]
        if calibration_images:
            cases += [("all calibrated", calibrated(model, chw, None, calibration_images)),
                      ("6% calibrated", calibrated(model, chw, six, calibration_images))]
            if drop_budget > 0:
                cases.append((f"all calibrated drop {drop_budget:g}",
                              calibrated(model, chw, None, calibration_images, drop_budget)))
    cases = [(label + ("" if mode == "ahead" else f" {mode}"), spec, mode)
             for label, spec in cases for mode in schedules]
    reps = []
    for i in range(repeats):
        rep: dict = {"repeat": i + 1, "ours": {}}
        for label, spec, mode in cases:
            quiet = wait_quiet(quiet_s) if quiet_s > 0 else {}
            before = machine_sample()
            r = run_ours_for_crypten(model, chw, spec, threads, mode)
            r.update(machine_delta(before, r["cpu_s_all_parties"] + r["bench_process_cpu_s"]),
                     **quiet)
            rep["ours"][label] = r
        quiet = wait_quiet(quiet_s) if quiet_s > 0 else {}
        before = machine_sample()
        ct = run_crypten(python, threads)
        ct.update(machine_delta(before, ct["process_cpu_s"]), **quiet)
        rep["crypten"] = ct
        reps.append(rep)
        line = "  ".join(f"ours {k} {v['preprocess_plus_online_s']:.2f} s"
                         for k, v in rep["ours"].items())
        print(f"pair {i + 1}/{repeats}: {line}  crypten {ct['seconds']:.2f} s "
              f"(load {ct['load_average_before']:.2f}, other CPU {ct['other_cpu_s']:.1f} s)",
              flush=True)
        out.write_text(json.dumps(dict(rows, **{"crypten comparison": {"repeats": reps}}),
                                  indent=1))
    ct_s = [r["crypten"]["seconds"] for r in reps]
    ct_cpu = [r["crypten"]["cpu_seconds"] for r in reps]
    ct_ttp = [r["crypten"]["ttp_cpu_seconds"] or 0.0 for r in reps]
    first = reps[0]["crypten"]
    loads = [r["crypten"]["load_average_before"] for r in reps] + [
        o["load_average_before"] for r in reps for o in r["ours"].values()]
    summary: dict = {
        "what": "ours and CrypTen interleaved (ours all ReLUs, ours 6%, CrypTen; repeated); "
                "ratios are medians of per-pair ratios",
        "threads_per_party_process": threads, "ours_default_threads": default_threads(),
        "cpu_count": os.cpu_count(), "quiet_wait_max_s": quiet_s,
        "clocks": {"ours": "preprocess_plus_online_s: max over parties of the preprocessing "
                           "plus max over parties of the online phase (input sharing to "
                           "logits revealed); excludes process start, key agreement, TLS "
                           "handshakes and the set-up (weights opened once per session)",
                   "crypten": "seconds: slower party, from after weight and input "
                              "encryption to logits revealed to party 0, TTP triple "
                              "generation in-line; excludes process start, rendezvous, ONNX "
                              "import, encryption; no TLS"},
        "load_average_range": [min(loads), max(loads)],
        "other_cpu_s_during_crypten": _spread([r["crypten"]["other_cpu_s"] for r in reps]),
        "other_cpu_s_during_ours": _spread([o["other_cpu_s"] for r in reps
                                            for o in r["ours"].values()]),
        "crypten_s": _spread(ct_s), "crypten_cpu_s_parties": _spread(ct_cpu),
        "crypten_cpu_s_ttp": _spread(ct_ttp),
        "crypten_process_wall_s": _spread([r["crypten"]["process_wall_s"] for r in reps]),
        "repeats": reps}
    rows["crypten resnet18_cifar100 all"] = {
        "online_s": summary["crypten_s"]["median"], "seconds_min": min(ct_s),
        "seconds_max": max(ct_s), "repeats": len(reps),
        "online_GB": first["bytes"] / 1e9, "rounds": first["rounds"],
        "cpu_s_computing_parties": summary["crypten_cpu_s_parties"]["median"],
        "cpu_s_ttp": summary["crypten_cpu_s_ttp"]["median"],
        "load_average": first["load_average_before"], "threads_per_process": threads,
        "note": "CrypTen 0.4.1, 2 computing parties + TTP process; seconds and CPU are medians "
                "over the repeats of 'crypten comparison'; bytes/rounds from CrypTen's "
                "counters (computing parties; TTP traffic not counted)"}
    print(f"crypten resnet18_cifar100 all: median {np.median(ct_s):.2f} s ({min(ct_s):.2f}-"
          f"{max(ct_s):.2f})  {first['bytes'] / 1e9:.3f} GB  {first['rounds']} rounds",
          flush=True)
    for label, _, _ in cases:
        ours = [r["ours"][label] for r in reps]
        po = [o["preprocess_plus_online_s"] for o in ours]
        summary[f"ours_{label}_s"] = _spread(po)
        summary[f"ours_{label}_online_s"] = _spread([o["online_s"] for o in ours])
        summary[f"ours_{label}_cpu_s"] = _spread([o["cpu_s_all_parties"] for o in ours])
        speed = [c / o for c, o in zip(ct_s, po)]
        online = [c / o["online_s"] for c, o in zip(ct_s, ours)]
        cpu = [o["cpu_s_all_parties"] / c for o, c in zip(ours, ct_cpu)]
        cpu_ttp = [o["cpu_s_all_parties"] / (c + t) for o, c, t in zip(ours, ct_cpu, ct_ttp)]
        key = f"ratios vs crypten (resnet18 {label} vs crypten all ReLUs)"
        rows[key] = {
            "speedup_preprocess_plus_online": float(np.median(speed)),
            "speedup_preprocess_plus_online_range": [min(speed), max(speed)],
            "speedup_online_only": float(np.median(online)),
            "speedup_online_only_range": [min(online), max(online)],
            "bytes_ratio_preprocess_plus_online":
                (ours[0]["online_GB"] + ours[0]["preprocess_GB"]) / (first["bytes"] / 1e9),
            "rounds_ratio": ours[0]["rounds"] / first["rounds"],
            "cpu_ratio": float(np.median(cpu)),
            "cpu_ratio_with_crypten_ttp": float(np.median(cpu_ttp)),
            "ours_preprocess_plus_online_s": _spread(po), "pairs": len(reps),
            "note": "medians of per-pair ratios over the interleaved repeats of "
                    "'crypten comparison'; cpu_ratio: our 3 parties (incl. set-up) over "
                    "CrypTen's 2 computing parties during its clock"}
        print(key, json.dumps({k: v for k, v in rows[key].items() if k != "note"}), flush=True)
    rows["crypten comparison"] = summary
    out.write_text(json.dumps(rows, indent=1))


def measure_links(size_mb: int) -> dict:
    """Loopback bandwidth per link in the three-party ring (benchmark/mpc/bench_links.py, its
    own processes): raw sockets, the project's plaintext and TLS links, in GB/s."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "links.json"
        subprocess.run([sys.executable, str(ROOT / "benchmark" / "mpc" / "bench_links.py"),
                        "--size-mb", str(size_mb), "--repeats", "1", "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def measure_throughput(n: int, device: str, prg: str) -> dict:
    """Secure DReLU and ReLU of n Gaussian fixed-point values on ``device`` (three processes,
    loopback TLS): elements per second of the slowest party, checked against plaintext."""
    import functools
    from secure_inference.mpc.harness import run_local_processes
    from secure_inference.mpc.protocols import drelu as D
    from secure_inference.mpc.protocols import relu as R
    from secure_inference.mpc.ring import encode
    from secure_inference.mpc.stats import merge_stats
    x = encode(torch.randn(n, dtype=torch.float64), 16)
    x0 = torch.randint(-(1 << 63), (1 << 63) - 1, x.shape, dtype=torch.int64)
    cfg = D.DReLUConfig()
    ops = [(D.drelu, {"config": cfg}), (R.relu, {"config": cfg})]
    res = run_local_processes(functools.partial(R.run_on_shares, shares=(x0, x - x0), ops=ops),
                              tls=True, timeout=3600, device=device, prg=prg)
    outs = [a + b for a, b in zip(res[0][0], res[1][0])]
    if not torch.equal(outs[0], D.plain_drelu(x)) or not torch.equal(outs[1], x.clamp(min=0)):
        raise RuntimeError(f"secure DReLU/ReLU on {device} disagree with plaintext")
    secs = [max(r[2][i] for r in res) for i in range(2)]
    stats = [r[1] for r in res]
    return {"n": n, "device": device, "prg": prg,
            "drelu_s": secs[0], "drelus_per_s": n / secs[0],
            "drelu_bytes": merge_stats(stats, "drelu")["bytes"],
            "relu_s": secs[1], "relus_per_s": n / secs[1],
            "relu_bytes": merge_stats(stats, "relu")["bytes"]}


def tempfile_dir() -> str:
    import tempfile
    return tempfile.gettempdir()


def build(name: str):
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import build_task_model
    if name == "resnet18_cifar100":
        cfg = load_task_config(ROOT / "configs/classification/resnet18_cifar100.py")
        return build_task_model(cfg).eval(), (3, 32, 32)
    # the reference ResNet50 pipeline converts max pooling to average pooling before the
    # Block-ReLU finetune (configs/classification/resnet50_in1k_avgpool_finetune.py):
    # a 3x3 max pool at 112x112 alone would cost 1.6M comparisons (DReLUs)
    cfg = load_task_config(ROOT / "configs/classification/resnet50_in1k_avgpool_finetune.py")
    from secure_inference.mmlab.finetune import apply_conversions
    from secure_inference.mmlab.config_utils import conversions_of
    return apply_conversions(build_task_model(cfg), conversions_of(cfg)).eval(), (3, 224, 224)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet50", action="store_true", help="also ResNet50 at 224x224")
    parser.add_argument("--only-resnet50", action="store_true")
    parser.add_argument("--resnet50-specs", nargs="+", default=["6%", "all"],
                        help="which ResNet50 runs (all ReLUs takes long on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--crypten", action="store_true", help="also CrypTen 0.4.1 (own venv)")
    parser.add_argument("--crypten-venv", type=Path, default=Path(tempfile_dir()) / "si-crypten-venv")
    parser.add_argument("--skip-ours", action="store_true", help="only the CrypTen run")
    parser.add_argument("--crypten-repeats", type=int, default=5,
                        help="with --crypten: pairs of runs, ours (ResNet18 all ReLUs and 6%%) "
                             "and CrypTen interleaved; medians and ranges reported")
    parser.add_argument("--crypten-threads", type=int, default=1,
                        help="with --crypten: torch threads per party process on both sides "
                             "(ours: run_local threads; CrypTen: OMP_NUM_THREADS and "
                             "torch.set_num_threads in its parties and TTP)")
    parser.add_argument("--crypten-quiet", type=float, default=30.0,
                        help="with --crypten: before each run wait up to this many seconds "
                             "for other work to use < 10%% of the cores (0: no wait)")
    parser.add_argument("--devices", nargs="+", default=["cpu"],
                        help="run every case on each device (e.g. cpu cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                        help="images per run (seconds and bytes are per image)")
    parser.add_argument("--prg", default="aes", choices=["aes", "chacha20"],
                        help="randomness cipher (chacha20 draws on the GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per party")
    parser.add_argument("--throughput-sizes", type=float, nargs="*", default=[],
                        help="also secure DReLU/ReLU throughput at these sizes (e.g. 1e6 1e8)")
    parser.add_argument("--only-throughput", action="store_true",
                        help="no networks: only --throughput-sizes and --link-mb (needs no "
                             "MMLab packages)")
    parser.add_argument("--widths", nargs="+", default=["64"], choices=["64", "calibrated"],
                        help="comparison widths of every case: 64 (exact 64-bit DReLU "
                             "everywhere) and/or calibrated (each layer's width from a "
                             "calibration on --calibration-images Gaussian images, margin 8); "
                             "both: interleaved per case in the same run")
    parser.add_argument("--calibration-images", type=int, default=32,
                        help="images the calibrated cases are calibrated on")
    parser.add_argument("--preprocess", nargs="+", default=["ahead"],
                        choices=["ahead", "interleaved"],
                        help="preprocessing schedule(s) of ours in the CrypTen comparison "
                             "(both: every case in each, interleaved in the same run)")
    parser.add_argument("--drop-budget", type=float, default=0.0, metavar="B",
                        help="with --widths calibrated and --crypten: also an all-ReLU case "
                             "whose ReLU layers drop low bits within budget B (opt-in "
                             "calibration --drop-budget)")
    parser.add_argument("--emulate", default=None, metavar="NETWORK",
                        help="emulate this network on every link (LAN, WAN-40ms, WAN-80ms or "
                             "MBITS:RTT_MS): check a loopback row's estimate for it against a "
                             "measured run")
    parser.add_argument("--link-mb", type=int, default=0,
                        help="measure loopback bandwidth with this many MB first (0: skip)")
    args = parser.parse_args()
    for device in args.devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            parser.error(f"--devices {device}: this machine has no CUDA device")
    from secure_inference.mpc.local import run_local
    names = [] if args.only_resnet50 or args.skip_ours or args.only_throughput \
        else ["resnet18_cifar100"]
    if (args.resnet50 or args.only_resnet50) and not args.only_throughput:
        names.append("resnet50_in1k")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(args.out.read_text()) if args.out.exists() else {}
    link = None
    if args.link_mb:
        link = measure_links(args.link_mb)
        rows["loopback links"] = link
        print(f"loopback per link: raw {link['raw_GBps']:.3f} GB/s, TLS links "
              f"{link['tls_GBps']:.3f} GB/s", flush=True)
    for size in args.throughput_sizes:
        for device in args.devices:
            t = measure_throughput(int(size), device, args.prg)
            rows[f"throughput {device} {int(size):.0e}"] = t
            print(f"throughput {device:6s} n={int(size):.0e}: DReLU {t['drelus_per_s']:,.0f}/s, "
                  f"ReLU {t['relus_per_s']:,.0f}/s", flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
    for name in names:
        model, chw = build(name)
        total = si.total_relus(si.find_relu_sites(model, chw))
        cases = [("all", None), ("6%", spec_at(model, chw, 0.06))]
        if name == "resnet50_in1k":
            cases = [c for c in reversed(cases) if c[0] in args.resnet50_specs]
        cases = [(label + ("" if w == "64" else " calibrated"),
                  spec if w == "64" else calibrated(model, chw, spec, args.calibration_images))
                 for label, spec in cases for w in args.widths]
        for label, spec, device, batch in [(label, spec, device, batch)
                                           for label, spec in cases for device in args.devices
                                           for batch in args.batch_sizes]:
            default = device == "cpu" and batch == 1 and args.prg == "aes"
            tag = label.strip('%').replace("% ", "_").replace(" ", "_") + (
                "" if default else f"_{device}_b{batch}_{args.prg}")
            x = torch.randn((batch,) + chw)
            load = os.getloadavg()[0]
            start = time.perf_counter()
            res = run_local(model, x, spec, tls=True, timeout=3600, device=device, prg=args.prg,
                            threads=args.threads, network=args.emulate,
                            report_path=args.out.with_name(f"report_{name}_{tag}.json"),
                            plot_path=args.out.with_name(f"bytes_{name}_{tag}.png"))
            wall = time.perf_counter() - start
            rep = res.report
            pub_s, pub_gb = PUBLISHED[(name, label.split()[0])]
            widths = sorted(set(res.program.widths().values()))
            row = {**report_figures(rep), "relus_all": total, "run_local_wall_s": wall,
                   "drelu_widths": widths, "emulated_network": args.emulate,
                   "estimated_s": {k: v["seconds_per_image"] for k, v in rep["networks"].items()
                                   if isinstance(v, dict)},
                   "load_average_before": load,
                   "published_s": pub_s, "published_GB": pub_gb,
                   # ours: preprocessing + online (the published runs generate their
                   # correlated randomness during the inference too)
                   "time_ratio_vs_published":
                       rep["per_image"]["seconds_preprocess_and_online"] / pub_s,
                   "bytes_ratio_vs_published":
                       rep["per_image"]["bytes_preprocess_and_online"] / 1e9 / pub_gb,
                   "device": device, "batch": batch, "prg": args.prg}
            if link is not None:
                # every party sends and receives at once: the busiest link carries at most
                # the bytes of the whole run, so bytes / one link's bandwidth bounds from above
                # the time the wire alone needs; its share of the measured time
                bound = rep["per_image"]["bytes_preprocess_and_online"] / 1e9 / link["tls_GBps"]
                row["wire_bound_s"] = bound
                row["wire_share"] = bound / rep["per_image"]["seconds_preprocess_and_online"]
            rows[f"{name} {label}" + ("" if default else f" {device} b{batch} {args.prg}")
                 + (f" emulated {args.emulate}" if args.emulate else "")] = row
            print(f"{name:18s} {label:15s} bits {widths[0]}-{widths[-1]} {device:6s} b{batch:<3d} DReLUs {row['drelus']:>10,d}  preprocess "
                  f"{row['preprocess_s']:6.2f} s {row['preprocess_GB']:.3f} GB  online "
                  f"{row['online_s']:6.2f} s {row['online_GB']:.3f} GB  (+ setup "
                  f"{row['setup_GB']:.3f} GB)  published {pub_s} s / {pub_gb} GB", flush=True)
            args.out.write_text(json.dumps(rows, indent=1))
    if args.crypten:
        crypten_comparison(crypten_venv(args.crypten_venv), max(1, args.crypten_repeats),
                           max(1, args.crypten_threads), rows, not args.skip_ours, args.out,
                           quiet_s=args.crypten_quiet,
                           calibration_images=args.calibration_images
                           if "calibrated" in args.widths else 0,
                           schedules=tuple(args.preprocess), drop_budget=args.drop_budget)
    print(f"machine: {platform.machine()} {platform.processor()} python {platform.python_version()}"
          f" torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
