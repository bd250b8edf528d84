"""Secure-inference server (P1): holds the model weights; never sees the client's images.

Loads the model config + checkpoint (+ Block-ReLU spec), compiles it, listens at --server,
and serves one session (with --serve: sessions until stopped, each in its own process): the
weights are masked and opened once per session, then every image batch of the client runs
through the secure layers. Example (three hosts, TLS):

    si-server --config-file session.yaml --checkpoint ft.pth
    (or: python research/secure_inference/server.py --config-file session.yaml --checkpoint ft.pth)

See docs/secure_inference.md for the YAML keys, certificates and what each party learns.
"""
from __future__ import annotations

import argparse
import sys

from ._party import add_common_args, add_limit_args, run_cli, serve_session
from ._service import add_service_args, serve_forever


def build_parser() -> argparse.ArgumentParser:
    """The server's flags."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model weights (.pth)")
    add_common_args(parser)
    add_limit_args(parser)
    add_service_args(parser)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and serve one session (errors propagate; see :func:`main`)."""
    args = build_parser().parse_args(argv)
    if args.serve:
        return serve_forever(1, args, checkpoint=args.checkpoint)
    return serve_session(1, args, checkpoint=args.checkpoint)


def main(argv: list[str] | None = None) -> int:
    """The command line: user errors are one line on stderr and exit status 1."""
    return run_cli(run, "server", argv)


if __name__ == "__main__":
    sys.exit(main())
