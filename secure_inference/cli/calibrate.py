"""Calibrate a finetuned model's comparison widths: the step between finetuning and secure
inference.

Runs calibration images (training images: the ranges it records become public) through the
plaintext model with its Block-ReLU spec, records for every DReLU layer the largest |input| of
its comparisons (ReLU inputs, Block-ReLU patch sums, max-pool differences), checks the
fixed-point headroom at --frac-bits (refuses, with the fix, a model whose activations would
overflow the 64-bit ring), and writes a spec that carries the ranges (--out). Give that spec
to the three parties (--spec): each DReLU layer then compares only the bits its range times
--margin needs (exact inside that range; outside it a decision may be wrong, never a leak).
Prints the width and bytes of every layer. Example:

    si-calibrate --model configs/classification/resnet18_cifar100.py --checkpoint ft.pth \\
        --spec spec.pickle --images train_images.npy --num-images 512 --out spec_calibrated.pickle
    (or: python research/calibrate.py ... with the same flags)

--images: a .npy array [N, C, H, W] of preprocessed floats, or a folder of image files
(normalised with the config's data_preprocessor mean/std, resized to the input shape).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._party import UserError, run_cli


def build_parser() -> argparse.ArgumentParser:
    """The calibration flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--config", dest="model", required=True,
                        help="MMLab config (.py), torchvision model name (arguments after commas: "
                        "resnet18,num_classes=10) or package.module:factory")
    parser.add_argument("--checkpoint", help="the finetuned weights (.pth)")
    parser.add_argument("--spec", help="its Block-ReLU spec (.pickle/.json); omit for all "
                        "ReLUs (a finetuned checkpoint's own spec is used when it records one)")
    parser.add_argument("--images", type=Path, required=True,
                        help="calibration images: .npy [N,C,H,W] or a folder (training images)")
    parser.add_argument("--num-images", type=int, metavar="N",
                        help="use the first N images (default: all)")
    parser.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                        help="image size (default: the config's secure_inference.input_shape)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the calibrated spec to write (.pickle or .json)")
    parser.add_argument("--margin", type=float, default=8.0, metavar="X",
                        help="safety factor over the largest calibration input (default 8 = 3 "
                        "bits); also the headroom the fixed point must leave")
    parser.add_argument("--frac-bits", type=int, default=16,
                        help="fixed point the parties will run (default 16): the widths and the "
                        "headroom check depend on it")
    parser.add_argument("--max-failures", type=float, default=1e-3, metavar="RATE",
                        help="most catastrophic truncation failures per image the calibration "
                        "images may expect (default 0.001: one image in 1,000 with a wrong "
                        "output); above it calibration refuses and names the --frac-bits "
                        "that fits")
    parser.add_argument("--drop-budget", type=float, default=0.0, metavar="FRACTION",
                        help="opt-in, default 0 (every comparison exact within its range): "
                        "each ReLU layer drops the most low bits whose expected output error "
                        "on the calibration images is at most FRACTION of the layer's output "
                        "L1 norm (e.g. 0.01); a dropped bit can only turn a small positive "
                        "input (below 2^(dropped bits - frac-bits)) into 0. Fewer bytes and "
                        "less work per comparison; the number dropped per layer is public")
    parser.add_argument("--batch-size", type=int, default=32, help="images per plaintext batch")
    parser.add_argument("--table", type=Path, help="also write the per-layer table (.json)")
    parser.add_argument("--plot", type=Path, help="write a PNG: bits compared per layer")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv``, calibrate, write the spec (errors propagate; see :func:`main`)."""
    args = build_parser().parse_args(argv)
    if args.num_images is not None and args.num_images < 1:
        raise UserError(f"--num-images must be at least 1, got {args.num_images}")
    if args.margin < 1:
        raise UserError(f"--margin must be at least 1, got {args.margin}")
    if not args.max_failures >= 0:
        raise UserError(f"--max-failures must be at least 0, got {args.max_failures}")
    if not 0 <= args.drop_budget < 1:
        raise UserError(f"--drop-budget must be a fraction in [0, 1), got {args.drop_budget}")
    if args.out.suffix not in (".pickle", ".pkl", ".json"):
        raise UserError(f"--out {args.out}: use a .pickle or .json file name")
    from tqdm import tqdm

    from secure_inference.mpc.calibrate import calibrate_program, width_table
    from secure_inference.mpc.compile import compile_model
    from secure_inference.spec import BlockSpec, extract_block_spec, save_spec

    from ._party import build_model, model_config
    from .client import load_images
    cfg = {"model": args.model, "spec": args.spec, "input_shape": args.input_shape}
    task_cfg = model_config(cfg)    # loaded once: shape, model and normalisation
    model, shape = build_model(cfg, checkpoint=args.checkpoint, task_cfg=task_cfg)
    images = load_images(args.images, cfg, shape, task_cfg)
    if args.num_images is not None:
        images = images[:args.num_images]
    if images.shape[0] == 0:
        raise UserError(f"--images {args.images} holds no images")
    # the model as it stands (the --spec, or a checkpoint's recorded spec), compiled once:
    # the ranges are recorded on it and its width table is printed from it
    program, weights = compile_model(model, (1,) + tuple(shape), drelu_width=64)
    with tqdm(total=int(images.shape[0]), desc="calibration", unit="img",
              file=sys.stderr) as bar:
        cal = calibrate_program(program, weights, images, margin=args.margin,
                                frac_bits=args.frac_bits, batch_size=args.batch_size,
                                progress=bar.update, max_failures=args.max_failures,
                                drop_budget=args.drop_budget)
    save_spec(BlockSpec(extract_block_spec(model, shape), cal), args.out)
    rows = width_table(program, cal, frac_bits=args.frac_bits)
    print_table(rows)
    b64, bw = sum(r["bytes_64"] for r in rows), sum(r["bytes"] for r in rows)
    summary = {"out": str(args.out), "images": cal.images, "margin": cal.margin,
               "frac_bits": cal.frac_bits, "max_activation": cal.max_activation,
               "headroom": cal.headroom,
               "expected_truncation_failures_per_image": cal.truncation_failures,
               "widths": [min(r["width"] for r in rows) if rows else None,
                          max(r["width"] for r in rows) if rows else None],
               "drop_budget": cal.drop_budget,
               "dropped_bits": [min(r["dropped_bits"] for r in rows) if rows else None,
                                max(r["dropped_bits"] for r in rows) if rows else None],
               "nonlinear_MB_per_image_64bit": b64 / 1e6,
               "nonlinear_MB_per_image_calibrated": bw / 1e6}
    print(json.dumps(summary, indent=1))
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(json.dumps({"summary": summary, "layers": rows}, indent=1))
    if args.plot is not None:
        plot_widths(rows, args.plot)
    return 0


def print_table(rows: list[dict]) -> None:
    """The per-layer widths as a text table on stdout."""
    print(f"{'layer':40s} {'op':10s} {'DReLUs':>8s} {'range':>10s} {'bits':>4s} "
          f"{'drop':>4s} {'kB@64':>9s} {'kB':>9s}")
    for r in rows:
        rng = "-" if r["range"] is None else f"{r['range']:.4g}"
        print(f"{r['layer'][:40]:40s} {r['op']:10s} {r['drelus']:8d} {rng:>10s} "
              f"{r['width']:4d} {r['dropped_bits']:4d} {r['bytes_64'] / 1e3:9.1f} "
              f"{r['bytes'] / 1e3:9.1f}")


def plot_widths(rows: list[dict], path: Path) -> Path:
    """A PNG: bits compared per DReLU layer, with the bytes saved per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True,
                                   figsize=(max(6.0, 0.2 * len(rows) + 2), 6))
    xs = list(range(len(rows)))
    compared = [r["width"] - r["dropped_bits"] for r in rows]
    ax1.bar(xs, compared, color="tab:blue", label="compared")
    if any(r["dropped_bits"] for r in rows):
        ax1.bar(xs, [r["dropped_bits"] for r in rows], bottom=compared, color="lightblue",
                label="dropped (--drop-budget)")
        ax1.legend()
    ax1.axhline(64, color="grey", linestyle="--", linewidth=0.8)
    ax1.set_ylabel("bits")
    ax1.set_title("calibrated comparison width per DReLU layer (dashed: 64-bit)")
    ax2.bar(xs, [r["bytes_64"] / 1e6 for r in rows], color="lightgrey", label="64-bit")
    ax2.bar(xs, [r["bytes"] / 1e6 for r in rows], color="tab:orange", label="calibrated")
    ax2.set_ylabel("MB per image (online)")
    ax2.legend()
    ax2.set_xticks(xs)
    ax2.set_xticklabels([r["layer"] for r in rows], rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """The command line: user errors are one line on stderr and exit status 1."""
    return run_cli(run, "calibrate", argv)


if __name__ == "__main__":
    sys.exit(main())
