"""Secure inference of finished study models next to their plaintext accuracy (issue 14 item 4;
issue 21 item 5: with comparison widths calibrated on training images).

For each chosen method at one budget and seed of a compare_methods.py work dir, runs the
finetuned model under three-party secure inference (three local processes, loopback TCP with
TLS) on --images test images spread evenly over the test set, and writes a table (secure
accuracy, plaintext accuracy on the same images and on all, agreement, the largest logit
difference, MB and s per image).

Calibration (--calibration-images N, default 512; 0: every DReLU at 64 bits): the model, which
already carries its Block-ReLUs, is calibrated on the first N images of the config's
secure_inference.distortion_data (TRAINING images, deterministic pipeline; never a test image)
with secure_inference.mpc.calibrate.calibrate(model, images, None, margin=--margin); the
returned spec carries the ranges and run_local gives every DReLU layer its own comparison
width. MB/img is what that run sent (set-up included); MB@64bit the same run with every DReLU
at 64 bits (exact: the measured bytes plus bytes_saved_by_widths); bits the widths (min-max).

  FMNIST_DATA=work_dirs/data/fashion-mnist python benchmark/accuracy/secure_check.py \\
      --work work_dirs/fmnist_short/bytes --budget 7x7 --seed 0 \\
      --methods knapsack knapsack_bytes --images 1000 --calibration-images 512 \\
      --out benchmark/accuracy/bytes_study/secure_check
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABELS = {"knapsack": "knap", "knapsack_bytes": "knap_bytes"}


def training_images(cfg, model, count: int):
    """The first ``count`` images of the config's distortion data (training images, test
    pipeline) through the model's preprocessor: [N, C, H, W]."""
    import torch

    from secure_inference.mmlab.datasets import build_distortion_dataset, preprocessed_batches
    dataset = build_distortion_dataset(cfg)
    if hasattr(dataset, "test_mode") and dataset.test_mode:
        raise SystemExit("secure_inference.distortion_data is a test split; calibration must "
                         "see training images only")
    if count > len(dataset):
        raise SystemExit(f"--calibration-images {count}: the training data has only "
                         f"{len(dataset)} images")
    return torch.cat([x for x, _ in preprocessed_batches(dataset, model, range(count), 64)]), \
        len(dataset)


def evaluate(config: str, checkpoint: Path, name: str, batches, images: int, threads: int,
             calibration_images: int, margin: float, frac_bits: int = 16,
             drop_budget: float = 0.0):
    """One row (secure_inference.demo.DemoRow) and the per-layer widths of its run."""
    import torch

    from secure_inference import demo
    from secure_inference.mmlab.config_utils import input_shape_from_cfg, load_task_config
    from secure_inference.mmlab.finetune import load_finetuned
    from secure_inference.mpc import run_local
    from secure_inference.mpc.calibrate import calibrate
    from secure_inference.sites import find_relu_sites
    from secure_inference.spec import count_drelus, extract_block_spec

    cfg = load_task_config(config)
    shape = input_shape_from_cfg(cfg)
    model = load_finetuned(cfg, checkpoint)
    logits, labels = demo.plaintext_logits(model, batches)
    counts = count_drelus(extract_block_spec(model, shape), find_relu_sites(model, shape))
    row = demo.DemoRow(budget=name, drelus=counts.pop("total"),
                       plaintext_accuracy=float((logits.argmax(1) == labels).float().mean()),
                       site_drelus=counts)
    extra = {"checkpoint": str(checkpoint), "calibration_images": calibration_images,
             "margin": margin, "frac_bits": frac_bits, "drop_budget": drop_budget}
    spec = None
    if calibration_images > 0:
        cal_x, train_len = training_images(cfg, model, calibration_images)
        t0 = time.perf_counter()
        spec = calibrate(model, cal_x, None, margin=margin, frac_bits=frac_bits,
                         drop_budget=drop_budget)
        extra.update(calibration_seconds=round(time.perf_counter() - t0, 2),
                     training_images_available=train_len,
                     # the calibration's estimate on training images (f fractional bits):
                     # catastrophic local-truncation failures expected per image
                     expected_truncation_failures_per_image=spec.calibration.truncation_failures)
    pick = demo.secure_subset(len(labels), images)
    x = torch.cat([b[0] for b in batches])[pick]
    result = run_local(model, x, spec, tls=True, threads=threads, frac_bits=frac_bits)
    plain = logits[pick]
    secure = demo.score_secure_run(row, result, plain, labels[pick])
    widths = result.program.widths()
    extra["dropped_bits"] = {ly.name: int(ly.attrs["drelu_drop"]) for ly in result.program.layers
                             if "drelu_drop" in ly.attrs}
    diff = (secure - plain).abs().max(1).values
    extra.update(widths=dict(widths), mismatched_images=[int(i) for i in
                                                         pick[secure.argmax(1)
                                                              != plain.argmax(1)]],
                 median_abs_logit_error=float(diff.median()),
                 bytes_saved_per_image=row.bytes_per_image_64bit - row.bytes_per_image)
    return row, extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="compare_methods.py work dir")
    ap.add_argument("--budget", default="7x7", help="budget label (7x7 is nearest to 4%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["knapsack", "uniform"],
                    help="study methods at --budget, or baseline: the all-ReLU model the "
                         "study started from")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--calibration-images", type=int, default=512, metavar="N",
                    help="calibrate the comparison widths on the first N training images "
                         "(default 512; 0: every DReLU at 64 bits)")
    ap.add_argument("--margin", type=float, default=8.0,
                    help="calibration margin: widths hold margin x the largest |input| seen "
                         "(default 8)")
    ap.add_argument("--frac-bits", type=int, default=16,
                    help="fractional bits of the fixed point (default 16; more bits shrink "
                         "the secure run's logit error and make near-zero Block-ReLU "
                         "decisions rarer, at wider comparison widths)")
    ap.add_argument("--drop-budget", type=float, default=0.0, metavar="B",
                    help="opt-in: ReLU layers drop the low bits whose expected error on the "
                         "calibration images is at most B times their output L1 norm "
                         "(secure_inference.mpc.dropped_bits; default 0: exact)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per party")
    ap.add_argument("--out", type=Path, default=HERE / "secure_check")
    args = ap.parse_args(argv)
    if args.calibration_images < 0:
        ap.error("--calibration-images must be >= 0")

    import torch
    torch.set_num_threads(args.threads)
    from secure_inference import demo
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import build_task_model
    from secure_inference.study.runs import path_from_work

    data = json.loads((args.work / "results.json").read_text())
    config = str(path_from_work(args.work, data["settings"]["config"]))
    chosen = []
    for method in args.methods:
        if method == "baseline":   # the all-ReLU model the study finetuned from
            ckpt = path_from_work(args.work, data["settings"]["checkpoint"])
            chosen.append((method, Path(ckpt), {"accuracy": None}))
            continue
        run = data["runs"].get(f"{method}@{args.budget}#seed{args.seed}")
        if run is None:
            print(f"error: {method}@{args.budget}#seed{args.seed} has not finished in "
                  f"{args.work}; rerun the study first", file=sys.stderr)
            return 2
        chosen.append((method, args.work / run["checkpoint"], run))
    cfg = load_task_config(config)
    batches = list(demo.split_inputs(cfg, build_task_model(cfg), "test"))
    rows, extras = [], {}
    for method, ckpt, run in chosen:
        t0 = time.time()
        label = "all ReLUs" if method == "baseline" else \
            f"{LABELS.get(method, method)}@{args.budget}"
        row, extra = evaluate(config, ckpt, label, batches, args.images, args.threads,
                              args.calibration_images, args.margin, args.frac_bits,
                              args.drop_budget)
        extra.update(study_accuracy=run["accuracy"], study_bytes=run.get("bytes"),
                     seconds=round(time.time() - t0, 1))
        rows.append(row)
        extras[label] = extra
        print(f"{method}: {time.time() - t0:.0f} s", flush=True)
    table = demo.format_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.txt").write_text(table + "\n")
    demo.write_results(args.out, rows, {"work": str(args.work), "budget": args.budget,
                                        "seed": args.seed, "images": args.images,
                                        "calibration_images": args.calibration_images,
                                        "margin": args.margin, "frac_bits": args.frac_bits,
                                        "drop_budget": args.drop_budget,
                                        "models": extras})
    return 0


if __name__ == "__main__":
    sys.exit(main())
