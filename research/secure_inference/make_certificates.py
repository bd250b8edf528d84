#!/usr/bin/env python
"""Create a private CA and TLS certificates for the three secure-inference parties.

Example (three hosts):

    python research/secure_inference/make_certificates.py certs/ \\
        --client-host laptop.example.org --server-host 10.0.0.5 --helper-host helper.internal

Then copy to each host (e.g. with scp) only what that party needs:

    client host:  certs/ca.pem  certs/client.pem  certs/client.key
    server host:  certs/ca.pem  certs/server.pem  certs/server.key
    helper host:  certs/ca.pem  certs/helper.pem  certs/helper.key

Keep certs/ca.key off the party hosts (or delete it): whoever holds it can mint certificates
that every party accepts. Each party's certificate names its hostnames/IP addresses (the
dialling side checks them) and its role (checked by the peers). Every party trusts only
certificates signed by this CA; create a new folder per deployment.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from secure_inference.mpc.certs import create_certificates  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="output folder (created if missing)")
    for role in ("client", "server", "helper"):
        parser.add_argument(f"--{role}-host", action="append", default=None, metavar="HOST",
                            help=f"hostname or IP address of the {role} (repeatable; default: "
                                 "localhost and 127.0.0.1)")
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    default = ["localhost", "127.0.0.1"]
    hosts = {0: args.client_host or default, 1: args.server_host or default,
             2: args.helper_host or default}
    try:
        paths = create_certificates(args.folder, hosts, days=args.days, overwrite=args.force)
    except (FileExistsError, ValueError) as exc:
        parser.error(str(exc))
    for name, path in sorted(paths.items()):
        print(f"wrote {path}")
    print("copy ca.pem plus <party>.pem and <party>.key to each party's host; keep ca.key away "
          "from them (see --help)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
