"""What the three party command lines (server, client, crypto_provider) share: the session
flags, one-line user errors, building and compiling the model, connecting the party.

Nothing here imports torch at module level: the parsers answer ``--help`` before it loads.
The session settings themselves (YAML file, merging, addresses, TLS) live in
:mod:`secure_inference.mpc.session_config`.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from secure_inference.mpc.options import (CIPHERS, PREPROCESS_MODES, DEFAULT_FRAC_BITS, DEFAULT_MAX_BATCH,
                                          DEFAULT_MAX_IMAGES)
from secure_inference.mpc.session_config import DEFAULTS


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags every party understands (defaults come from --config-file, then DEFAULTS)."""
    g = parser.add_argument_group("session (same for all three parties)")
    g.add_argument("--config-file", type=Path, help="YAML file with any of the settings below")
    g.add_argument("--model", help="MMLab config file (.py), torchvision model name with optional "
                   "arguments (resnet18,num_classes=10) or package.module:factory")
    g.add_argument("--spec", help="Block-ReLU spec (.pickle or .json); omit for all ReLUs")
    g.add_argument("--input-shape", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="image size (default: the config's secure_inference.input_shape)")
    g.add_argument("--server", metavar="HOST:PORT", help="address the server listens on")
    g.add_argument("--helper", metavar="HOST:PORT", help="address the helper listens on")
    g.add_argument("--client", metavar="HOST", help="the client's host name/IP (certificates)")
    g.add_argument("--certs", type=Path, help="folder with ca.pem and this party's .pem/.key")
    g.add_argument("--plaintext", action="store_true", default=None,
                   help="no TLS (loopback addresses only; for tests)")
    g.add_argument("--frac-bits", type=int,
                   help=f"fixed-point fractional bits (default {DEFAULT_FRAC_BITS})")
    g.add_argument("--drelu-bits", type=int, help="approximate DReLU: bits compared")
    g.add_argument("--drop-bits", type=int, help="approximate DReLU: low bits dropped first")
    g.add_argument("--drelu-width", type=int, metavar="BITS",
                   help="comparison width of every DReLU layer: 64 ignores a calibrated spec's "
                   "per-layer widths (the exact 64-bit DReLU everywhere); another value sets "
                   "every layer to it (exact only for inputs within +-2^(BITS-1-frac_bits)). "
                   "Default: the widths of a calibrated --spec (si-calibrate), else 64")
    g.add_argument("--drelu-margin", type=float, metavar="X",
                   help="safety factor over a calibrated spec's ranges (default: the one "
                   "si-calibrate recorded, 8); a larger margin costs about log2(X) bits per "
                   "comparison")
    g.add_argument("--timeout", type=float,
                   help=f"seconds to wait for a peer (default {DEFAULTS['timeout']:g})")
    g.add_argument("--threads", type=int, help="torch threads for this party (parties sharing "
                   "a machine: cores / 3; too many threads make OpenMP workers spin)")
    g.add_argument("--prg", choices=CIPHERS,
                   help="cipher of the correlated randomness: aes (AES-256-CTR on the CPU, "
                   "default) or chacha20 (drawn on this party's device, e.g. the GPU); all "
                   "three parties must choose the same one (checked at session start)")
    g.add_argument("--preprocess", choices=PREPROCESS_MODES,
                   help="when the conv/linear layers' input-independent half (the client's "
                   "and the helper's mask products) runs: interleaved (default; inside each "
                   "layer, while the server computes its own product: less time per image "
                   "on cores that would otherwise wait) or ahead (its own phase before the "
                   "images, reported apart). The same messages and bytes either way; all "
                   "three parties must choose the same (checked at session start)")
    g.add_argument("--device", help="this party's torch device: cpu (default), cuda, cuda:1; "
                   "each party may use its own (results and bytes do not depend on it)")
    g.add_argument("--debug", action="store_true",
                   help="show Python tracebacks on errors (also: environment SI_DEBUG=1)")


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """--max-batch/--max-images: what the server and the helper accept from a client."""
    g = parser.add_argument_group("limits (server and helper: what a client may ask for)")
    g.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help="largest batch (images) a client may announce; every party's memory "
                   f"grows with it (default {DEFAULT_MAX_BATCH})")
    g.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                   help=f"most images per session (default {DEFAULT_MAX_IMAGES})")


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, no traceback."""


def user_message(exc: BaseException) -> str | None:
    """One line naming the cause (and fix) of a user-facing error, or None for a bug."""
    from secure_inference.mpc.errors import ProtocolError
    if isinstance(exc, (UserError, ProtocolError)):
        return str(exc)
    from ._mmlab import missing_mmlab
    if missing_mmlab(exc):
        return missing_mmlab(exc)
    if isinstance(exc, FileNotFoundError):
        return str(exc) if not exc.filename else f"file not found: {exc.filename}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
    if isinstance(exc, ValueError) or type(exc).__name__ == "SpecError":
        return f"{exc}"
    return None


def run_cli(main: Callable[[list[str] | None], int], name: str,
            argv: list[str] | None = None) -> int:
    """Run a party CLI's ``main``: user errors (missing files, a port in use, a peer that
    failed, bad input) end with one line ``NAME: error: cause`` and exit 1; a bug keeps its
    traceback. ``--debug`` (or SI_DEBUG=1) shows tracebacks for everything."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("SI_DEBUG", "") not in ("", "0")
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified below
        message = None if debug else user_message(exc)
        if message is None:
            raise
        print(f"{name}: error: {message}", file=sys.stderr)
        return 1


def limits_from(args: argparse.Namespace):
    """The SessionLimits of --max-batch/--max-images."""
    from secure_inference.mpc.options import SessionLimits
    try:
        return SessionLimits(max_batch=int(args.max_batch), max_images=int(args.max_images))
    except ValueError as exc:
        raise SystemExit(f"--max-batch/--max-images: {exc}") from None


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Settings from flags, else the YAML file, else defaults; validated. Sets this party's
    torch threads (``threads``)."""
    from secure_inference.mpc.session_config import (KEYS, SessionConfigError, check_device,
                                                     merge_settings)
    try:
        cfg = merge_settings({key: getattr(args, key, None) for key in KEYS}, args.config_file)
        check_device(str(cfg.get("device") or "cpu"))
    except SessionConfigError as exc:
        raise SystemExit(str(exc)) from None
    if cfg.get("threads"):
        import torch
        torch.set_num_threads(int(cfg["threads"]))
    return cfg


def options_for(cfg: dict[str, Any], limits=None):
    """The party's SessionOptions of the merged settings, built once per command (``limits``:
    the server's/helper's SessionLimits; default: the library's defaults)."""
    from secure_inference.mpc.session_config import session_options
    return session_options(cfg, limits)


def check_addresses(cfg: dict[str, Any]) -> None:
    """A missing or malformed --server/--helper address is a one-line UserError."""
    from secure_inference.mpc.session_config import SessionConfigError, party_addresses
    try:
        party_addresses(cfg)
    except SessionConfigError as exc:
        raise UserError(str(exc)) from None


def tls_config(role: int, cfg: dict[str, Any]):
    """This party's TLS material (None with --plaintext); missing material is a UserError."""
    from secure_inference.mpc.session_config import TLSSetupError
    from secure_inference.mpc.session_config import tls_config as party_tls
    try:
        return party_tls(role, cfg)
    except TLSSetupError as exc:
        raise UserError(str(exc)) from None


def model_config(cfg: dict[str, Any]):
    """The session model's MMLab config (``cfg_options`` merged in), loaded once per command
    and passed on; None for a torchvision name or a factory."""
    from secure_inference.models import is_config_path, load_config
    if not is_config_path(cfg["model"]):
        return None
    return load_config(cfg["model"], cfg.get("cfg_options"))


def input_shape(cfg: dict[str, Any], task_cfg=None) -> tuple[int, int, int]:
    """[C, H, W] of the session: ``input_shape`` or the config's (``task_cfg``: the loaded
    config, see :func:`model_config`)."""
    from secure_inference.models import input_shape_of
    return input_shape_of(cfg["model"], cfg.get("input_shape"), cfg.get("cfg_options"),
                          config=task_cfg)


def build_model(cfg: dict[str, Any], checkpoint: str | None = None, task_cfg=None):
    """The model with the spec's Block-ReLUs: with the server's checkpoint, or (client and
    helper) with random weights, which only fix the architecture: the compiled program
    holds no weights. ``task_cfg``: the model's config if the caller loaded it already
    (:func:`model_config`)."""
    from secure_inference.models import is_config_path, load_model
    from secure_inference.spec import apply_block_spec, load_spec
    spec = load_spec(cfg["spec"]) if cfg.get("spec") else None
    if is_config_path(cfg["model"]) and task_cfg is None:
        task_cfg = model_config(cfg)
    shape = input_shape(cfg, task_cfg)
    if is_config_path(cfg["model"]):
        from secure_inference.mmlab.finetune import (build_task_model, load_finetuned,
                                                     prepare_model)
        task_cfg.setdefault("secure_inference", {})
        if not task_cfg.secure_inference.get("input_shape"):
            task_cfg.secure_inference["input_shape"] = list(shape)
        if checkpoint is not None:
            model = load_finetuned(task_cfg, checkpoint, spec)
        else:
            model = prepare_model(build_task_model(task_cfg), task_cfg, spec).eval()
    else:
        model = load_model(cfg["model"], checkpoint)
        if spec:
            apply_block_spec(model, spec, shape)
    return model.eval(), shape


def connect(role: int, cfg: dict[str, Any], options, tls):
    """Listen (server, helper), dial (client, server), agree keys; returns the Party built
    with ``options`` (:func:`options_for`). ``tls``: this party's material (:func:`tls_config`,
    None with --plaintext)."""
    from secure_inference.mpc.faults import fault_from_environment
    from secure_inference.mpc.lifecycle import open_party
    from secure_inference.mpc.session_config import SessionConfigError, party_addresses
    from secure_inference.mpc.transport.addresses import listen
    from secure_inference.mpc.transport.connect import connect_links
    try:
        addresses = party_addresses(cfg)
    except SessionConfigError as exc:
        raise SystemExit(str(exc)) from None
    listener = None
    if role != 0:
        try:
            listener = listen(*addresses[role])
        except OSError as exc:
            what = "server" if role == 1 else "helper"
            host, port = addresses[role]
            if exc.errno == errno.EADDRINUSE:
                raise UserError(f"cannot listen on {host}:{port}: the port is already in use "
                                f"(another {what} or program runs there); stop it or choose "
                                f"another port with --{what} HOST:PORT") from None
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check "
                            f"--{what}: HOST must be an address of this machine") from None
    try:
        if role == 0:   # a service (--serve) gets a fresh session identifier; others nothing
            import dataclasses
            import os

            from secure_inference.mpc.transport.connect import connect_session
            from secure_inference.mpc.transport.handshake import SESSION_ID_BYTES
            links, sid = connect_session(role, addresses, listener, tls=tls,
                                         allow_plaintext=bool(cfg["plaintext"]),
                                         timeout=options.timeout, max_frame=options.max_frame,
                                         session_id=os.urandom(SESSION_ID_BYTES))
            if sid is not None:
                options = dataclasses.replace(options, session_id=sid)
        else:
            links = connect_links(role, addresses, listener, tls=tls,
                                  allow_plaintext=bool(cfg["plaintext"]),
                                  timeout=options.timeout, max_frame=options.max_frame)
    finally:
        if listener is not None:
            listener.close()
    # warmed up first (torch's lazy meta-tensor imports, the numba kernels), before any timing;
    # the fault hook is armed only by the fault tests' environment variable
    party = open_party(role, links, options, fault=fault_from_environment(role))
    try:
        party.start()
    except BaseException as exc:
        close_party(party, exc)
        raise
    return party


def close_party(party, exc: BaseException | None = None) -> None:
    """Close the links; after a failure the peers are told which party failed and why."""
    from secure_inference.mpc.lifecycle import close_party as close
    close(party, exc)


def compile_for(model, shape, batch: int, cfg: dict[str, Any]):
    """The secure program (and server weights) of ``model`` for batches of ``batch``, with the
    comparison widths of the session: a calibrated spec's, unless --drelu-width says
    otherwise (all three parties compute the same widths; the header compares them)."""
    from secure_inference.mpc.compile import compile_model
    from secure_inference.spec import load_spec
    calibration = load_spec(cfg["spec"]).calibration if cfg.get("spec") else None
    margin = cfg.get("drelu_margin")
    return compile_model(model, (batch,) + tuple(shape), calibration=calibration,
                         frac_bits=int(cfg["frac_bits"]), drelu_width=cfg.get("drelu_width"),
                         margin=None if margin is None else float(margin))


def run_role(role: int, cfg: dict[str, Any], options, tls, program, *, weights=None,
             images=None):
    """Connect, run the program, gather the report at the client; closes the links. The
    DReLU and the server's/helper's limits come with ``options``."""
    from secure_inference.mpc.party import gather_results, run_party
    party = connect(role, cfg, options, tls)
    try:
        result = run_party(party, program, images=images, weights=weights)
        results = gather_results(party, result)
    except BaseException as exc:
        close_party(party, exc)
        raise
    party.close()
    return result, results


def serve_session(role: int, args: argparse.Namespace, checkpoint: str | None = None) -> int:
    """The listening parties' command: compile the program (the server with its checkpoint's
    weights; the helper with random ones, as it needs only the public program), listen, run
    one session, report progress on stderr."""
    name, verb, address = (("server", "served", "server") if role == 1
                           else ("helper", "helped with", "helper"))
    limits = limits_from(args)
    cfg = resolve(args)
    check_addresses(cfg)       # addresses and TLS files first: compiling takes a while
    tls = tls_config(role, cfg)
    options = options_for(cfg, limits)
    model, shape = build_model(cfg, checkpoint=checkpoint)
    program, weights = compile_for(model, shape, 1, cfg)
    del model
    print(f"{name}: compiled {len(program.layers)} secure layers; listening at {cfg[address]}",
          file=sys.stderr)
    start = time.perf_counter()
    result, _ = run_role(role, cfg, options, tls, program,
                         weights=weights if role == 1 else None)
    print(f"{name}: {verb} {sum(result['batch_sizes'])} image(s) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
