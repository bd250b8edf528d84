"""What mmlab_train and mmlab_test share, without loading mmengine before the flags parse."""
from __future__ import annotations

import argparse

from secure_inference.mmlab.launchers import LAUNCHERS

MMLAB_PACKAGES = ("mmengine", "mmcv", "mmpretrain", "mmseg")


def missing_mmlab(exc: BaseException) -> str | None:
    """The one-line fix for a ModuleNotFoundError of an MMLab package (None otherwise)."""
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in MMLAB_PACKAGES:
        return (f"this needs the MMLab packages ({exc.name} is not installed): pip install "
                "'secure-inference[mmlab]' (or `make install` in the repository), or use a "
                "torchvision model name / module:factory instead of an MMLab config")
    return None


def run_mmlab_cli(main, name: str, argv: list[str] | None = None) -> int:
    """Run an MMLab command's ``main``; a missing MMLab package ends with the fix, exit 1."""
    import sys
    try:
        return main(argv)
    except ModuleNotFoundError as exc:
        message = missing_mmlab(exc)
        if message is None:
            raise
        print(f"{name}: error: {message}", file=sys.stderr)
        return 1




class CfgOptionsAction(argparse.Action):
    """``--cfg-options key=value ...`` parsed by mmengine's ``DictAction`` (same syntax:
    lists, tuples, numbers, booleans, None), which loads only when the flag is given."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction
        action = DictAction(self.option_strings, self.dest, nargs=self.nargs,
                            default=self.default)
        action(parser, namespace, values, option_string)


def add_cfg_options(parser: argparse.ArgumentParser, example: str) -> None:
    """The ``--cfg-options`` flag (``example``: a typical override, for the help)."""
    parser.add_argument("--cfg-options", nargs="+", action=CfgOptionsAction, default=None,
                        help=f"override config entries, e.g. {example}")


def add_launcher_args(parser: argparse.ArgumentParser, script: str) -> None:
    """``--launcher`` and torchrun's ``--local_rank`` (hidden), shared by train and test."""
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help=f"'pytorch' under torchrun ({script}); 'none' for one process")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help=argparse.SUPPRESS)
