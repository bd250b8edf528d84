"""Choose a Block-ReLU patch size for every channel under a DReLU budget (exact knapsack).

Reads a collected distortion folder (meta.json + one .npz per site, written by the distortion
step), solves the multiple-choice knapsack "one candidate size per channel, total DReLUs <=
budget, least summed distortion" exactly, and writes the block spec pickle for finetuning and
secure inference.

Budget: --ratio r gives floor(r × all-ReLU DReLU count of the recorded sites at the recorded
input size); --max_cost M gives M DReLUs. Several ratios (or costs) write one spec each.

Outputs, for OUT = --block_size_spec_file_name:
  one budget:      OUT                                  (e.g. specs/r18.pickle)
  several budgets: <OUT stem>_<ratio><OUT suffix>       (e.g. specs/r18_0.06.pickle)
                   or <OUT stem>_cost<M><OUT suffix> for --max_cost
  next to each spec: <spec stem>.sites.csv, <spec stem>.sites.md (per-site table: DReLUs
  before/after, identity share, most common sizes) and <spec stem>.drelus.png (plot).
  Existing output files are not overwritten without --force (checked before solving).

Example:
  python research/knapsack_patch_size_extractor.py --model resnet18 \\
      --channel_distortion_path work_dirs/dist_r18 --ratio 0.03 0.06 0.09 \\
      --block_size_spec_file_name specs/r18.pickle
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


def output_files(spec_path: Path, plot: bool) -> list[Path]:
    """Every file one budget writes: the spec, its site tables and (with ``plot``) the plot."""
    stem = spec_path.with_suffix("")
    files = [spec_path, Path(f"{stem}.sites.csv"), Path(f"{stem}.sites.md")]
    return (files + [Path(f"{stem}.drelus.png")]) if plot else files


def refuse_overwrite(paths: list[Path], plot: bool) -> None:
    """Raise FileExistsError naming the output files that already exist (nothing is written)."""
    existing = [f for path in paths for f in output_files(path, plot) if f.exists()]
    if existing:
        shown = ", ".join(str(f) for f in existing[:6]) + (", ..." if len(existing) > 6 else "")
        raise FileExistsError(f"{shown} already exist{'s' if len(existing) == 1 else ''}; pass "
                              "--force to overwrite, or choose another "
                              "--block_size_spec_file_name")


def build_parser() -> argparse.ArgumentParser:
    """The knapsack step's flags."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channel_distortion_path", "--channel-distortion-path", required=True,
                    type=Path, help="collected distortion folder (meta.json + <site>.npz)")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=float, nargs="+",
                        help="budget(s) as a share in (0, 1] of the all-ReLU DReLU count")
    budget.add_argument("--max_cost", "--max-cost", type=int, nargs="+",
                        help="budget(s) as absolute DReLU counts per image")
    ap.add_argument("--block_size_spec_file_name", "--block-size-spec-file-name", required=True,
                    type=Path, help="output spec pickle (.pickle/.pkl; .json writes JSON); "
                                    "several budgets add _<ratio> or _cost<M> before the suffix")
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


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, solve every budget and write the specs; 0 on success, 2 on an error."""
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    import secure_inference as si
    from secure_inference.distortion.store import DistortionFileError, load_results
    from secure_inference.knapsack import (InfeasibleBudgetError, all_relu_count,
                                           budget_from_ratio, check_distortion_results,
                                           knapsack_block_spec, plot_site_drelus, site_table,
                                           site_table_csv, site_table_markdown, solve_mckp)
    try:
        meta, results = load_results(args.channel_distortion_path)
        check_distortion_results(results)
        total = all_relu_count(results)
        if args.ratio is not None:
            budgets = [budget_from_ratio(r, total) for r in args.ratio]
            labels = [f"{r:g}" for r in args.ratio]
        else:
            if any(m < 0 for m in args.max_cost):
                raise ValueError(f"--max_cost must be >= 0, got {args.max_cost}")
            budgets, labels = list(args.max_cost), [f"cost{m}" for m in args.max_cost]
        if args.config or args.model:
            target = check_model(args, meta, results)
            print(f"checked {len(results)} sites against {target}")
        else:
            print("note: no --config/--model given; the sites are not checked against a model")
        paths = spec_paths(args.block_size_spec_file_name, labels)
        if not args.force:
            refuse_overwrite(paths, plot=not args.no_plot)
    except (DistortionFileError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels = sum(r.channels for r in results.values())
    print(f"{args.channel_distortion_path}: {len(results)} sites, {channels:,} channels, "
          f"all-ReLU DReLUs {total:,} at input {meta.get('input_shape')}")
    # load/compile the numba kernels outside the timings (a binding budget runs both)
    solve_mckp([[0, 1], [0, 1]], [[1.0, 0.0], [1.0, 0.0]], 1)
    status = 0
    for budget, label, path in tqdm(list(zip(budgets, labels, paths)), desc="budgets",
                                    disable=len(budgets) < 2, leave=False):
        try:
            sol = knapsack_block_spec(results, budget)
        except InfeasibleBudgetError as e:
            tqdm.write(f"error: budget {label} ({budget:,} DReLUs): {e}", file=sys.stderr)
            status = 2
            continue
        res = sol.result
        si.save_spec(sol.spec, path)
        rows = site_table(results, sol.spec)
        stem = path.with_suffix("")
        Path(f"{stem}.sites.csv").write_text(site_table_csv(rows))
        Path(f"{stem}.sites.md").write_text(site_table_markdown(rows))
        title = (f"{args.channel_distortion_path.name}: {res.total_cost:,} / {budget:,} DReLUs "
                 f"({100 * res.total_cost / max(total, 1):.2f}% of all-ReLU)")
        if not args.no_plot:
            plot_site_drelus(rows, f"{stem}.drelus.png", title)
        optimal = "optimal" if res.optimal else "NOT proven optimal"
        tqdm.write(f"budget {label}: DReLUs {res.total_cost:,} / {budget:,} "
                   f"({100 * res.total_cost / max(total, 1):.3f}% of {total:,}), "
                   f"total distortion {res.total_distortion:.6g}, gap {res.gap:.2g} ({optimal}), "
                   f"{sol.seconds:.2f} s -> {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
