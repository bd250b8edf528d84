#!/usr/bin/env python
"""Evaluate a (finetuned) checkpoint of an mmpretrain/mmseg config.

The Block-ReLU spec recorded in the checkpoint is applied automatically; --relu-spec-file
must match it (a different spec is an error). For a plain checkpoint, --relu-spec-file
evaluates it with Block-ReLUs before any finetuning.

Examples:
  python mmlab_tools/test.py CONFIG work_dirs/x/epoch_120.pth --out metrics.json
  bash mmlab_tools/dist_test.sh CONFIG CKPT 4
"""
from __future__ import annotations

import argparse
import json
import os

import secure_inference  # noqa: F401  (compatibility fixes before mmengine/torchvision)
from mmengine.config import DictAction

from secure_inference.mmlab.runner import (
    LAUNCHERS, evaluate, teardown_distributed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                   help="override config entries, e.g. test_dataloader.dataset.data_root=/data")
    p.add_argument("--launcher", choices=LAUNCHERS, default="none",
                   help="'pytorch' under torchrun (dist_test.sh); 'none' for one process")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    metrics = evaluate(args.config, args.checkpoint, spec=args.relu_spec_file,
                       work_dir=args.work_dir, out=args.out, cfg_options=args.cfg_options,
                       launcher=args.launcher)
    teardown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
