"""The per-role executor of a compiled :class:`~secure_inference.mpc.program.Program`.

:func:`run_party` is what each of the three processes runs once the links are up:

* P0 (client) passes its images; they are encoded in fixed point and secret-shared (no
  traffic: P1's share comes from the P0–P1 key), and only P0 receives the output;
* P1 (server) passes the compiled :class:`~secure_inference.mpc.program.Weights`; they are
  masked and opened once per session (:func:`~.protocols.linear.open_weights`), then every
  image uses them in one round per linear layer;
* P2 (helper) passes neither: it runs the same program on shape-only placeholders.

The public information all three share: the program (architecture, block sizes), the number
of images per batch and the image size (announced by the client at the start), the
fixed-point, DReLU and randomness (``prg``) settings.

Every layer runs in a statistics scope named after it, so the bytes and rounds per layer can
be read from ``party.stats`` (see :mod:`.report`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from .ops import layer_drelus, op_of
from .program import FINGERPRINT_PARTS, Layer, Program, Weights
from .protocols.linear import check_weight_bound, open_weights, preprocess, reconstruct, share
from .protocols.drelu import resolve_config, set_default_config
from .prg import cipher_code, cipher_name
from .settings import DReLUConfig
from .ring import decode, encode
from .session import SCOPE_HEADER, SCOPE_OUTPUT, SCOPE_PREPROCESS, SCOPE_REPORT
from .stats import CommStats, ScopeStats
from .errors import ProtocolError
# SessionLimits and the batch ceilings live in .options (imported here for use, not export)
from .options import MAX_BATCHES, PREPROCESS_MODES, SessionLimits
from .runtime import Party
from .session import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER


__all__ = ["run_party", "check_program", "gather_results", "run_layer", "layer_drelus",
           "preprocess_batch",
           "PROTOCOL_VERSION", "SESSION_SETTINGS", "session_settings"]

def run_layer(party: Party, layer: Layer, ins: list[torch.Tensor],
              weights: Weights | None, pre: dict | None = None) -> torch.Tensor:
    """This party's share of one layer's output (P2: a placeholder), by the layer's op
    (:mod:`.ops`). ``pre``: the batch's :func:`preprocess_batch` output (server-weight layers
    then run their online half only)."""
    return op_of(layer).run_secure(party, layer, ins, weights, pre)


def preprocess_batch(party: Party, program: Program, batch: int) -> dict:
    """The input-independent half of every layer with server weights for a batch of ``batch``
    images (:func:`~.protocols.linear.preprocess`), before the images enter."""
    items = []
    for layer in program.layers:
        op = op_of(layer)
        if not op.server_weights:
            continue
        src = program.layers[layer.inputs[0]].shape
        x_shape = (int(batch),) + tuple(src[1:])
        items.append((layer.name, x_shape, layer.attrs["weight_shape"], op.ring_op(party, layer)))
    return preprocess(party, items, scope=SCOPE_PREPROCESS)


def _announce_batches(party: Party, batch_sizes: Sequence[int] | None,
                      limits: SessionLimits | None = None) -> list[int]:
    """The client tells the others how many images each batch holds (public). The server and
    the helper check the announcement against ``limits`` before allocating anything for it."""
    limits = limits or party.options.limits
    who = f"party {party.role} ({'server' if party.role == ROLE_SERVER else 'helper'})"
    with party.scope(SCOPE_HEADER):
        if party.role == ROLE_CLIENT:
            sizes = torch.tensor([int(b) for b in batch_sizes], dtype=torch.int64)
            for p in (ROLE_SERVER, ROLE_HELPER):
                party.send(p, torch.tensor([sizes.numel()], dtype=torch.int64))
                party.send(p, sizes)
            return sizes.tolist()
        count = int(party.recv(ROLE_CLIENT, (1,))[0])
        if not 0 < count <= min(MAX_BATCHES, limits.max_images):  # before receiving the list
            raise ProtocolError(
                f"{who}: the client announced {count} batches; this party accepts 1 to "
                f"{min(MAX_BATCHES, limits.max_images)} (at most one batch per image, "
                f"max_images={limits.max_images}: raise it with --max-images on the server and "
                "the helper)")
        sizes = party.recv(ROLE_CLIENT, (count,)).tolist()
        bad = [s for s in sizes if not 0 < s <= limits.max_batch]
        if bad:
            raise ProtocolError(
                f"{who}: the client announced a batch of {bad[0]} images; this party accepts 1 "
                f"to {limits.max_batch} per batch (max_batch={limits.max_batch}): use a smaller "
                "--batch-size on the client, or raise the limit with --max-batch on the server "
                "and the helper")
        if sum(sizes) > limits.max_images:
            raise ProtocolError(
                f"{who}: the client announced {sum(sizes)} images for this session; this party "
                f"accepts at most {limits.max_images} (max_images): send fewer images per "
                "session, or raise the limit with --max-images on the server and the helper")
        return sizes


# wire protocol: 2 = fused multiplication re-masked with ζ (issue 12); 3 = the DReLU's small
# values mod 67 drawn from one stream per tag, rejected words replaced by the stream's next
# ones (was: a new stream per block and per redraw), so parties of 2 and 3 draw differently
# 4 = per-layer comparison widths and the program's part digests in the header (96 bytes)
# 5 = PrivateCompare's masks s and u drawn as one value (s − 1)·67 + u per compared bit
# 6 = the preprocessing schedule (ahead / interleaved) in the header's first word
PROTOCOL_VERSION = 6

# The public settings that change the computation, besides the program itself: (name, how the
# user sets it). They travel as four int64 words after the 32-byte fingerprint; ``prg`` (the
# cipher of the correlated randomness, code 0 = aes) rides in bits 32–39 of the first word and
# ``preprocess`` (the schedule, code 0 = ahead; both orders draw the same masks under other
# stream names, so parties that differ would combine unrelated masks) in bits 40–47. Since
# protocol version 4 the header ends with the 8-byte digests of FINGERPRINT_PARTS (96 bytes in
# all), so that a mismatch names the part that differs (before: 64 bytes).
SESSION_SETTINGS = (("protocol_version", "the same secure-inference release on all three hosts"),
                    ("frac_bits", "the same --frac-bits (session file: frac_bits)"),
                    ("drelu_ring_bits", "the same --drelu-bits (session file: drelu_bits)"),
                    ("drelu_drop_bits", "the same --drop-bits (session file: drop_bits)"),
                    ("prg", "the same --prg (session file: prg)"),
                    ("preprocess", "the same --preprocess (session file: preprocess)"))


def session_settings(party: Party) -> list[int]:
    """This party's values of :data:`SESSION_SETTINGS` (after :func:`set_default_config`)."""
    cfg = resolve_config(party, None)
    return [PROTOCOL_VERSION, party.frac_bits, cfg.ring_bits, cfg.drop_bits,
            cipher_code(party.prg), PREPROCESS_MODES.index(party.options.preprocess)]


def _pack_settings(values: list[int]) -> list[int]:
    """The four header words of :func:`session_settings` (``prg`` and ``preprocess`` above
    the version)."""
    version, frac_bits, ring_bits, drop_bits, prg, schedule = values
    return [version | (prg << 32) | (schedule << 40), frac_bits, ring_bits, drop_bits]


def _unpack_settings(words: list[int]) -> list[int]:
    """The inverse of :func:`_pack_settings`."""
    first, frac_bits, ring_bits, drop_bits = words
    return [first & 0xFFFFFFFF, frac_bits, ring_bits, drop_bits, (first >> 32) & 0xFF,
            (first >> 40) & 0xFF]


def _shown(name: str, value: int) -> str:
    if name == "prg":
        return f"prg={cipher_name(value)}"
    if name == "preprocess":
        shown = PREPROCESS_MODES[value] if 0 <= value < len(PREPROCESS_MODES) else value
        return f"preprocess={shown}"
    return f"{name}={value}"


def check_program(party: Party, program: Program) -> None:
    """All three parties exchange the program's fingerprint and every public setting that
    changes the computation (fixed point, DReLU, the randomness cipher, protocol version,
    the digests of the program's parts: 96 bytes each way) and stop with an error naming
    what differs if they do not all agree: a
    mismatch would otherwise give a silently wrong answer (a server at f = 12 against f = 16
    elsewhere returns 1.7e10 where the plaintext gives 0.29; parties drawing with different
    ciphers hold unrelated masks)."""
    values = session_settings(party)
    parts = program.fingerprint_parts()
    mine = torch.cat([torch.frombuffer(bytearray(program.fingerprint()), dtype=torch.uint8),
                      torch.tensor(_pack_settings(values), dtype=torch.int64).view(torch.uint8),
                      torch.frombuffer(bytearray(b"".join(parts[name] for name, _ in
                                                          FINGERPRINT_PARTS)), dtype=torch.uint8)])
    size = mine.numel()
    with party.scope(SCOPE_HEADER):
        others = [p for p in (ROLE_CLIENT, ROLE_SERVER, ROLE_HELPER) if p != party.role]
        for p in others:
            party.send(p, mine)
        for p in others:
            theirs = party.recv(p, (size,), torch.uint8).cpu()
            if torch.equal(theirs, mine):
                continue
            got = _unpack_settings(theirs[32:64].clone().view(torch.int64).tolist())
            diff = [(name, fix, a, b) for (name, fix), a, b in zip(SESSION_SETTINGS, values, got)
                    if a != b]
            if diff:
                raise ProtocolError(f"party {party.role}: party {p} runs " + ", ".join(
                    _shown(name, b) for name, _, _, b in diff) + ", this party " + ", ".join(
                    _shown(name, a) for name, _, a, _ in diff) + "; all three parties need "
                    + "; ".join(fix for _, fix, _, _ in diff))
            differ = [(name, fix) for k, (name, fix) in enumerate(FINGERPRINT_PARTS)
                      if not torch.equal(theirs[64 + 8 * k:72 + 8 * k], mine[64 + 8 * k:72 + 8 * k])]
            if not differ:
                differ = [("program", "the same secure-inference release and settings")]
            raise ProtocolError(f"party {party.role}: party {p} compiled a different program: "
                                + " and ".join(name for name, _ in differ) + " differ; all "
                                "three parties need " + "; ".join(fix for _, fix in differ))


def _barrier(party: Party) -> None:
    """Every party tells both others it is ready and waits for theirs (one byte each way)."""
    with party.scope(SCOPE_HEADER):
        others = [p for p in (ROLE_CLIENT, ROLE_SERVER, ROLE_HELPER) if p != party.role]
        for p in others:
            party.send(p, torch.ones(1, dtype=torch.uint8))
        for p in others:
            if int(party.recv(p, (1,), torch.uint8)[0]) != 1:
                raise ProtocolError(f"party {party.role}: bad ready message from party {p}")


def check_server_weights(party: Party, program: Program, weights: Weights) -> None:
    """Every server-weight layer's weights checked before the session starts (present, the
    public shape, within the encoding bound): a failure at layer k mid-session would tell the
    client which layer's weights are large."""
    for layer in program.layers:
        if not op_of(layer).server_weights:
            continue
        entry = weights.get(layer.name) if isinstance(weights, dict) else None
        if not entry or entry.get("weight") is None:
            raise ValueError(f"the server has no weights for layer '{layer.name}'")
        w = entry["weight"]
        shape = tuple(layer.attrs["weight_shape"])
        if tuple(w.shape) != shape:
            raise ValueError(f"weights of '{layer.name}' have shape {list(w.shape)}, public "
                             f"shape is {list(shape)}")
        # the largest magnitude decides (rounding is monotone and symmetric): encode one value
        # instead of a copy of every weight (open_weights encodes them once, later)
        check_weight_bound(layer.name, encode(w.detach().abs().max().reshape(1), party.frac_bits),
                           party.frac_bits)


def run_party(party: Party, program: Program, *, images: Sequence[torch.Tensor] | None = None,
              weights: Weights | None = None, drelu: DReLUConfig | None = None,
              on_batch: Callable[[int], None] | None = None,
              limits: SessionLimits | None = None) -> dict[str, Any]:
    """Run the program for every batch in ``images`` (client) with ``weights`` (server).

    Returns a dict: ``outputs`` (client: list of float64 tensors, one per batch; others:
    None), ``stats`` (this party's :class:`~.stats.CommStats`), ``layer_seconds`` (wall time
    per layer summed over batches), ``setup_seconds``, ``preprocess_seconds`` (the
    input-independent work of every batch, before its images enter; 0 with the session's
    ``preprocess="interleaved"``, where that work runs inside the layers), ``online_seconds``
    (from the images to the output, all batches), ``batch_sizes``.
    ``cpu_seconds``: CPU time of this party's process (all threads) during the run.
    ``on_batch(n)`` is called after each batch of n images (progress bars).
    ``limits`` (server and helper; default: the party's ``options.limits``): the largest batch
    and session accepted from the client's announcement, checked before any allocation.
    ``drelu``: overrides the session's DReLU (default: the party's ``options.drelu``).
    """
    if party.role == ROLE_CLIENT:
        if not images:
            raise ValueError("the client (P0) must pass at least one batch of images")
        for img in images:
            if img.dim() != 4 or tuple(img.shape[1:]) != tuple(program.input_shape[1:]):
                raise ValueError(f"images must be batches [N, {', '.join(map(str, program.input_shape[1:]))}]"
                                 f" (the compiled input size), got {list(img.shape)}")
    elif images is not None:
        raise ValueError(f"only the client passes images, party {party.role} got some")
    if party.role == ROLE_SERVER and weights is None:
        raise ValueError("the server (P1) must pass the weights")
    if party.role != ROLE_SERVER and weights is not None:
        raise ValueError(f"only the server holds weights, party {party.role} got some")
    if program.frac_bits is not None and program.frac_bits != party.frac_bits:
        raise ValueError(f"the program's comparison widths were chosen for frac_bits="
                         f"{program.frac_bits} but this party runs frac_bits={party.frac_bits}: "
                         "compile with the session's --frac-bits")
    if party.role == ROLE_SERVER:
        check_server_weights(party, program, weights)
    cpu0 = time.process_time()
    if drelu is not None:   # else the session's, from the party's options
        set_default_config(party, drelu)
    check_program(party, program)
    sizes = _announce_batches(party, [im.shape[0] for im in images] if images else None,
                              limits)
    # set-up: open every weight once for the session
    t0 = time.perf_counter()
    for layer in program.layers:
        if op_of(layer).server_weights:
            w = weights[layer.name]["weight"] if party.role == ROLE_SERVER else None
            open_weights(party, w, weight_shape=layer.attrs["weight_shape"], name=layer.name)
            op_of(layer).prepare(party, layer, program.layers[layer.inputs[0]].shape)
    setup_seconds = time.perf_counter() - t0
    _barrier(party)  # the online clocks start together, not when each party's set-up ended
    layer_seconds = {layer.name: 0.0 for layer in program.layers}
    outputs = []
    preprocess_seconds = online_seconds = 0.0
    for b, n in enumerate(sizes):
        t = time.perf_counter()
        # interleaved: every server-weight layer computes its mask products when it runs
        pre = preprocess_batch(party, program, n) if party.options.preprocess == "ahead" else {}
        t1 = time.perf_counter()
        if pre:
            preprocess_seconds += t1 - t
        shape = (int(n),) + tuple(program.input_shape[1:])
        vals: list[torch.Tensor] = []
        for layer in program.layers:
            t = time.perf_counter()
            if layer.op == "input":
                x = None
                if party.role == ROLE_CLIENT:
                    x = encode(images[b].to(torch.float64), party.frac_bits, device=party.device)
                y = share(party, x, ROLE_CLIENT, shape, scope=layer.name)
            else:
                y = run_layer(party, layer, [vals[j] for j in layer.inputs], weights, pre)
            layer_seconds[layer.name] += time.perf_counter() - t
            vals.append(y)
        out = reconstruct(party, vals[program.output], to=ROLE_CLIENT, scope=SCOPE_OUTPUT)
        if party.role == ROLE_CLIENT:
            outputs.append(decode(out, party.frac_bits))
        online_seconds += time.perf_counter() - t1
        del pre
        if on_batch is not None:
            on_batch(int(n))
    return {"outputs": outputs if party.role == ROLE_CLIENT else None, "stats": party.stats,
            "layer_seconds": layer_seconds, "setup_seconds": setup_seconds,
            "online_seconds": online_seconds, "preprocess_seconds": preprocess_seconds,
            "batch_sizes": sizes, "role": party.role,
            "cpu_seconds": time.process_time() - cpu0}


_SUMMARY_LIMIT = 64 << 20


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    st = result["stats"]
    return {"scopes": st.as_dict(), "clock": st.clock,
            "layer_seconds": result["layer_seconds"], "setup_seconds": result["setup_seconds"],
            "online_seconds": result["online_seconds"],
            "preprocess_seconds": result.get("preprocess_seconds", 0.0),
            "batch_sizes": result["batch_sizes"],
            "cpu_seconds": result.get("cpu_seconds", 0.0)}


def _stats_from_summary(data: dict[str, Any]):
    st = CommStats()
    st.clock = int(data["clock"])
    for path, d in data["scopes"].items():
        s = ScopeStats()
        for key in ("bytes_sent", "bytes_recv", "frames_sent", "frames_recv"):
            for peer, v in d[key].items():
                getattr(s, key)[int(peer)] = int(v)
        s.overhead_sent, s.rounds, s.calls = int(d["overhead_sent"]), int(d["rounds"]), int(d["calls"])
        st.scopes[str(path)] = s
    return st


def gather_results(party: Party, result: dict[str, Any]) -> list[dict[str, Any]] | None:
    """After a run, the server and helper send the client their traffic counters and timings
    (no data: what an observer of the links sees anyway) so the client can write the full
    report; returns the three results at the client, None elsewhere."""
    import json
    with party.scope(SCOPE_REPORT):
        if party.role != ROLE_CLIENT:
            blob = json.dumps(_summary(result)).encode()
            party.send(ROLE_CLIENT, torch.tensor([len(blob)], dtype=torch.int64))
            party.send(ROLE_CLIENT, torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            return None
        out = [result, None, None]
        for p in (ROLE_SERVER, ROLE_HELPER):
            n = int(party.recv(p, (1,))[0])
            if not 0 < n <= _SUMMARY_LIMIT:
                raise ProtocolError(f"party {p} announced a report of {n} bytes")
            raw = party.recv(p, (n,), torch.uint8).cpu().numpy().tobytes()
            try:
                data = json.loads(raw)
                out[p] = {"stats": _stats_from_summary(data),
                          "layer_seconds": {str(k): float(v) for k, v in data["layer_seconds"].items()},
                          "setup_seconds": float(data["setup_seconds"]),
                          "online_seconds": float(data["online_seconds"]),
                          "preprocess_seconds": float(data.get("preprocess_seconds", 0.0)),
                          "cpu_seconds": float(data.get("cpu_seconds", 0.0)),
                          "batch_sizes": [int(b) for b in data["batch_sizes"]], "role": p}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ProtocolError(f"party {p} sent a malformed report: {exc}") from None
        return out
