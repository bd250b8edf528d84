"""The settings of one secure-inference session, as the three party command lines read them.

Every setting comes from a flag or from one YAML file shared by the three parties (flags
win, then the file, then :data:`DEFAULTS`). Keys of the YAML file (all optional):

    model: configs/classification/resnet18_cifar100.py   # MMLab config or torchvision name
    spec: work/spec.pickle          # Block-ReLU spec (public); none: all ReLUs
    input_shape: [3, 32, 32]        # else the config's secure_inference.input_shape
    cfg_options: {model.head.num_classes: 10}
    server: 127.0.0.2:7001          # where the server listens (the client dials it)
    helper: 127.0.0.3:7002          # where the helper listens (client and server dial it)
    client: 127.0.0.1               # the client's host (for its certificate only)
    certs: certs/                   # ca.pem + <role>.pem/.key from make_certificates.py
    plaintext: false                # true only on loopback, for tests
    frac_bits: 16
    drelu_bits: null                # approximate DReLU: compare this many bits ...
    drop_bits: 0                    # ... after dropping this many low bits
    drelu_width: null               # 64: ignore a calibrated spec's widths; N: every layer N bits
    drelu_margin: null              # safety factor over the calibrated ranges (default: the spec's)
    timeout: 120
    batch_size: 8                   # client only
    threads: 1                      # torch threads of this party (default: torch's choice)
    device: cpu                     # this party's torch device: cpu, cuda, cuda:1 (per party)
    prg: aes                        # randomness cipher: aes or chacha20 (same on all three)
    preprocess: interleaved         # interleaved or ahead mask products (same on all three)

Relative ``spec`` and ``certs`` paths (and a ``model`` config file that exists there) are
relative to the YAML file's folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .options import (CIPHERS, DEFAULT_CIPHER, DEFAULT_DEVICE, DEFAULT_FRAC_BITS,
                      DEFAULT_PREPROCESS, PREPROCESS_MODES, RUN_TIMEOUT, SessionLimits,
                      SessionOptions)
from .session import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER
from .settings import drelu_config
from .transport.tls import TLSConfig

KEYS = ("model", "spec", "input_shape", "cfg_options", "server", "helper", "client", "certs",
        "plaintext", "frac_bits", "drelu_bits", "drop_bits", "drelu_width", "drelu_margin",
        "timeout", "batch_size", "threads",
        "device", "prg", "preprocess")
DEFAULTS: dict[str, Any] = {"frac_bits": DEFAULT_FRAC_BITS, "drop_bits": 0,
                            "timeout": RUN_TIMEOUT,
                            "plaintext": False, "client": "127.0.0.1", "batch_size": 1,
                            "device": DEFAULT_DEVICE, "prg": DEFAULT_CIPHER,
                            "preprocess": DEFAULT_PREPROCESS}


class SessionConfigError(ValueError):
    """A session setting is missing or malformed (the message names it and the fix)."""


class TLSSetupError(SessionConfigError):
    """The TLS material of a party is missing (the message says how to make it)."""


def read_session_file(path: str | Path) -> dict[str, Any]:
    """The settings of a session YAML file, relative paths resolved against its folder."""
    import yaml
    path = Path(path)
    if not path.exists():
        raise SessionConfigError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise SessionConfigError(f"{path} must hold a mapping of settings")
    unknown = sorted(set(loaded) - set(KEYS))
    if unknown:
        raise SessionConfigError(f"{path}: unknown keys {unknown}; known: {list(KEYS)}")
    base = path.parent
    for key in ("spec", "certs"):
        if loaded.get(key) and not Path(loaded[key]).is_absolute():
            loaded[key] = str(base / loaded[key])
    if loaded.get("model") and str(loaded["model"]).endswith(".py") and \
            not Path(loaded["model"]).is_absolute() and (base / loaded["model"]).exists():
        loaded["model"] = str(base / loaded["model"])
    return loaded


def merge_settings(flags: Mapping[str, Any], config_file: str | Path | None = None
                   ) -> dict[str, Any]:
    """Settings from ``flags`` (None: not given), else ``config_file``, else
    :data:`DEFAULTS`; a session without a model is refused."""
    cfg: dict[str, Any] = {}
    if config_file is not None:
        cfg.update(read_session_file(config_file))
    for key in KEYS:
        value = flags.get(key)
        if value is not None:
            cfg[key] = value
    for key, value in DEFAULTS.items():
        cfg.setdefault(key, value)
    if not cfg.get("model"):
        raise SessionConfigError("no model: pass --model (config file or torchvision name) or "
                                 "set 'model' in --config-file")
    if cfg["prg"] not in CIPHERS:
        raise SessionConfigError(f"prg must be one of {', '.join(CIPHERS)}, got "
                                 f"{cfg['prg']!r} (--prg, or 'prg' in --config-file)")
    if cfg["preprocess"] not in PREPROCESS_MODES:
        raise SessionConfigError(f"preprocess must be one of {', '.join(PREPROCESS_MODES)}, "
                                 f"got {cfg['preprocess']!r} (--preprocess, or 'preprocess' "
                                 "in --config-file)")
    return cfg


def session_options(cfg: Mapping[str, Any], limits: SessionLimits | None = None
                    ) -> SessionOptions:
    """The :class:`~.options.SessionOptions` of merged settings (:func:`merge_settings`):
    what the party is built with. ``limits``: the server's/helper's (default: the defaults)."""
    return SessionOptions(frac_bits=int(cfg["frac_bits"]),
                          drelu=drelu_config(cfg.get("drelu_bits"), int(cfg.get("drop_bits") or 0)),
                          prg=cfg.get("prg") or DEFAULT_CIPHER, timeout=float(cfg["timeout"]),
                          preprocess=cfg.get("preprocess") or DEFAULT_PREPROCESS,
                          device=str(cfg.get("device") or DEFAULT_DEVICE),
                          limits=SessionLimits() if limits is None else limits)


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) as ``(host, port)``; ``what`` names the flag."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit():
        raise SessionConfigError(f"--{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def party_addresses(cfg: Mapping[str, Any]) -> dict[int, tuple[str, int]]:
    """Role -> (host, port): the client's host (port 0: it only dials), where the server and
    the helper listen."""
    for key in ("server", "helper"):
        if not cfg.get(key):
            raise SessionConfigError(f"no address for the {key}: pass --{key} HOST:PORT or set "
                                     f"'{key}' in --config-file")
    return {ROLE_CLIENT: (cfg["client"], 0),
            ROLE_SERVER: parse_address(cfg["server"], "server"),
            ROLE_HELPER: parse_address(cfg["helper"], "helper")}


def tls_config(role: int, cfg: Mapping[str, Any]) -> TLSConfig | None:
    """This party's TLS material (None with ``plaintext``); a missing folder or file is a
    :class:`TLSSetupError` naming it and how to make it."""
    if cfg["plaintext"]:
        return None
    if not cfg.get("certs"):
        raise TLSSetupError("TLS needs --certs FOLDER (made with si-certificates; see its "
                            "--help), or --plaintext on loopback")
    if not Path(cfg["certs"]).is_dir():
        raise TLSSetupError(f"certs: {cfg['certs']} is not a folder; pass --certs (or 'certs:' "
                            "in --config-file) pointing at the folder made by "
                            "si-certificates (see si-certificates --help)")
    try:
        return TLSConfig.from_dir(cfg["certs"], role)
    except FileNotFoundError as exc:
        raise TLSSetupError(str(exc)) from None


def check_device(device: str) -> str:
    """``device`` if this machine has it, else a :class:`SessionConfigError` that says what to
    use. Each party may run on its own device; results and bytes do not depend on it."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise SessionConfigError(f"device {device!r} is not a torch device ({exc}); use cpu, "
                                 "cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SessionConfigError(f"device {device!r}: this machine has no usable CUDA "
                                     "device (torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SessionConfigError(f"device {device!r}: only {torch.cuda.device_count()} "
                                     "CUDA device(s) here")
    elif dev.type != "cpu":
        raise SessionConfigError(f"device {device!r}: the secure runtime runs on cpu or cuda")
    return device
