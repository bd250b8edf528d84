#!/usr/bin/env python
"""Peak memory of each party when the client announces hostile batch sizes (issue 13 item 2).

A hostile client runs the session start honestly (program check, announcement, weight
opening, preprocessing of its first batch) and then disconnects without sending an image:
what it costs the server and the helper is set by the announced batch alone. For each case
the three parties run as processes over loopback TLS (``run_local_processes``) and each
reports its peak resident memory (``VmHWM`` of /proc/self/status; ``ru_maxrss`` elsewhere)
and its resident memory before the session (the process image with torch loaded).

Cases: the announced batch against the server's/helper's limits (``SessionLimits``): the
default limits with batches up to and over ``max_batch``, and the limits raised to admit a
batch of ``--big`` images (default 2048; the code accepted up to 65,536 before the
limits existed). Not run in CI:

    .venv/bin/python benchmark/mpc/hostile_memory.py [--big 2048] [--json out.json]
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

from secure_inference.mpc.compile import compile_model  # noqa: E402
from secure_inference.mpc.options import SessionLimits  # noqa: E402
from secure_inference.mpc.errors import ProtocolError  # noqa: E402
from secure_inference.mpc.harness import run_local_processes  # noqa: E402

CHW = (3, 16, 16)


def tiny_model() -> nn.Module:
    """A small CNN: two 3×3 convs of 16 channels with ReLUs, then a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * CHW[1] * CHW[2], 10)).eval()


def _memory_kib() -> tuple[int, int]:
    """(current, peak) resident memory of this process in KiB."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak, peak


def _hostile_client(party, program, batch: int) -> None:
    """Follow the protocol up to the first batch's preprocessing, then leave."""
    from secure_inference.mpc import party as P
    from secure_inference.mpc.protocols.linear import open_weights
    P.check_program(party, program)
    P._announce_batches(party, [batch], None)
    for layer in program.layers:
        if layer.op in ("conv2d", "linear"):
            open_weights(party, None, weight_shape=layer.attrs["weight_shape"], name=layer.name)
    P._barrier(party)
    P.preprocess_batch(party, program, batch)


def party_fn(party, program, weights, batch: int, limits: SessionLimits) -> dict:
    """One party of a case: returns its memory figures and how its session ended."""
    from secure_inference.mpc.party import run_party
    base, _ = _memory_kib()
    start = time.perf_counter()
    outcome = "finished"
    try:
        if party.role == 0:
            _hostile_client(party, program, batch)
            outcome = "left after preprocessing"
        else:
            run_party(party, program, weights=weights if party.role == 1 else None,
                      limits=limits)
    except ProtocolError as exc:
        text = str(exc)
        if "announced" in text:
            outcome = "refused: " + text.split(";")[0].split(": ", 1)[-1]
        elif "closed the link" in text:
            outcome = "stopped: a peer closed the link"
        else:
            outcome = "stopped: " + text[:80]
    _, peak = _memory_kib()
    return {"role": party.role, "base_kib": base, "peak_kib": peak, "outcome": outcome,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=2048, help="the hostile batch (default 2048)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    program, weights = compile_model(tiny_model(), (1,) + CHW)
    default = SessionLimits()
    raised = SessionLimits(max_batch=args.big, max_images=max(args.big, default.max_images))
    cases = [(1, default), (default.max_batch, default), (default.max_batch + 1, default),
             (args.big, default), (args.big, raised)]
    rows = []
    print(f"model: 2 convs 3->16->16 (3x3) + linear, input {list(CHW)}; three processes, "
          "loopback TLS", file=sys.stderr)
    header = (f"{'announced':>9} {'max_batch':>9} | " +
              " | ".join(f"{n:>22}" for n in ("client peak (base) MiB", "server peak (base) MiB",
                                              "helper peak (base) MiB")) + " | server/helper")
    print(header)
    print("-" * len(header))
    for batch, limits in cases:
        fn = functools.partial(party_fn, program=program, weights=weights, batch=batch,
                               limits=limits)
        res = run_local_processes(fn, tls=True, timeout=120, wall_timeout=1200)
        cells = [f"{r['peak_kib'] / 1024:>13.0f} ({r['base_kib'] / 1024:>4.0f})" for r in res]
        print(f"{batch:>9} {limits.max_batch:>9} | " + " | ".join(f"{c:>22}" for c in cells) +
              f" | {res[1]['outcome']} / {res[2]['outcome']}", flush=True)
        rows.append({"announced": batch, "max_batch": limits.max_batch,
                     "max_images": limits.max_images, "parties": res})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
