"""Accuracy against DReLUs: several ways of spending the same DReLU budget, side by side.

For every budget and method this builds a Block-ReLU spec from the baseline, finetunes it with
the config's own training recipe (train_dataloader, optimizer, schedule) from CHECKPOINT,
evaluates top-1 accuracy on the config's test_dataloader, and records the run.

CONFIG       an MMLab classification config (mmpretrain) with secure_inference.input_shape and
             secure_inference.distortion_data (training images, deterministic pipeline) and a
             test_dataloader; its schedule is the finetune recipe shared by all methods.
CHECKPOINT   the baseline checkpoint (all ReLUs) of that config's model.

Budgets (--budgets), DReLUs per image:
  HxW     the count of the uniform spec with patch size HxW everywhere (e.g. 7x7 4x4 3x3 2x2)
  0.05    a share of the all-ReLU count (floor)
  12000   an absolute count
  Every method is solved at the budget's count (achieved count <= budget, reported); the
  uniform method exists only at HxW budgets, where it defines the count.

Methods (--methods):
  knapsack          per-channel patch sizes, exact knapsack over exact distortion
  knapsack_bytes    the same knapsack with every option priced in exact bytes on the wire
                    (at --bytes-width bits per comparison), under the byte budget of the
                    knapsack's own spec at that budget: the two compared at equal bytes
                    per image (its bytes <= the knapsack's; its DReLUs may be more)
  knapsack_linear   the same over the linear (first-order) distortion estimate
  uniform           the uniform HxW Block-ReLU
  linearisation     the knapsack restricted to {ReLU, identity} per channel (SNL-style)
  knapsack_kd       the knapsack spec finetuned with distillation from the baseline
  iterative         knapsack in --iterative-rounds rounds, the distortion re-measured on the
                    network with the previous round's spec applied, budgets falling
                    geometrically to the target

Seeds (--seeds): finetuning seeds; every (method, budget) runs once per seed. The spec does not
depend on the seed (distortion samples use --distortion-seed). --max-seeds METHOD=K runs
METHOD with the first K seeds only.

Outputs in --work-dir:
  results.json              settings, baseline accuracy, budgets, specs, one entry per run
  results.md                table: accuracy mean ± std per budget and method, DReLUs and
                            bytes per image, gaps
  accuracy_vs_drelus.png    plot: log DReLUs per image, one line per method, std error bars
  accuracy_vs_bytes.png     plot: bytes per image (MB), one marker set per method, every
                            seed and the mean ± std

Bytes per image (--bytes-width, default 64): the exact bytes the secure runtime sends for the
DReLU layers (ReLU / Block-ReLU, fused DReLU + multiplication per site) of one image with
every comparison at that many bits; the convolutions' bytes do not depend on the spec and are
not counted. Recorded for every spec and run; the width used by knapsack_bytes' prices.
  specs/, distortion/, runs/<method>/<budget>/seed<k>/final.pth   (specs, caches, models)

Parallel runs: --jobs N finetunes N runs at a time in worker processes (--threads torch threads
each) while the main process builds the specs, cheapest first (uniform, linear, exact,
iterative). Results are the same as with --jobs 1 for the same seeds.

Resumption: rerun the same command. Finished runs are skipped; results.json is rewritten
atomically after every run, so an interruption loses at most the run in progress (its folder
is cleared and redone). Delete a run's entry from results.json to redo it. Rerunning with
other settings (config, checkpoint, samples, ...) in the same work dir is refused; budgets,
methods and seeds may be extended.

Example:
  python research/compare_methods.py cfg.py base.pth --work-dir work_dirs/cmp \\
      --budgets 7x7 4x4 --methods knapsack uniform linearisation --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# the method names, here so that --help loads no torch (tests/study checks that they are
# the keys of secure_inference.study.methods.METHODS)
METHOD_NAMES = ("knapsack", "knapsack_bytes", "knapsack_linear", "uniform", "linearisation", "knapsack_kd",
                "iterative")


def parse_key_values(items: list[str], what: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="MMLab classification config (finetune recipe)")
    ap.add_argument("checkpoint", help="baseline checkpoint (all ReLUs)")
    ap.add_argument("--work-dir", required=True, type=Path, help="output and resume folder")
    ap.add_argument("--budgets", nargs="+", required=True,
                    help="HxW (uniform count), share in (0,1], or DReLU count")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_NAMES), choices=METHOD_NAMES,
                    help="methods to compare (default: all)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="finetune seeds: every method is finetuned once per seed (default: 0)")
    ap.add_argument("--max-seeds", nargs="*", default=[], metavar="METHOD=K",
                    help="run METHOD with the first K seeds only")
    ap.add_argument("--num-samples", type=int, default=256,
                    help="training images averaged over by the distortion (default 256)")
    ap.add_argument("--distortion-seed", type=int, default=0,
                    help="seed of the distortion step's image sample and projections "
                         "(public; default 0)")
    ap.add_argument("--num-projections", type=int, default=8,
                    help="random projections per sample of the linear estimate")
    ap.add_argument("--iterative-rounds", type=int, default=3,
                    help="rounds of the iterative method: budgets fall geometrically from "
                         "the all-ReLU count to the target (default 3)")
    ap.add_argument("--iterative-samples", type=int, default=None,
                    help="images for the iterative method's re-measurements (the first N of "
                         "the distortion samples; default: all). Exact distortion of a network "
                         "full of Block-ReLUs costs about 3x that of the baseline")
    ap.add_argument("--bytes-width", type=int, default=64, metavar="BITS",
                    help="comparison width at which bytes per image are counted and "
                         "knapsack_bytes prices its options (3-64, default 64: the runtime "
                         "without calibration)")
    ap.add_argument("--distill-temperature", type=float, default=4.0,
                    help="softmax temperature of knapsack_kd's distillation (default 4)")
    ap.add_argument("--distill-weight", type=float, default=1.0,
                    help="weight of knapsack_kd's distillation loss (default 1)")
    ap.add_argument("--cfg-options", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides (values parsed as Python literals when possible)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process and of each worker (default: torch's "
                         "choice)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="finetunes at a time, each in its own worker process, while this "
                         "process builds the specs (default 1: everything in this process). "
                         "With N cores, --jobs N --threads 1 keeps them busy")
    return ap


def literal(value: str):
    import ast
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from secure_inference.study import report
    from secure_inference.study.runs import Study, run_study
    try:
        max_seeds = {k: int(v) for k, v in parse_key_values(args.max_seeds, "--max-seeds").items()}
        cfg_options = {k: literal(v) for k, v in
                       parse_key_values(args.cfg_options, "--cfg-options").items()}
        study = Study(config=args.config, checkpoint=args.checkpoint,
                      work_dir=str(args.work_dir), budgets=args.budgets, methods=args.methods,
                      seeds=args.seeds, max_seeds=max_seeds, num_samples=args.num_samples,
                      distortion_seed=args.distortion_seed,
                      num_projections=args.num_projections,
                      iterative_rounds=args.iterative_rounds,
                      iterative_samples=args.iterative_samples,
                      distill_temperature=args.distill_temperature,
                      distill_weight=args.distill_weight, cfg_options=cfg_options,
                      bytes_width=args.bytes_width)
        study.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    work = args.work_dir
    started = time.time()
    durations: list[float] = []

    def write_outputs(data) -> None:
        (work / "results.md").write_text(report.format_table(data))
        report.plot(data, work / "accuracy_vs_drelus.png")
        report.plot_bytes(data, work / "accuracy_vs_bytes.png")

    def on_event(kind: str, info: dict) -> None:
        stamp = time.strftime("%H:%M:%S")
        if kind == "baseline":
            print(f"[{stamp}] baseline: {100 * info['accuracy']:.2f}% on "
                  f"{info['test_images']} test images, {info['drelus']:,} DReLUs, "
                  f"{info['sites']} sites", flush=True)
        elif kind == "skip":
            print(f"[{stamp}] done already: {info['run']}", flush=True)
        elif kind == "spec":
            nbytes = "" if info.get("bytes") is None else f", {info['bytes']:,} bytes"
            print(f"[{stamp}] spec {info['method']}@{info['budget']}: {info['drelus']:,} / "
                  f"{info['budget_drelus']:,} DReLUs{nbytes} ({info['seconds']:.0f} s)",
                  flush=True)
        elif kind == "start":
            what = "queued" if info.get("queued") else "..."
            print(f"[{stamp}] run {info['index'] + 1}/{info['pending']}: {info['run']} {what}",
                  flush=True)
        elif kind == "failed":
            print(f"[{stamp}] run {info['index'] + 1}/{info['pending']}: {info['run']} "
                  f"FAILED: {info['error']}", flush=True)
        elif kind == "done":
            took = info["seconds_finetune"] + info["seconds_eval"]
            durations.append(took)
            left = info["pending"] - info.get("finished", info["index"] + 1)
            eta = left * sum(durations) / len(durations) / info.get("jobs", 1)
            print(f"[{stamp}] run {info['index'] + 1}/{info['pending']}: {info['run']}: "
                  f"{100 * info['accuracy']:.2f}% at {info['drelus']:,} DReLUs "
                  f"({took:.0f} s; {left} left, ETA {eta / 60:.0f} min)", flush=True)
            from secure_inference.study.results import ResultsFile
            write_outputs(ResultsFile(work / "results.json").data)

    try:
        results = run_study(study, on_event, jobs=args.jobs, worker_threads=args.threads)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_outputs(results.data)
    print(f"\n{report.format_table(results.data)}")
    print(f"[{time.strftime('%H:%M:%S')}] finished in {time.time() - started:.0f} s; "
          f"outputs in {work}: results.json, results.md, accuracy_vs_drelus.png, "
          "accuracy_vs_bytes.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
