"""Train or finetune an mmpretrain/mmseg config, optionally with Block-ReLUs (--relu-spec-file).

Examples:
  python mmlab_tools/train.py configs/classification/resnet18_cifar100_brelu_finetune.py \\
      --relu-spec-file specs/resnet18_cifar100.pickle \\
      --load-from work_dirs/resnet18_cifar100/epoch_200.pth
  bash mmlab_tools/dist_train.sh CONFIG 4 --relu-spec-file SPEC --load-from CKPT
  si-train CONFIG ...   (the same command, installed by pip)
"""
from __future__ import annotations

import argparse
import os
import sys

from ._mmlab import add_cfg_options, add_launcher_args, run_mmlab_cli


def build_parser() -> argparse.ArgumentParser:
    """The training flags."""
    p = argparse.ArgumentParser(
        description="Train/finetune an MMLab config on the mmengine Runner. Block-ReLUs of "
                    "--relu-spec-file replace the ReLUs after the model is built (and after the "
                    "config's secure_inference.convert conversions), before --load-from is "
                    "loaded; saved checkpoints record the spec in meta['secure_inference'].",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", help="mmpretrain or mmseg config file")
    p.add_argument("--work-dir", help="directory for logs and checkpoints "
                   "(default: work_dirs/<config name>)")
    p.add_argument("--relu-spec-file", help="block spec (.pickle or .json) from the knapsack step")
    p.add_argument("--load-from", help="checkpoint to start from (e.g. the baseline network)")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from CKPT, or from the latest checkpoint in the work dir "
                        "when no path is given")
    p.add_argument("--amp", action="store_true", help="mixed-precision training (CUDA only)")
    add_cfg_options(p, "train_cfg.max_epochs=10 train_dataloader.dataset.data_root=/data/cifar100")
    add_launcher_args(p, "dist_train.sh")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed flags."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The command line (a missing MMLab package is one line with the fix)."""
    return run_mmlab_cli(_main, "si-train", argv)


def _main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and train; 0 when done."""
    args = parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from secure_inference.mmlab.runner import teardown_distributed, train
    train(args.config, spec=args.relu_spec_file, work_dir=args.work_dir,
          load_from=args.load_from, resume=args.resume, amp=args.amp,
          cfg_options=args.cfg_options, launcher=args.launcher)
    teardown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
