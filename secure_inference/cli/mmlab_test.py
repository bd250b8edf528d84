"""Evaluate a (finetuned) checkpoint of an mmpretrain/mmseg config.

The Block-ReLU spec recorded in the checkpoint is applied automatically; --relu-spec-file
must match it (a different spec is an error). For a plain checkpoint, --relu-spec-file
evaluates it with Block-ReLUs before any finetuning.

Examples:
  python mmlab_tools/test.py CONFIG work_dirs/x/epoch_120.pth --out metrics.json
  bash mmlab_tools/dist_test.sh CONFIG CKPT 4
  si-test CONFIG CKPT ...   (the same command, installed by pip)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ._mmlab import add_cfg_options, add_launcher_args, run_mmlab_cli


def build_parser() -> argparse.ArgumentParser:
    """The evaluation flags."""
    p = argparse.ArgumentParser(
        description="Evaluate a checkpoint on the config's test set with the mmengine Runner; "
                    "the checkpoint's Block-ReLU spec and conversions are checked and applied.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", help="mmpretrain or mmseg config file")
    p.add_argument("checkpoint", help="checkpoint file to evaluate")
    p.add_argument("--work-dir", help="directory for the evaluation logs")
    p.add_argument("--relu-spec-file", help="block spec (.pickle/.json); must equal the one the "
                   "checkpoint records, if any")
    p.add_argument("--out", help="write the metrics as JSON to this file")
    add_cfg_options(p, "test_dataloader.dataset.data_root=/data")
    add_launcher_args(p, "dist_test.sh")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line (a missing MMLab package is one line with the fix)."""
    return run_mmlab_cli(_main, "si-test", argv)


def _main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, evaluate and print the metrics (rank 0); 0 when done."""
    args = parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from secure_inference.mmlab.runner import evaluate, teardown_distributed
    metrics = evaluate(args.config, args.checkpoint, spec=args.relu_spec_file,
                       work_dir=args.work_dir, out=args.out, cfg_options=args.cfg_options,
                       launcher=args.launcher)
    teardown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
