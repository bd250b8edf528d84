"""Secure-inference crypto provider / helper (P2): needs only the public architecture and spec.

Compiles the same program as the client and server (from the config and spec, with random
weights: the program holds no weights), listens at --helper, deals correlated randomness
and runs the comparison steps. It sees only masked values. Example:

    si-crypto-provider --config-file session.yaml
    (or: python research/secure_inference/crypto_provider.py --config-file session.yaml)
"""
from __future__ import annotations

import argparse
import sys
import time

from ._party import (add_common_args, add_limit_args, build_model, compile_for, limits_from,
                     resolve, run_cli, run_role)


def build_parser() -> argparse.ArgumentParser:
    """The helper's flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_limit_args(parser)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and help one session (errors propagate; see :func:`main`)."""
    args = build_parser().parse_args(argv)
    limits = limits_from(args)
    cfg = resolve(args)
    model, shape = build_model(cfg)
    program, _ = compile_for(model, shape, 1)
    del model
    print(f"helper: compiled {len(program.layers)} secure layers; listening at {cfg['helper']}",
          file=sys.stderr)
    start = time.perf_counter()
    result, _ = run_role(2, cfg, program, limits=limits)
    print(f"helper: helped with {sum(result['batch_sizes'])} image(s) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: user errors are one line on stderr and exit status 1."""
    return run_cli(run, "helper", argv)


if __name__ == "__main__":
    sys.exit(main())
