"""Issue 14 item 4: secure inference of finished study models, next to their plaintext accuracy.

For each chosen method at one budget and seed of a compare_methods.py work dir, runs the
finetuned model under three-party secure inference (three local processes, loopback TCP with
TLS) on --images test images spread evenly over the test set, and writes a table (secure
accuracy, plaintext accuracy on the same images and on all, agreement, MB and s per image).

  FMNIST_DATA=work_dirs/data/fashion-mnist python benchmark/accuracy/secure_check.py \\
      --work work_dirs/fmnist_study/compare --budget 7x7 --seed 0 --images 1000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="compare_methods.py work dir")
    ap.add_argument("--budget", default="7x7", help="budget label (7x7 is nearest to 4%%)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["knapsack", "uniform"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per party")
    ap.add_argument("--out", type=Path, default=HERE / "secure_check")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from secure_inference import demo
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import build_task_model

    data = json.loads((args.work / "results.json").read_text())
    from secure_inference.study.runs import path_from_work
    config = str(path_from_work(args.work, data["settings"]["config"]))
    chosen = []
    for method in args.methods:
        run = data["runs"].get(f"{method}@{args.budget}#seed{args.seed}")
        if run is None:
            print(f"error: {method}@{args.budget}#seed{args.seed} has not finished in "
                  f"{args.work}; rerun the study first", file=sys.stderr)
            return 2
        chosen.append((method, args.work / run["checkpoint"]))
    cfg = load_task_config(config)
    batches = list(demo.split_inputs(cfg, build_task_model(cfg), "test"))
    rows = []
    for method, ckpt in chosen:
        t0 = time.time()
        label = f"knap@{args.budget}" if method == "knapsack" else f"{method} {args.budget}"
        rows.append(demo.evaluate_model(config, ckpt, label, batches,
                                        args.images, {"tls": True, "threads": args.threads}))
        print(f"{method}: {time.time() - t0:.0f} s", flush=True)
    table = demo.format_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.txt").write_text(table + "\n")
    demo.write_results(args.out, rows, {"work": str(args.work), "budget": args.budget,
                                        "seed": args.seed, "images": args.images})
    return 0


if __name__ == "__main__":
    sys.exit(main())
