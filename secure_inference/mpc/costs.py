"""Exact communication of a compiled program without running it: online bytes and rounds per
layer, the preprocessing and the set-up, from the public program alone (what a run's report
measures; ``tests/mpc/test_torchvision_families.py`` checks the two agree exactly).

Per layer (n output values, batch included):

* conv2d / linear: E = x0 − A, 8 bytes per input value (P0 → P1); with the default
  ``interleaved`` schedule also the helper's correction c1, 8 bytes per output value (P2 → P1;
  ``ahead``: in the preprocessing instead); both ride behind the previous layer's last
  message, so the report counts no round of its own;
* relu, block_relu, block_relu6, max pooling (ceil mode, adaptive): their
  DReLU-multiplications (:mod:`.protocols.relu`), 3 rounds per comparison level (Block-ReLU6:
  two comparisons per patch and two payload values per pixel in one call, 3 rounds);
* clamp / ReLU6, hardsigmoid, approximated sigmoid/tanh/SiLU/GELU: k ReLUs per element in one
  call (:func:`.protocols.activations.piecewise_linear_bytes`), 3 rounds;
* hardswish: hardsigmoid then a Beaver product, 4 rounds; mul: the Beaver product, 1 round;
* every other layer is local: 0 bytes, 0 rounds.

Online totals add the output (P1's share of the logits: 8 bytes per value, 1 round).
"""
from __future__ import annotations

import math

from .ops import layer_drelu_config, op_of
from .options import DEFAULT_PREPROCESS
from .program import Layer, Program
from .protocols import activations as A
from .protocols import relu as R
from .protocols.drelu import EXACT

__all__ = ["layer_cost", "program_cost"]

_LOCAL_ROUNDS = 0


def layer_cost(program: Program, layer: Layer, batch: int = 1,
               preprocess: str = DEFAULT_PREPROCESS) -> tuple[int, int]:
    """(online payload bytes of all parties, rounds) of one layer for a batch of ``batch``;
    with the ``"interleaved"`` schedule a conv/linear layer also carries its correction c1
    (8 bytes per output value, P2 → P1, alongside E: no round of its own)."""
    def shape(ly: Layer) -> tuple[int, ...]:
        return (int(batch),) + tuple(ly.shape[1:])

    ins = [program.layers[j] for j in layer.inputs]
    out = shape(layer)
    n = math.prod(out)
    cfg = layer_drelu_config(layer) or EXACT
    op = layer.op
    if op in ("conv2d", "linear"):
        c1 = 8 * n if preprocess == "interleaved" else 0
        return 8 * math.prod(shape(ins[0])) + c1, 0
    if op == "relu":
        return R.relu_bytes(n, cfg), 3
    if op == "block_relu":
        return R.block_relu_bytes(out, layer.attrs["block_sizes"], cfg), 3
    if op == "block_relu6":
        return R.block_relu6_bytes(out, layer.attrs["block_sizes"], cfg), 3
    if op == "max_pool":
        a = layer.attrs
        plan = R.max_pool_plan(shape(ins[0]), a["kernel_size"], a["stride"], a["padding"],
                               ceil_mode=bool(a.get("ceil_mode", False)))
        return R.plan_bytes(plan, cfg), 3 * len(plan.levels)
    if op == "adaptive_max_pool":
        plan = R.adaptive_max_pool_plan(shape(ins[0]), layer.attrs["output_size"])
        return R.plan_bytes(plan, cfg), 3 * len(plan.levels)
    if op in ("clamp", "hardsigmoid", "approx"):
        return A.piecewise_linear_bytes(n, op_of(layer).table(layer), cfg), 3
    if op == "hardswish":
        return A.hardswish_bytes(n, cfg), 4
    if op == "mul":
        return A.mul_bytes(math.prod(shape(ins[0])), math.prod(shape(ins[1])), n), 1
    if op_of(layer).drelus(layer, out):
        raise ValueError(f"no cost rule for the comparisons of op {op!r}")
    return 0, _LOCAL_ROUNDS


def program_cost(program: Program, batch: int = 1, preprocess: str = DEFAULT_PREPROCESS
                 ) -> dict[str, int]:
    """Exact payload bytes and rounds of one batch: ``online_bytes`` / ``online_rounds``
    (layers plus the output), ``preprocess_bytes`` (8 per conv/linear output value, 1 round;
    with the ``"interleaved"`` schedule those bytes travel inside the layers and count as
    online) and ``setup_bytes`` (8 per server weight, once per session), and the ``drelus``."""
    online = rounds = 0
    for layer in program.layers:
        b, r = layer_cost(program, layer, batch, preprocess)
        online, rounds = online + b, rounds + r
    out = program.layers[program.output]
    online += 8 * batch * math.prod(out.shape[1:])
    rounds += 1
    pre = sum(8 * batch * math.prod(ly.shape[1:]) for ly in program.layers
              if ly.op in ("conv2d", "linear"))
    setup = sum(8 * math.prod(ly.attrs["weight_shape"]) for ly in program.layers
                if ly.op in ("conv2d", "linear"))
    if preprocess == "interleaved":   # the layers carry it (layer_cost)
        pre = 0
    return {"online_bytes": online, "online_rounds": rounds, "preprocess_bytes": pre,
            "setup_bytes": setup, "drelus": sum(program.drelus(batch=batch).values())}
