"""TLS certificates for the three secure-inference parties (client, server, helper).

Recommended for separate hosts: certificate requests, so no private key ever leaves its host.

  1. on each party host (here the server, reachable as 10.0.0.5):
       make_certificates.py request --role server --host 10.0.0.5 --out certs/
     writes certs/server.key (secret, mode 0600, stays on this host) and certs/server.csr;
     send only the .csr to the CA operator.
  2. the CA operator (once):  make_certificates.py init-ca ca/
     writes ca/ca.key (secret, mode 0600, never leaves the operator) and ca/ca.pem (public);
     then for each request received:
       make_certificates.py sign --ca ca/ --role server server.csr --out server.pem
     checks the request and writes server.pem; send server.pem and ca/ca.pem back to the host.
  3. on each party host: put server.pem and ca.pem into certs/ next to server.key, then
       make_certificates.py check certs/ --role server
     and point `certs:` in session.yaml at certs/.

One machine (tests, run_local.sh): a CA and all three parties' keys in one folder; whoever
runs it holds every key and can impersonate any party:

    make_certificates.py certs/ --client-host 127.0.0.1 --server-host 127.0.0.2 \\
        --helper-host 127.0.0.3            (same as: make_certificates.py local certs/ ...)

then copy to each host only ca.pem plus that party's .pem and .key, and keep ca.key off the
party hosts. Run `make_certificates.py COMMAND --help` for each step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

def program_name() -> str:
    """How the user called this command: ``si-certificates`` (the console script) or
    ``make_certificates.py`` (research/secure_inference/), named so in help and advice."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name in ("si-certificates", "make_certificates.py") else "si-certificates"


PROG = program_name()
COMMANDS = ("local", "request", "init-ca", "sign", "check")

LOCAL_HELP = """\
One-machine mode (tests, run_local.sh, or when one person runs all three parties): write a
new CA and all three parties' keys and certificates into FOLDER:

  ca.pem                  CA certificate (public): copy to all three hosts
  ca.key                  CA private key: keep it off the party hosts, or delete it
  client.pem client.key   copy only to the client host
  server.pem server.key   copy only to the server host
  helper.pem helper.key   copy only to the helper host

Whoever runs this holds every private key and can impersonate any party. For separate hosts
run by different people, use `request` / `init-ca` / `sign` instead (see `--help`).
`make_certificates.py FOLDER ...` without a command is this mode.
"""

REQUEST_HELP = """\
Step 1 of 3, on the party's own host: make this party's private key and a certificate
signing request (CSR) naming its role and the hostnames/IP addresses the other parties use
to reach it. Writes into --out DIR:

  ROLE.key   the private key (mode 0600). Secret: it never leaves this host; do not copy
             or send it anywhere.
  ROLE.csr   the request (public): send it to the CA operator (e.g. by scp or e-mail).

Next: the CA operator runs `sign` on ROLE.csr (step 2) and sends back ROLE.pem and ca.pem;
put both into DIR next to ROLE.key (step 3) and run `check DIR --role ROLE`.
Example:  make_certificates.py request --role server --host 10.0.0.5 --host srv.example --out certs/
"""

INIT_CA_HELP = """\
Step 2a, once, by the CA operator (someone all three parties trust, ideally on a machine
that is none of the party hosts): make the certificate authority in DIR:

  ca.key   the CA's private key (mode 0600). Secret: whoever holds it can issue certificates
           that every party accepts. Keep it with the operator (offline if possible), or
           delete it once the three certificates are signed.
  ca.pem   the CA certificate (public): send it to all three hosts with their certificates.

Next: `sign --ca DIR ROLE.csr` for each request received.
"""

SIGN_HELP = """\
Step 2b, by the CA operator: check a party's request (ROLE.csr, made with `request` on that
party's host) and sign it with the CA in --ca DIR (made with `init-ca`). Refused: a request
whose signature does not verify (altered), that does not name exactly one party role, whose
role is not --role (when given), or whose hostnames are not valid DNS names or IP addresses.
The certificate gets the same validity, key usage and extended key usage as the one-machine
mode. Writes --out CERT (default: ROLE.pem next to the request); never overwrites without
--force.

Next: send CERT and DIR/ca.pem (never DIR/ca.key) to that party's host, where they go into
the folder holding ROLE.key (step 3: `check FOLDER --role ROLE`).
Example:  make_certificates.py sign --ca ca/ --role server incoming/server.csr --out server.pem
"""

CHECK_HELP = """\
Step 3, on the party's host after receiving its certificate: check that FOLDER holds
ca.pem, ROLE.pem and ROLE.key, that ROLE.pem was signed by ca.pem, names this role, is
valid now and belongs to ROLE.key, and that ROLE.key is readable only by its owner. This is
what the parties load at start-up (`certs: FOLDER` in session.yaml).
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _role(value: str) -> int:
    from secure_inference.mpc.certs import parse_role
    try:
        return parse_role(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.replace('make_certificates.py', PROG), formatter_class=_formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                title="commands (without one, FOLDER ... means `local FOLDER ...`)")
    subs: dict[str, argparse.ArgumentParser] = {}

    p = sub.add_parser("local", help="one machine: CA and all three parties' keys in FOLDER",
                       description=LOCAL_HELP.replace('make_certificates.py', PROG), formatter_class=_formatter)
    p.add_argument("folder", type=Path, help="output folder (created if missing)")
    for role in ("client", "server", "helper"):
        p.add_argument(f"--{role}-host", action="append", default=None, metavar="HOST",
                       help=f"hostname or IP address of the {role} (repeatable; default: "
                            "localhost and 127.0.0.1)")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    subs["local"] = p

    p = sub.add_parser("request", help="step 1, on each party host: private key + CSR",
                       description=REQUEST_HELP.replace('make_certificates.py', PROG), formatter_class=_formatter)
    p.add_argument("--role", type=_role, required=True, help="client, server or helper")
    p.add_argument("--host", action="append", required=True, metavar="HOST",
                   help="hostname or IP address the other parties use to reach this host "
                        "(repeatable; the dialling side checks it)")
    p.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                   help="folder for ROLE.key and ROLE.csr (default: current folder)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing ROLE.key/ROLE.csr (the old key's certificate "
                        "then stops matching)")
    subs["request"] = p

    p = sub.add_parser("init-ca", help="step 2a, CA operator: make the CA (ca.key, ca.pem)",
                       description=INIT_CA_HELP.replace('make_certificates.py', PROG), formatter_class=_formatter)
    p.add_argument("folder", type=Path, metavar="DIR", help="CA folder (created if missing)")
    p.add_argument("--days", type=int, default=3650, help="CA validity in days (default 3650)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing CA (every certificate it signed stops working)")
    subs["init-ca"] = p

    p = sub.add_parser("sign", help="step 2b, CA operator: check and sign a party's CSR",
                       description=SIGN_HELP.replace('make_certificates.py', PROG), formatter_class=_formatter)
    p.add_argument("csr", type=Path, metavar="CSR", help="the party's ROLE.csr")
    p.add_argument("--ca", type=Path, required=True, metavar="DIR",
                   help="CA folder made by init-ca (ca.key, ca.pem)")
    p.add_argument("--out", type=Path, default=None, metavar="CERT",
                   help="certificate file to write (default: ROLE.pem next to CSR; a folder: "
                        "FOLDER/ROLE.pem)")
    p.add_argument("--role", type=_role, default=None,
                   help="refuse the request unless it is for this role (recommended)")
    p.add_argument("--days", type=int, default=365,
                   help="certificate validity in days (default 365)")
    p.add_argument("--force", action="store_true", help="overwrite an existing CERT")
    subs["sign"] = p

    p = sub.add_parser("check", help="step 3, on each party host: check FOLDER before use",
                       description=CHECK_HELP.replace('make_certificates.py', PROG), formatter_class=_formatter)
    p.add_argument("folder", type=Path, metavar="FOLDER",
                   help="folder with ca.pem, ROLE.pem, ROLE.key")
    p.add_argument("--role", type=_role, required=True, help="client, server or helper")
    subs["check"] = p
    return parser, subs


def _local(args: argparse.Namespace) -> None:
    from secure_inference.mpc.certs import create_certificates
    default = ["localhost", "127.0.0.1"]
    hosts = {0: args.client_host or default, 1: args.server_host or default,
             2: args.helper_host or default}
    paths = create_certificates(args.folder, hosts, days=args.days, overwrite=args.force)
    for _, path in sorted(paths.items()):
        print(f"wrote {path}")
    print("copy ca.pem plus <party>.pem and <party>.key to each party's host; keep ca.key away "
          "from them (see --help)")


def _request(args: argparse.Namespace) -> None:
    from secure_inference.mpc.certs import write_party_request
    paths = write_party_request(args.out, args.role, args.host, overwrite=args.force)
    name = paths["key"].stem
    print(f"wrote {paths['key']} (private key: keep it on this host, never send it)")
    print(f"wrote {paths['csr']}")
    print(f"next: send {paths['csr']} to the CA operator; put the {name}.pem and ca.pem you get "
          f"back into {args.out}, then run: {PROG} check {args.out} --role {name}")


def _init_ca(args: argparse.Namespace) -> None:
    from secure_inference.mpc.certs import init_ca
    paths = init_ca(args.folder, days=args.days, overwrite=args.force)
    print(f"wrote {paths['key']} (CA private key: keep it secret, never copy it to a party host)")
    print(f"wrote {paths['cert']} (public: send it to all three hosts)")
    print(f"next: {PROG} sign --ca {args.folder} --role ROLE ROLE.csr for each request")


def _sign(args: argparse.Namespace) -> None:
    from secure_inference.mpc.certs import sign_request_file
    out, info = sign_request_file(args.ca, args.csr, args.out, expected_role=args.role,
                                  days=args.days, overwrite=args.force)
    print(f"signed a {info.name} certificate for {', '.join(info.hosts)}")
    print(f"wrote {out}")
    print(f"next: send {out} and {args.ca / 'ca.pem'} (not ca.key) to the {info.name}'s host, "
          f"into the folder holding {info.name}.key")


def _check(args: argparse.Namespace) -> None:
    from secure_inference.mpc.certs import check_party_folder
    info = check_party_folder(args.folder, args.role)
    print(f"{args.folder}: {info.name} certificate for {', '.join(info.hosts)}, signed by "
          f"ca.pem, matching {info.name}.key: ready")


RUN = {"local": _local, "request": _request, "init-ca": _init_ca, "sign": _sign, "check": _check}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run one command; user errors exit with status 2 and a message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["local", *argv]          # the historical `make_certificates.py FOLDER ...`
    parser, subs = build_parser()
    args = parser.parse_args(argv)
    try:
        RUN[args.command](args)
    except (ValueError, OSError) as exc:
        subs[args.command].error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
