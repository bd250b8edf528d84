"""The whole pipeline end to end on a small real data set (``make demo``).

Stages (each skips work already done when rerun; delete a stage's folder to redo it):

1. data       scikit-learn's bundled handwritten digits written as 16×16 PNGs (train/val/test)
2. baseline   a narrow ResNet18 (CIFAR variant) trained with mmlab_tools/dist_train.sh, 2 CPU
              processes (or reuse --checkpoint)
3. distortion research/extract_block_sizes.py on training images
4. knapsack   research/knapsack_patch_size_extractor.py for every --budgets ratio, plus the
              uniform Block-ReLU (--uniform-size) and the knapsack at exactly its DReLU count
5. finetune   mmlab_tools/dist_train.sh with each spec, from the baseline
6. evaluate   plaintext accuracy on the held-out test images, then (after calibrating each
              model's comparison widths on training images) secure inference with all
              three parties as separate processes over loopback TCP with TLS
7. report     one table (printed), results.json and two plots in the output folder

Point the same flow at your own task with --config/--finetune-config/--checkpoint (an MMLab
classification config with a `secure_inference` entry, see configs/) and --device cuda.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo" / "digits_resnet18.py"
DEMO_FINETUNE = REPO / "configs" / "demo" / "digits_resnet18_brelu_finetune.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="task config (baseline training)")
    p.add_argument("--finetune-config", default=str(DEMO_FINETUNE),
                   help="config for the Block-ReLU finetune")
    p.add_argument("--checkpoint", default=None,
                   help="trained baseline checkpoint; skips baseline training")
    p.add_argument("--data-root", default=None,
                   help="data folder of your own task (default: the demo writes the digits)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.10, 0.20],
                   help="DReLU budgets as shares of the all-ReLU count")
    p.add_argument("--uniform-size", default="4x4",
                   help="also finetune the uniform Block-ReLU with this patch size HxW and the "
                        "knapsack at exactly its DReLU count, so the table compares the two at "
                        "one budget ('none' to skip; default 4x4)")
    p.add_argument("--num-samples", type=int, default=64,
                   help="training images averaged over by the distortion step")
    p.add_argument("--method", default="linear", choices=["exact", "linear"],
                   help="distortion method (default linear: on 2 CPU cores the exact method "
                        "needs tens of minutes even for this small network)")
    p.add_argument("--secure-images", type=int, default=100,
                   help="held-out images run through secure inference per model")
    p.add_argument("--nproc", type=int, default=2, help="training processes (CPU or GPUs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--frac-bits", type=int, default=None, help="fixed-point fractional bits")
    p.add_argument("--calibration-images", type=int, default=256,
                   help="training images each model is calibrated on before secure inference "
                        "(per-layer comparison widths; 0: every DReLU at 64 bits)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], env: dict, logfile: Path) -> None:
    """Run a pipeline CLI; its output goes to ``logfile`` (tail shown on failure)."""
    log("$ " + " ".join(shlex.quote(c) for c in cmd) + f"   (log: {logfile})")
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = logfile.read_text().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"demo: stage failed (exit {proc.returncode}); full log: {logfile}")


def free_port() -> int:
    """A free TCP port for torchrun's rendezvous (parallel runs must not collide)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_checkpoint(work_dir: Path) -> Path | None:
    last = work_dir / "last_checkpoint"
    if last.is_file():
        path = Path(last.read_text().strip())
        if path.is_file():
            return path
    ckpts = sorted(work_dir.glob("epoch_*.pth"), key=lambda p: p.stat().st_mtime)
    return ckpts[-1] if ckpts else None


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, PYTHON=py, PORT=str(free_port()))

    from secure_inference import demo

    # 1. data
    data_root = Path(args.data_root).resolve() if args.data_root else out / "data"
    if args.data_root is None:
        counts = demo.write_digits_dataset(data_root)
        log(f"data: scikit-learn digits at 16x16 in {data_root} ({counts})")
    env["DEMO_DATA"] = str(data_root)

    # 2. baseline
    base_dir = out / "baseline"
    base_ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(base_dir)
    if base_ckpt is None:
        log("baseline: training (mmlab_tools/dist_train.sh, "
            f"{args.nproc} {'GPU' if args.device == 'cuda' else 'CPU'} processes)")
        run(["bash", "mmlab_tools/dist_train.sh", args.config, str(args.nproc),
             "--work-dir", str(base_dir)], env, base_dir / "train.log")
        base_ckpt = latest_checkpoint(base_dir)
    log(f"baseline checkpoint: {base_ckpt}")

    # 3. distortion
    dist_dir = out / "distortion"
    if not (dist_dir / "meta.json").is_file():
        run([py, "research/extract_block_sizes.py", "--config", args.config,
             "--checkpoint", str(base_ckpt), "--output_path", str(dist_dir),
             "--num_samples", str(args.num_samples), "--method", args.method,
             "--device", args.device, "--no-progress"], env, out / "logs" / "distortion.log")
    log(f"distortion: {dist_dir}")

    # 4. knapsack
    spec_dir = out / "specs"
    spec_paths = {r: spec_dir / f"spec_{r:g}.pickle" for r in args.budgets}
    if not all(p.is_file() for p in spec_paths.values()):
        for r, p in spec_paths.items():
            run([py, "research/knapsack_patch_size_extractor.py", "--config", args.config,
                 "--channel_distortion_path", str(dist_dir), "--ratio", str(r),
                 "--block_size_spec_file_name", str(p)], env,
                out / "logs" / f"knapsack_{r:g}.log")
    # the uniform Block-ReLU and the knapsack at its DReLU count: the same budget, two methods
    compare: dict[str, tuple[str, Path]] = {}
    if args.uniform_size.lower() != "none":
        h, _, w = args.uniform_size.lower().partition("x")
        size = (int(h), int(w))
        tag = f"{size[0]}x{size[1]}"
        uni, knap = spec_dir / f"uniform_{tag}.pickle", spec_dir / f"knapsack_at_{tag}.pickle"
        count = demo.write_uniform_spec(args.config, size, uni)
        if not knap.is_file():
            run([py, "research/knapsack_patch_size_extractor.py", "--config", args.config,
                 "--channel_distortion_path", str(dist_dir), "--max_cost", str(count),
                 "--block_size_spec_file_name", str(knap)], env,
                out / "logs" / f"knapsack_at_{tag}.log")
        compare = {f"uniform {tag}": (f"uniform_{tag}", uni),
                   f"knap@{tag}": (f"knapsack_at_{tag}", knap)}
        log(f"uniform {tag}: {count:,} DReLUs per image; knapsack solved at the same count")
    log(f"knapsack: {len(spec_paths) + len(compare)} specs in {spec_dir}")

    # 5. finetune
    finetuned = {}
    jobs = [(f"{100 * r:g}%", f"{r:g}", spec) for r, spec in spec_paths.items()]
    jobs += [(name, slug, spec) for name, (slug, spec) in compare.items()]
    for name, slug, spec in jobs:
        work = out / f"finetune_{slug}"
        ckpt = latest_checkpoint(work)
        if ckpt is None:
            run(["bash", "mmlab_tools/dist_train.sh", args.finetune_config, str(args.nproc),
                 "--work-dir", str(work), "--relu-spec-file", str(spec),
                 "--load-from", str(base_ckpt)], env, work / "train.log")
            ckpt = latest_checkpoint(work)
        finetuned[name] = ckpt
    log("finetune: " + ", ".join(f"{n} -> {p.name}" for n, p in finetuned.items()))

    # 6. evaluate: plaintext on every test image, secure inference on an evenly spread subset
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import build_task_model
    os.environ["DEMO_DATA"] = env["DEMO_DATA"]
    cfg = load_task_config(args.config)
    batches = list(demo.split_inputs(cfg, build_task_model(cfg), "test"))
    n_test = sum(len(b[1]) for b in batches)
    secure_options = {"tls": True}
    if args.frac_bits is not None:
        secure_options["frac_bits"] = args.frac_bits
    calibration = None
    if args.calibration_images > 0:
        import torch
        calibration = torch.cat([x for x, _ in demo.split_inputs(
            cfg, build_task_model(cfg), "train", limit=args.calibration_images)])
    rows = []
    for name, config, ckpt in [("all ReLUs", args.config, base_ckpt)] + [
            (n, args.finetune_config, c) for n, c in finetuned.items()]:
        log(f"evaluate {name}: plaintext on {n_test} test images, secure inference on "
            f"{min(args.secure_images, n_test)} (3 processes, loopback TLS"
            + (f", widths calibrated on {len(calibration)} training images)"
               if calibration is not None else ", 64-bit DReLUs)"))
        rows.append(demo.evaluate_model(config, ckpt, name, batches, args.secure_images,
                                        secure_options, calibration))

    # 7. report
    table = demo.format_table(rows)
    print("\n" + table + "\n", flush=True)
    (out / "results.txt").write_text(table + "\n")
    demo.write_results(out, rows, {"budgets": args.budgets, "uniform_size": args.uniform_size,
                                   "config": args.config,
                                   "finetune_config": args.finetune_config,
                                   "seconds_total": round(time.time() - t_start, 1)})
    plots = demo.plot_results(out, rows)
    log(f"done in {time.time() - t_start:.0f} s; results in {out}: results.txt, results.json, "
        + ", ".join(p.name for p in plots))


if __name__ == "__main__":
    main()
