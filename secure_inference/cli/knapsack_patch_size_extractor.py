"""Choose a Block-ReLU patch size for every channel under a DReLU or byte budget (exact knapsack).

Reads a collected distortion folder (meta.json + one .npz per site, written by the distortion
step), solves the multiple-choice knapsack "one candidate size per channel, total cost <=
budget, least summed distortion" exactly, and writes the block spec pickle for finetuning and
secure inference.

What the budget counts (--cost):
  drelus (default): DReLUs per image. --ratio r gives floor(r × all-ReLU DReLU count of the
          recorded sites at the recorded input size); --max_cost M gives M DReLUs.
  bytes:  bytes per image that the secure runtime sends for the recorded sites. Every option of
          every channel is priced by the exact bytes of its DReLUs at the site's comparison
          width plus 24 bytes per multiplied pixel (identity channels are free); --ratio r gives
          floor(r × all-ReLU bytes at the same widths), --max-bytes B gives B bytes per image
          (--max-bytes alone implies --cost bytes). The per-channel price leaves out the
          rounding of the DReLU's packing (< 10 bytes per site), so the budget is solved less
          9.6 bytes per site and the chosen spec's exact bytes (reported) never exceed it.
  Widths that price the bytes: --drelu-width N for every site (default 64, the runtime's
  exact DReLU; 27 matches `--drelu-bits 27`), or --calibration SPEC_FILE, a spec calibrated by
  si-calibrate, whose recorded ranges give each site its compiled width at --frac-bits and
  --margin (sites it does not list: 64). A calibration is of the spec it was recorded with:
  recalibrate the chosen spec before running it. Both costs report DReLUs and bytes.
Several ratios (or costs) write one spec each.

Outputs, for OUT = --block_size_spec_file_name:
  one budget:      OUT                                  (e.g. specs/r18.pickle)
  several budgets: <OUT stem>_<ratio><OUT suffix>       (e.g. specs/r18_0.06.pickle)
                   or <OUT stem>_cost<M><OUT suffix> for --max_cost,
                   <OUT stem>_bytes<B><OUT suffix> for --max-bytes
  next to each spec: <spec stem>.sites.csv, <spec stem>.sites.md (per-site table: DReLUs and
  bytes before/after, width, identity share, most common sizes) and a plot,
  <spec stem>.drelus.png (--cost drelus) or <spec stem>.bytes.png (--cost bytes).
  Existing output files are not overwritten without --force (checked before solving).

Examples:
  python research/knapsack_patch_size_extractor.py --model resnet18 \\
      --channel_distortion_path work_dirs/dist_r18 --ratio 0.03 0.06 0.09 \\
      --block_size_spec_file_name specs/r18.pickle
  python research/knapsack_patch_size_extractor.py --channel_distortion_path work_dirs/dist_r18 \\
      --cost bytes --ratio 0.1 --drelu-width 27 --block_size_spec_file_name specs/r18_b.pickle
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def spec_paths(out: Path, labels: list[str]) -> list[Path]:
    """OUT for one budget, <stem>_<label><suffix> for several."""
    if len(labels) == 1:
        return [out]
    suffix = out.suffix or ".pickle"
    return [out.with_name(f"{out.stem}_{lab}{suffix}") for lab in labels]


def plot_file(spec_path: Path, cost: str = "drelus") -> Path:
    """The plot next to a spec: <stem>.drelus.png, or <stem>.bytes.png for ``cost="bytes"``."""
    return Path(f"{spec_path.with_suffix('')}.{cost}.png")


def output_files(spec_path: Path, plot: bool, cost: str = "drelus") -> list[Path]:
    """Every file one budget writes: the spec, its site tables and (with ``plot``) the plot."""
    stem = spec_path.with_suffix("")
    files = [spec_path, Path(f"{stem}.sites.csv"), Path(f"{stem}.sites.md")]
    return (files + [plot_file(spec_path, cost)]) if plot else files


def refuse_overwrite(paths: list[Path], plot: bool, cost: str = "drelus") -> None:
    """Raise FileExistsError naming the output files that already exist (nothing is written)."""
    existing = [f for path in paths for f in output_files(path, plot, cost) if f.exists()]
    if existing:
        shown = ", ".join(str(f) for f in existing[:6]) + (", ..." if len(existing) > 6 else "")
        raise FileExistsError(f"{shown} already exist{'s' if len(existing) == 1 else ''}; pass "
                              "--force to overwrite, or choose another "
                              "--block_size_spec_file_name")


def _byte_count(text: str) -> int:
    """A whole, non-negative number of bytes (``2000000``, ``2e6``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if not value.is_integer() or value < 0:
        raise argparse.ArgumentTypeError(f"a byte budget must be a whole number >= 0, got {text}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The knapsack step's flags."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channel_distortion_path", "--channel-distortion-path", required=True,
                    type=Path, help="collected distortion folder (meta.json + <site>.npz)")
    ap.add_argument("--cost", choices=["drelus", "bytes"], default=None,
                    help="what the budget counts: DReLUs per image (default), or the exact "
                         "bytes per image the secure runtime sends for these sites (default "
                         "with --max-bytes)")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, nargs="+",
                        help="budget(s) as a share in (0, 1] of the all-ReLU DReLU count "
                             "(--cost bytes: of the all-ReLU bytes at the same widths)")
    budget.add_argument("--max_cost", "--max-cost", type=int, nargs="+",
                        help="budget(s) as absolute DReLU counts per image (--cost drelus)")
    budget.add_argument("--max_bytes", "--max-bytes", type=_byte_count, nargs="+",
                        help="budget(s) as bytes per image on the wire, e.g. 2e6 "
                             "(--cost bytes)")
    widths = ap.add_mutually_exclusive_group()
    widths.add_argument("--drelu_width", "--drelu-width", type=int, default=64, metavar="BITS",
                        help="comparison width in bits (3..64) of every site's DReLUs, for the "
                             "bytes (default 64: the runtime's exact DReLU)")
    widths.add_argument("--calibration", type=Path, metavar="SPEC_FILE",
                        help="a spec calibrated by si-calibrate: each site's bytes at the width "
                             "its calibrated range gives (64 for sites it does not list)")
    ap.add_argument("--frac_bits", "--frac-bits", type=int, default=16,
                    help="fixed-point fractional bits the calibrated widths are computed for "
                         "(default 16, the runtime's default)")
    ap.add_argument("--margin", type=float, default=None,
                    help="safety factor over the calibrated ranges (default: the "
                         "calibration's own)")
    ap.add_argument("--block_size_spec_file_name", "--block-size-spec-file-name", required=True,
                    type=Path, help="output spec pickle (.pickle/.pkl; .json writes JSON); "
                                    "several budgets add _<ratio>, _cost<M> or _bytes<B> before "
                                    "the suffix")
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--config", help="MMLab config (.py) of the model: check that the "
                                        "recorded sites are exactly the model's sites")
    model.add_argument("--model", help="torchvision name or package.module:factory of the "
                                       "model, for the same check")
    ap.add_argument("--no_plot", "--no-plot", action="store_true", help="skip the PNG plot")
    ap.add_argument("--force", action="store_true",
                    help="overwrite existing output files (spec, .sites.csv/.md, plot); "
                         "without it an existing one stops the run before anything is written")
    return ap


def check_model(args: argparse.Namespace, meta: dict, results: dict) -> str:
    """Build the model named by --config/--model and check the recorded sites against it."""
    from secure_inference import find_relu_sites
    from secure_inference.distortion.store import DistortionFileError
    from secure_inference.knapsack import check_against_sites
    from secure_inference.models import input_shape_of, load_model

    target = args.config or args.model
    shape = tuple(int(s) for s in meta["input_shape"])
    try:
        cfg_shape = input_shape_of(args.config, default=shape) if args.config else shape
        model = load_model(target)
    except Exception as e:  # config/registry/import problems: report, do not dump a traceback
        raise ValueError(f"could not build the model from {target}: {type(e).__name__}: {e}") \
            from None
    if tuple(cfg_shape) != shape[-3:]:
        raise DistortionFileError(f"the distortion was recorded at input {list(shape)} but "
                                  f"{args.config} declares input_shape {list(cfg_shape)}")
    check_against_sites(results, find_relu_sites(model, shape))
    return target


def resolve_cost(args: argparse.Namespace) -> str:
    """The cost the budget counts: --cost, else bytes with --max-bytes, else DReLUs; raises
    ValueError for a budget flag of the other cost."""
    cost = args.cost or ("bytes" if args.max_bytes is not None else "drelus")
    if cost == "bytes" and args.max_cost is not None:
        raise ValueError("--max_cost counts DReLUs; with --cost bytes give --max-bytes "
                         "(bytes per image) or --ratio")
    if cost == "drelus" and args.max_bytes is not None:
        raise ValueError("--max-bytes needs --cost bytes (or leave --cost out)")
    return cost


def pricing_widths(args: argparse.Namespace, results: dict) -> tuple[dict[str, int], str]:
    """Each site's comparison width for the bytes, and a line saying where it came from."""
    from secure_inference.knapsack import site_widths
    from secure_inference.spec import load_spec

    if args.calibration is None:
        if args.margin is not None:
            raise ValueError("--margin applies to --calibration widths; give a calibrated spec")
        widths = site_widths(results, drelu_width=args.drelu_width)
        return widths, f"bytes priced at a {args.drelu_width}-bit comparison for every site"
    calibration = load_spec(args.calibration).calibration
    if calibration is None:
        raise ValueError(f"{args.calibration} carries no calibration; calibrate it with "
                         "si-calibrate first (or use --drelu-width)")
    widths = site_widths(results, calibration=calibration, frac_bits=args.frac_bits,
                         margin=args.margin)
    listed = sum(1 for n in results if n in calibration.ranges)
    if listed == 0:
        raise ValueError(f"{args.calibration}: its calibration lists none of the {len(results)} "
                         f"sites (e.g. {next(iter(results))!r}); it is of another model")
    shown = sorted(set(widths.values()))
    return widths, (f"bytes priced at the widths of {args.calibration} ({listed} of "
                    f"{len(results)} sites calibrated, widths {shown[0]}..{shown[-1]} bits at "
                    f"{args.frac_bits} fractional bits)")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, solve every budget and write the specs; 0 on success, 2 on an error."""
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    import secure_inference as si
    from secure_inference.distortion.store import DistortionFileError, load_results
    from secure_inference.knapsack import (InfeasibleBudgetError, all_relu_bytes,
                                           all_relu_count, budget_from_ratio,
                                           check_distortion_results, knapsack_block_spec,
                                           plot_site_bytes, plot_site_drelus, site_table,
                                           site_table_csv, site_table_markdown, solve_mckp)
    from secure_inference.widths import CalibrationError
    try:
        cost = resolve_cost(args)
        meta, results = load_results(args.channel_distortion_path)
        check_distortion_results(results)
        widths, width_note = pricing_widths(args, results)
        total = all_relu_count(results)
        total_bytes = all_relu_bytes(results, widths)
        unit = "DReLUs" if cost == "drelus" else "bytes"
        full = total if cost == "drelus" else total_bytes
        if args.ratio is not None:
            budgets = [budget_from_ratio(r, full, f"{unit} per image") for r in args.ratio]
            labels = [f"{r:g}" for r in args.ratio]
        elif args.max_cost is not None:
            if any(m < 0 for m in args.max_cost):
                raise ValueError(f"--max_cost must be >= 0, got {args.max_cost}")
            budgets, labels = list(args.max_cost), [f"cost{m}" for m in args.max_cost]
        else:
            budgets, labels = list(args.max_bytes), [f"bytes{b}" for b in args.max_bytes]
        if args.config or args.model:
            target = check_model(args, meta, results)
            print(f"checked {len(results)} sites against {target}")
        else:
            print("note: no --config/--model given; the sites are not checked against a model")
        paths = spec_paths(args.block_size_spec_file_name, labels)
        if not args.force:
            refuse_overwrite(paths, plot=not args.no_plot, cost=cost)
    except (DistortionFileError, CalibrationError, si.SpecError, ValueError, FileExistsError,
            OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels = sum(r.channels for r in results.values())
    print(f"{args.channel_distortion_path}: {len(results)} sites, {channels:,} channels, "
          f"all-ReLU DReLUs {total:,}, all-ReLU bytes {total_bytes:,} per image at input "
          f"{meta.get('input_shape')}")
    print(f"{width_note}; budgets count {unit} per image")
    # load/compile the numba kernels outside the timings (a binding budget runs both)
    solve_mckp([[0, 1], [0, 1]], [[1.0, 0.0], [1.0, 0.0]], 1)
    status = 0
    for budget, label, path in tqdm(list(zip(budgets, labels, paths)), desc="budgets",
                                    disable=len(budgets) < 2, leave=False):
        try:
            sol = knapsack_block_spec(results, budget, cost=cost, widths=widths)
        except InfeasibleBudgetError as e:
            tqdm.write(f"error: budget {label} ({budget:,} {unit}): {e}", file=sys.stderr)
            status = 2
            continue
        res = sol.result
        si.save_spec(sol.spec, path)
        rows = site_table(results, sol.spec, widths=widths)
        stem = path.with_suffix("")
        Path(f"{stem}.sites.csv").write_text(site_table_csv(rows))
        Path(f"{stem}.sites.md").write_text(site_table_markdown(rows))
        used = sol.drelus if cost == "drelus" else sol.bytes
        share = f"{100 * used / max(full, 1):.2f}% of all-ReLU"
        if not args.no_plot:
            title = (f"{args.channel_distortion_path.name}: {used:,} / {budget:,} {unit} "
                     f"({share})")
            plot = plot_site_drelus if cost == "drelus" else plot_site_bytes
            plot(rows, plot_file(path, cost), title)
        optimal = "optimal" if res.optimal else "NOT proven optimal"
        if cost == "drelus":
            amount = (f"DReLUs {sol.drelus:,} / {budget:,} ({100 * used / max(full, 1):.3f}% of "
                      f"{full:,}), bytes {sol.bytes:,}")
        else:
            amount = (f"bytes {sol.bytes:,} / {budget:,} ({100 * used / max(full, 1):.3f}% of "
                      f"{full:,}), DReLUs {sol.drelus:,}")
        tqdm.write(f"budget {label}: {amount} per image, total distortion "
                   f"{res.total_distortion:.6g}, gap {res.gap:.2g} ({optimal}), "
                   f"{sol.seconds:.2f} s -> {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
