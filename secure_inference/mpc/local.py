"""``run_local``: secure inference of a torch model with three local processes over loopback.

The model is compiled here, in the calling process (so an unsupported operation fails before
any party starts). Then each party's private input is sent by value through that party's own
pipe (never written to a file, so nothing private is left behind even if the caller is killed):

* P0 (client) gets the images; P1 (server) gets the compiled weights;
* P2 (helper) gets nothing: it has only the public program (architecture and block spec).

The three processes talk over real TCP on 127.0.0.1 (TLS 1.3 with a throw-away CA unless
``tls=False``), exactly as the CLIs in ``research/secure_inference`` do across hosts.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .compile import Program, Weights, compile_model, error_std, truncation_failures
from .options import SessionLimits, SessionOptions
from .party import run_party
from .settings import DReLUConfig, drelu_config
from .report import build_report, plot_report, save_report
from .ring import check_inputs
from .options import DEFAULT_CIPHER, DEFAULT_FRAC_BITS, DEFAULT_PREPROCESS, RUN_TIMEOUT
from .runtime import Party
from .session import ROLE_CLIENT, ROLE_SERVER
from .harness import (Devices, PrgChoice, refuse_in_bootstrap, role_options, run_in_process,
                      run_local_processes)
from .netem import EmulatedLink, NetworkProfile, network_profile
from .prg import check_cipher

__all__ = ["LocalResult", "run_local", "run_program", "split_batches", "default_threads"]


@dataclass
class LocalResult:
    """Revealed outputs (what the client learns), the run report and the compiled program."""

    outputs: torch.Tensor
    report: dict[str, Any]
    program: Program


def split_batches(inputs: torch.Tensor | Sequence[torch.Tensor], batch_size: int | None
                  ) -> list[torch.Tensor]:
    """Images [N, C, H, W] (or a list of batches) as a list of batches of ``batch_size``."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 3:
            inputs = inputs.unsqueeze(0)
        if inputs.dim() != 4:
            raise ValueError(f"inputs must be [N, C, H, W] images, got shape {list(inputs.shape)}")
        bs = inputs.shape[0] if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return list(inputs.split(bs))
    batches = [b.unsqueeze(0) if b.dim() == 3 else b for b in inputs]
    if not batches:
        raise ValueError("no input images")
    return batches


def default_threads() -> int:
    """torch threads per party process: the cores shared by three parties (at least 1).
    More threads than cores make OpenMP workers spin against each other."""
    return max(1, (os.cpu_count() or 1) // 3)


def _emulate(party: Party, network: NetworkProfile | None) -> None:
    if network is not None:
        party.wrap_links(lambda link: EmulatedLink(link, network))


def _local_party(party: Party, private: Any, program: Program, threads: int | None = None,
                 network: NetworkProfile | None = None) -> dict[str, Any]:
    """Body of one local party process: run the program on this role's private input only
    (client: the image batches; server: the weights; helper: None); the DReLU and the limits
    come with the party's options."""
    torch.set_num_threads(threads or default_threads())
    _emulate(party, network)
    images = private if party.role == ROLE_CLIENT else None
    weights = private if party.role == ROLE_SERVER else None
    return run_party(party, program, images=images, weights=weights)


def truncation_report(program: Program, weights: Weights, batches: Sequence[torch.Tensor],
                      frac_bits: int) -> dict[str, Any]:
    """The report's ``accuracy`` section: the expected number of catastrophic truncation
    failures per image for these inputs (:func:`~.compile.truncation_failures`). Only a caller
    that holds both the model and the images can compute it (``run_local``); in a three-host
    run nobody does, and the server operator computes it on representative images."""
    x = torch.cat([b.double() for b in batches])
    t = truncation_failures(program, weights, x, frac_bits)
    _, ambiguous = error_std(program, weights, x, frac_bits)
    return {"frac_bits": frac_bits,
            "expected_truncation_failures_per_image": t["per_image"],
            "truncated_values_per_image": t["values"],
            "ambiguous_block_decisions_per_image": len(ambiguous) / x.shape[0],
            "ambiguous_what": "Block-ReLU patches whose plaintext sum lies within 8 standard "
                              "deviations of the fixed-point error of zero: the secure run may "
                              "decide them the other way (the whole patch kept or zeroed), "
                              "a deviation from plaintext that is not a truncation failure; "
                              "more fractional bits make them rarer "
                              "(secure_inference.mpc.compile.error_bound bounds their effect)",
            "what": "a local truncation fails with probability |v|/2^64 (v: the ring value "
                    "before the shift, about |x|·2^(2f)); a failure puts an error near "
                    "2^(64-2f) into one value. One more fractional bit quadruples it"}


def run_program(program: Program, weights: Weights, batches: list[torch.Tensor], *,
                tls: bool = True, frac_bits: int = DEFAULT_FRAC_BITS,
                drelu: DReLUConfig | None = None, timeout: float = RUN_TIMEOUT,
                in_process: bool = False, certs_dir: str | os.PathLike | None = None,
                host: str = "127.0.0.1", threads: int | None = None,
                limits: SessionLimits | None = None, device: Devices = "cpu",
                prg: PrgChoice = DEFAULT_CIPHER,
                network: str | NetworkProfile | None = None,
                preprocess: str = DEFAULT_PREPROCESS) -> list[dict[str, Any]]:
    """Run a compiled program with three parties; returns their :func:`run_party` results.

    ``in_process=True`` uses threads and in-memory links (fast tests); otherwise three
    processes over loopback TCP, each reading only its own private input, with ``threads``
    torch threads each (default :func:`default_threads`). ``limits``: what the server and
    helper accept (:class:`~.party.SessionLimits`); default: the defaults, raised as far as
    these ``batches`` need (the caller is the client). ``device``: one torch device for all
    three parties or one per role (client, server, helper); CPU by default. ``prg``: the
    cipher of the correlated randomness, ``"aes"`` (default) or ``"chacha20"`` (drawn on
    each party's device); see :mod:`.prg`. ``network``: emulate that network on every link
    (:mod:`.netem`: a profile name such as ``"WAN-40ms"`` or ``"MBITS:RTT_MS"``).
    ``preprocess``: ``"ahead"`` or ``"interleaved"`` (:data:`~.options.PREPROCESS_MODES`).
    """
    network = None if network is None else network_profile(network)
    if limits is None:
        limits = SessionLimits.admitting([b.shape[0] for b in batches])
    # the session's options, built once: every party gets them (its own device and cipher)
    options = role_options(SessionOptions(frac_bits=frac_bits, drelu=drelu, timeout=timeout,
                                          limits=limits, preprocess=preprocess), device, prg)
    if in_process:
        def fn(party: Party) -> dict[str, Any]:
            _emulate(party, network)
            return run_party(party, program,
                             images=batches if party.role == ROLE_CLIENT else None,
                             weights=weights if party.role == ROLE_SERVER else None)
        return run_in_process(fn, options=options)
    # private inputs travel by value through each party's own pipe: no files to leave behind
    private = {ROLE_CLIENT: [b.detach().cpu() for b in batches], ROLE_SERVER: weights}
    fn = functools.partial(_local_party, program=program, threads=threads, network=network)
    return run_local_processes(fn, tls=tls, certs_dir=certs_dir, host=host, private=private,
                               options=options)


def run_local(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor],
              spec: dict | None = None, *, batch_size: int | None = None, tls: bool = True,
              frac_bits: int = DEFAULT_FRAC_BITS, drelu_bits: int | None = None,
              drop_bits: int = 0, drelu_width: int | None = None,
              margin: float | None = None, timeout: float = RUN_TIMEOUT, in_process: bool = False,
              threads: int | None = None,
              report_path: str | os.PathLike | None = None,
              plot_path: str | os.PathLike | None = None,
              meta: dict[str, Any] | None = None,
              limits: SessionLimits | None = None, device: Devices = "cpu",
              prg: str = DEFAULT_CIPHER,
              network: str | NetworkProfile | None = None,
              preprocess: str = DEFAULT_PREPROCESS) -> LocalResult:
    """Secure inference of ``model`` (with the Block-ReLU ``spec`` applied, if given) on
    ``inputs`` [N, C, H, W] by three local processes over loopback TCP (TLS by default).

    Returns the revealed outputs [N, ...] (float64; what the client learns) and the run report
    (:func:`~.report.build_report`); ``report_path``/``plot_path`` also write them to files.
    A calibrated ``spec`` (:func:`~.calibrate.calibrate`) gives every calibrated DReLU layer
    its own comparison width (its range times ``margin``, default the calibration's);
    ``drelu_width=64`` ignores the calibration, another value sets every DReLU layer's width.
    ``drelu_bits``/``drop_bits`` select an approximate DReLU for the layers without a width;
    ``frac_bits`` the fixed point;
    ``threads`` the torch threads of each party process; ``limits`` what the server and
    helper accept (default: enough for ``inputs``, see :func:`run_program`); ``device`` one
    torch device for all parties or one per role (client, server, helper); ``prg`` the
    cipher of the correlated randomness (``"aes"`` or ``"chacha20"``, see :mod:`.prg`);
    ``network`` emulates a network on every link (:mod:`.netem`; the report's ``networks``
    section estimates the same from bytes and rounds, for comparison). ``preprocess``: when
    the input-independent half of the conv/linear layers runs, ``"interleaved"`` (default:
    inside each layer, on the cores the other parties leave idle) or ``"ahead"`` (its own
    phase before the images, reported apart); the same messages and bytes
    (:data:`~.options.PREPROCESS_MODES`).
    """
    if not in_process:
        refuse_in_bootstrap()   # a party process re-running a script without a main guard
    check_cipher(prg)
    batches = split_batches(inputs, batch_size)
    for b in batches:
        check_inputs(b, frac_bits, what="the inputs")
    shape = (batches[0].shape[0],) + tuple(batches[0].shape[1:])
    program, weights = compile_model(model, shape, spec=spec, frac_bits=frac_bits,
                                     drelu_width=drelu_width, margin=margin)
    cfg = drelu_config(drelu_bits, drop_bits)
    results = run_program(program, weights, batches, tls=tls, frac_bits=frac_bits, drelu=cfg,
                          timeout=timeout, in_process=in_process, threads=threads,
                          limits=limits, device=device, prg=prg, network=network,
                          preprocess=preprocess)
    info = {"frac_bits": frac_bits, "drelu": str(cfg) if cfg else "exact",
            "preprocess": preprocess,
            "drelu_widths": "calibrated" if program.frac_bits is not None else
            ("uniform" if drelu_width not in (None, 64) else "64"), "prg": prg,
            "tls": tls,
            "transport": "in-process" if in_process else "loopback TCP, 3 processes",
            "device": device if isinstance(device, str) else [str(d) for d in device],
            "emulated_network": None if network is None else network_profile(network).describe()}
    info.update(meta or {})
    report = build_report(program, results, meta=info)
    report["accuracy"] = truncation_report(program, weights, batches, frac_bits)
    if report_path is not None:
        save_report(report, report_path)
    if plot_path is not None:
        plot_report(report, plot_path)
    outputs = torch.cat(results[ROLE_CLIENT]["outputs"], dim=0)
    return LocalResult(outputs=outputs, report=report, program=program)
