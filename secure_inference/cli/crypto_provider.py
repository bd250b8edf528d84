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

from ._party import add_common_args, add_limit_args, run_cli, serve_session
from ._service import add_service_args, serve_forever


def build_parser() -> argparse.ArgumentParser:
    """The helper's flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    add_limit_args(parser)
    add_service_args(parser)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and help one session (errors propagate; see :func:`main`)."""
    args = build_parser().parse_args(argv)
    if args.serve:
        return serve_forever(2, args)
    return serve_session(2, args)


def main(argv: list[str] | None = None) -> int:
    """The command line: user errors are one line on stderr and exit status 1."""
    return run_cli(run, "helper", argv)


if __name__ == "__main__":
    sys.exit(main())
