"""Every party's view against its own randomness.

A message is safe only if it is masked by fresh randomness that its receiver neither holds nor
dealt nor can recompute. Marginal uniformity cannot show that (a share whose masks the
receiver dealt is uniform on its own and still determined by what the receiver knows), so for
each receiver R and each protocol these tests run the protocol many times with **R's two pair
keys fixed** and only the key of the other two parties resampled (the test hook
``_run_in_process_with_keys``; protocols draw no other randomness), and check:

1. *masking*: every element of every message R receives changes when only the other pair's
   key changes, except what the protocol is meant to reveal (:data:`PUBLIC`);
2. *indistinguishability*: for two different secrets (images and server weights) R's
   received messages follow the same distribution: per message, a two-sample chi-square test
   over every (element, bit) of the counts of ones in the two sets of runs.
3. *the view table*: R receives exactly the messages docs/secure_inference.md lists for it
   (scope and sender; :data:`VIEW_TABLE`).

Sizing. Masked elements are uniform over ≥ 2^8 values (ring elements, ℓ-bit openings) or
over 67^k (packed Z_67 words), so an element stays equal across the RUNS − 1 resamples with
probability below 2^-80. The old fused-multiplication leak (P1's raw share sent to P2) makes
P2's message a fixed function of the secret once P2's keys are fixed: test 1 fails on every
element, and test 2 sees each differing bit contribute 2·RUNS instead of ≈ 1 to a statistic
with mean df: z ≈ (RUNS − 1)·sqrt(df/2) ≥ 100 standard deviations for these sizes, against a
threshold of 6.5 (false alarm below 1e-10 per message).
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

import secure_inference as si
from secure_inference.mpc import protocols as P
from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.trace import assign_widths
from secure_inference.widths import Calibration
from secure_inference.mpc.party import run_party
from secure_inference.mpc.protocols import drelu as D
from secure_inference.mpc.protocols import activations as A
from secure_inference.mpc.protocols import pwl
from secure_inference.mpc.protocols import relu as R
from secure_inference.mpc.ring import encode
from secure_inference.mpc.harness import _run_in_process_with_keys

RUNS = 12
Z_THRESHOLD = 6.5
PAIRS = ((0, 1), (0, 2), (1, 2))
APPROX = D.DReLUConfig.approximate(40, 8)     # ℓ = 33: 5-byte openings
WIDTHS = (3, 8, 13, 24, 27, 41, 48, 63)        # exact comparison widths: 1, 2, 3, 4, 6, 8 bytes
IMAGE = (1, 2, 6, 6)
WEIGHT = (3, 2, 3, 3)

# Messages a receiver gets that are *meant* to be public, by (scope prefix, receiver):
# the header (program fingerprint, settings, batch sizes, ready byte: public by design) and
# the revealed output (the client's result: P1's share of it, which with P0's own share is
# the output).
PUBLIC = [("header", None), ("output", 0)]


def _is_public(scope: str, receiver: int) -> bool:
    return any((scope == s or scope.startswith(s + "/")) and r in (None, receiver)
               for s, r in PUBLIC)


@dataclass(frozen=True)
class Secret:
    """What the client and the server hold in one experiment."""

    image: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    vector: torch.Tensor
    matrix: torch.Tensor


def _secret(seed: int) -> Secret:
    g = torch.Generator().manual_seed(seed)
    return Secret(image=torch.rand(IMAGE, generator=g) * 4 - 2,
                  weight=torch.rand(WEIGHT, generator=g) - 0.5,
                  bias=torch.rand(WEIGHT[0], generator=g) - 0.5,
                  vector=torch.rand(2, 8, generator=g) * 2 - 1,
                  matrix=torch.rand(4, 8, generator=g) - 0.5)


SECRETS = (_secret(1), _secret(2))


# ------------------------------------------------------------------------- protocol bodies

def _image(p, s: Secret):
    return P.share(p, encode(s.image) if p.role == 0 else None, 0, IMAGE, scope="in")


def _conv(p, s: Secret, x=None, **kw):
    """The server-weight convolution every non-linear layer's input comes from in a CNN."""
    x = _image(p, s) if x is None else x
    server = p.role == 1
    return P.conv2d(p, x, s.weight if server else None, s.bias if server else None,
                    weight_shape=WEIGHT, padding=1, name="conv", **kw)


def _share(p, s: Secret):
    _image(p, s)
    P.share(p, encode(s.weight) if p.role == 1 else None, 1, WEIGHT, scope="in-server")
    P.share(p, encode(s.image) if p.role == 2 else None, 2, IMAGE, scope="in-helper")


def _conv_preprocessed(p, s: Secret):
    x = _image(p, s)
    P.open_weights(p, s.weight if p.role == 1 else None, weight_shape=WEIGHT, name="conv")
    pre = P.preprocess(p, [("conv", IMAGE, WEIGHT, P.conv_op(p, padding=1))])
    _conv(p, s, x, pre=pre["conv"])


def _linear(p, s: Secret):
    v = P.share(p, encode(s.vector) if p.role == 0 else None, 0, (2, 8), scope="in")
    P.linear(p, v, s.matrix if p.role == 1 else None, None, weight_shape=(4, 8), name="fc")


def _mul(p, s: Secret):
    x = _image(p, s)
    y = P.share(p, encode(s.image.flip(-1)) if p.role == 1 else None, 1, IMAGE, scope="in-server")
    P.mul(p, x, y)


def _mul_gate(p, s: Secret):
    """A squeeze-excitation product: a per-channel gate [N, C, 1, 1] from the image times the
    [N, C, H, W] map (both shared, broadcasting)."""
    x = _conv(p, s)
    P.mul(p, P.global_avg_pool2d(p, x, keepdim=True), x)


def _truncate(p, s: Secret):
    P.truncate(p, _conv(p, s, truncate=False))


def _avg_pool(p, s: Secret):
    P.avg_pool2d(p, _conv(p, s), 2)


def _output(p, s: Secret):
    P.reconstruct(p, _conv(p, s), to=0, scope="output")


def _nonlinear(op: Callable) -> Callable:
    return lambda p, s: op(p, _conv(p, s))


BLOCKS = np.array([[1, 1], [2, 2], [0, 1]], dtype=np.int32)


class _Gate(nn.Module):
    """Squeeze-excitation with a SiLU and a sigmoid gate (efficientnet's)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        g = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return g * x


class _ActivationsCNN(nn.Module):
    """Every new op once: ReLU6, channel shuffle, hardswish, hardsigmoid, the gate product,
    SiLU, sigmoid, ceil-mode and adaptive max pooling, tanh, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())
        self.conv2, self.act2 = nn.Conv2d(4, 4, 1), nn.Hardswish()
        self.gate = _Gate(4)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)      # 6x6 -> 3x3
        self.amax = nn.AdaptiveMaxPool2d(2)                  # 3x3 -> 2x2, overlapping
        self.fc1, self.fc2 = nn.Linear(16, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.conv1(x)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        y = self.gate(self.act2(self.conv2(y)) * nn.functional.hardsigmoid(y))
        y = self.amax(self.pool(y)).flatten(1)
        return self.fc2(nn.functional.gelu(torch.tanh(self.fc1(y))))


@functools.lru_cache(maxsize=None)
def _cnn_activations(seed: int):
    torch.manual_seed(seed)
    model = _ActivationsCNN()
    model.conv1[1].running_mean.uniform_(-0.2, 0.2)
    model.conv1[1].running_var.uniform_(0.5, 1.5)
    return compile_model(model.eval(), IMAGE)


def test_the_activations_cnn_has_every_new_op():
    program, _ = _cnn_activations(0)
    assert {"clamp", "reshape", "permute", "hardswish", "hardsigmoid", "mul", "approx",
            "max_pool", "adaptive_max_pool"} <= {layer.op for layer in program.layers}
    assert {layer.attrs["function"] for layer in program.layers if layer.op == "approx"} == \
        {"sigmoid", "silu", "tanh", "gelu"}


def _cnn_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    model[1].running_mean.uniform_(-0.2, 0.2)
    model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _cnn(seed: int):
    """The compiled whole CNN (the program is public and the same for both secrets)."""
    model = _cnn_model(seed)
    sites = si.find_relu_sites(model, IMAGE[1:])
    spec = {sites[1].name: np.array([[1, 1], [2, 2], [0, 1], [3, 3]], dtype=np.int32)}
    return compile_model(model, IMAGE, spec=spec)


@functools.lru_cache(maxsize=None)
def _cnn_relu6(seed: int):
    """The CNN with ReLU6 activations, two of its sites Block-ReLU6 (one mixing [1, 1],
    patches and identity), one left as the clamp layer."""
    model = _cnn_model(seed)
    for i in (2, 4, 7):
        model[i] = nn.ReLU6()
    sites = si.find_relu_sites(model, IMAGE[1:])
    spec = {sites[0].name: np.array([[1, 1], [2, 2], [0, 1], [3, 3]], dtype=np.int32),
            sites[2].name: np.array([[2, 1]] * 4, dtype=np.int32)}
    return compile_model(model, IMAGE, spec=spec)


def test_the_relu6_cnn_has_block_relu6_and_clamp_layers():
    ops = [layer.op for layer in _cnn_relu6(0)[0].layers]
    assert ops.count("block_relu6") == 2 and ops.count("clamp") == 1


# a calibration giving three of the CNN's DReLU layers widths of 2, 3 and 4 bytes (10, 20, 27
# bits; the fourth stays at 64)
CNN_RANGES = {"2": 2.0 ** -12, "4": 2.0 ** 2.5, "5.max_pool": 2.0 ** 9.5}
CNN_WIDTHS = {"2": 10, "4": 20, "5.max_pool": 27}


@functools.lru_cache(maxsize=None)
def _cnn_calibrated(seed: int):
    program, weights = _cnn(seed)
    program = copy.deepcopy(program)
    assign_widths(program, Calibration(ranges=CNN_RANGES, margin=1.0), frac_bits=16)
    assert program.widths() == {**CNN_WIDTHS, "7": 64}
    return program, weights


def _whole_cnn(drelu: D.DReLUConfig | None, compiled: Callable = _cnn) -> Callable:
    def body(p, s: Secret):
        program, weights = compiled(int(s is SECRETS[1]))
        assert program.fingerprint() == compiled(0)[0].fingerprint()
        run_party(p, program, images=[s.image] if p.role == 0 else None,
                  weights=weights if p.role == 1 else None, drelu=drelu)
    return body


CASES: dict[str, tuple[Callable, int]] = {     # name: (body, bytes of one DReLU opening)
    "share": (_share, 8),
    "conv": (_conv, 8),
    "conv-preprocessed": (_conv_preprocessed, 8),
    "linear": (_linear, 8),
    "mul": (_mul, 8),
    "mul-gate": (_mul_gate, 8),
    "truncate": (_truncate, 8),
    "relu6": (_nonlinear(lambda p, x: A.piecewise_linear(p, x, pwl.clamp_pwl(0, 6))), 8),
    "sigmoid": (_nonlinear(lambda p, x: A.piecewise_linear(p, x, pwl.approximation("sigmoid"))),
                8),
    "hardswish": (_nonlinear(lambda p, x: A.hardswish(p, x)), 8),
    "cnn-activations": (_whole_cnn(None, _cnn_activations), 8),
    "drelu": (_nonlinear(lambda p, x: D.drelu(p, x)), 8),
    "drelu-approx": (_nonlinear(lambda p, x: D.drelu(p, x, APPROX)), 5),
    "relu": (_nonlinear(lambda p, x: R.relu(p, x)), 8),
    "relu-approx": (_nonlinear(lambda p, x: R.relu(p, x, APPROX)), 5),
    "block-relu": (_nonlinear(lambda p, x: R.block_relu(p, x, BLOCKS)), 8),
    "block-relu6": (_nonlinear(lambda p, x: R.block_relu6(p, x, BLOCKS)), 8),
    "max-pool": (_nonlinear(lambda p, x: R.max_pool2d(p, x, 2)), 8),
    "avg-pool": (_avg_pool, 8),
    "output": (_output, 8),
    "cnn": (_whole_cnn(None), 8),
    "cnn-approx": (_whole_cnn(APPROX), 5),
    "cnn-relu6": (_whole_cnn(None, _cnn_relu6), 8),
    "drelu-chacha20": (_nonlinear(lambda p, x: D.drelu(p, x)), 8),
    "cnn-chacha20": (_whole_cnn(None), 8),
    "cnn-interleaved": (_whole_cnn(None), 8),
    # calibrated widths: every opening size from 1 to 8 bytes, and a whole CNN of mixed widths
    **{f"drelu-w{bits}": (_nonlinear(lambda p, x, b=bits: D.drelu(p, x, D.DReLUConfig(b))),
                          (bits + 7) // 8) for bits in WIDTHS},
    "cnn-calibrated": (_whole_cnn(None, _cnn_calibrated),
                       lambda scope: {"2": 2, "4": 3, "5.max_pool": 4}.get(scope.split("/")[0], 8)),
}
# The cipher of a case's correlated randomness (default aes): the views must not depend on it.
CASE_PRG = {"drelu-chacha20": "chacha20", "cnn-chacha20": "chacha20"}
CASE_PREPROCESS = {"cnn-interleaved": "interleaved"}   # the mask products inside the layers


# What each receiver gets per protocol, in order: (scope, sender, wire dtype), for P0, P1, P2.
# This is docs/secure_inference.md's view table (the prelude's messages included: the input is
# shared by the client and, except for share/linear/mul, passes a server-weight convolution).
VIEW_TABLE = {
    "share": (
        [],
        [("in-helper", 2, "int64")],
        [],
    ),
    "conv": (
        [("conv/open-weights", 1, "int64")],
        [("conv", 0, "int64"), ("conv", 2, "int64")],
        [],
    ),
    "conv-preprocessed": (
        [("conv/open-weights", 1, "int64")],
        [("preprocess", 2, "int64"), ("conv", 0, "int64")],
        [],
    ),
    "linear": (
        [("fc/open-weights", 1, "int64")],
        [("fc", 0, "int64"), ("fc", 2, "int64")],
        [],
    ),
    "mul": (
        [("mul", 1, "int64")],
        [("mul", 2, "int64"), ("mul", 0, "int64")],
        [],
    ),
    "mul-gate": (
        [("conv/open-weights", 1, "int64"), ("mul", 1, "int64")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("mul", 2, "int64"), ("mul", 0, "int64")],
        [],
    ),
    "relu6": (
        [("conv/open-weights", 1, "int64"), ("pwl", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("pwl", 2, "uint8"), ("pwl", 0, "uint8"),
         ("pwl", 2, "int64")],
        [("pwl", 0, "int64"), ("pwl", 1, "int64"), ("pwl", 0, "uint8"), ("pwl", 1, "uint8")],
    ),
    "hardswish": (
        [("conv/open-weights", 1, "int64"), ("hardswish/pwl", 1, "uint8"),
         ("hardswish/mul", 1, "int64")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("hardswish/pwl", 2, "uint8"),
         ("hardswish/pwl", 0, "uint8"), ("hardswish/pwl", 2, "int64"),
         ("hardswish/mul", 2, "int64"), ("hardswish/mul", 0, "int64")],
        [("hardswish/pwl", 0, "int64"), ("hardswish/pwl", 1, "int64"),
         ("hardswish/pwl", 0, "uint8"), ("hardswish/pwl", 1, "uint8")],
    ),
    "truncate": (
        [("conv/open-weights", 1, "int64")],
        [("conv", 0, "int64"), ("conv", 2, "int64")],
        [],
    ),
    "drelu": (
        [("conv/open-weights", 1, "int64"), ("drelu", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("drelu", 2, "uint8"), ("drelu", 0, "uint8"),
         ("drelu", 2, "int64")],
        [("drelu", 0, "uint8"), ("drelu", 1, "uint8")],
    ),
    "drelu-approx": (
        [("conv/open-weights", 1, "int64"), ("drelu", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("drelu", 2, "uint8"), ("drelu", 0, "uint8"),
         ("drelu", 2, "int64")],
        [("drelu", 0, "uint8"), ("drelu", 1, "uint8")],
    ),
    "relu": (
        [("conv/open-weights", 1, "int64"), ("relu", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("relu", 2, "uint8"), ("relu", 0, "uint8"),
         ("relu", 2, "int64")],
        [("relu", 0, "int64"), ("relu", 1, "int64"), ("relu", 0, "uint8"), ("relu", 1, "uint8")],
    ),
    "relu-approx": (
        [("conv/open-weights", 1, "int64"), ("relu", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("relu", 2, "uint8"), ("relu", 0, "uint8"),
         ("relu", 2, "int64")],
        [("relu", 0, "int64"), ("relu", 1, "int64"), ("relu", 0, "uint8"), ("relu", 1, "uint8")],
    ),
    "block-relu": (
        [("conv/open-weights", 1, "int64"), ("block_relu", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("block_relu", 2, "uint8"),
         ("block_relu", 0, "uint8"), ("block_relu", 2, "int64")],
        [("block_relu", 0, "int64"), ("block_relu", 1, "int64"), ("block_relu", 0, "uint8"),
         ("block_relu", 1, "uint8")],
    ),
    "block-relu6": (   # one fused DReLU call: both comparisons of every patch, both payloads
        [("conv/open-weights", 1, "int64"), ("block_relu6", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("block_relu6", 2, "uint8"),
         ("block_relu6", 0, "uint8"), ("block_relu6", 2, "int64")],
        [("block_relu6", 0, "int64"), ("block_relu6", 1, "int64"), ("block_relu6", 0, "uint8"),
         ("block_relu6", 1, "uint8")],
    ),
    "max-pool": (
        [("conv/open-weights", 1, "int64"), ("max_pool/level0", 1, "uint8"),
         ("max_pool/level1", 1, "uint8")],
        [("conv", 0, "int64"), ("conv", 2, "int64"), ("max_pool/level0", 2, "uint8"),
         ("max_pool/level0", 0, "uint8"), ("max_pool/level0", 2, "int64"),
         ("max_pool/level1", 2, "uint8"), ("max_pool/level1", 0, "uint8"),
         ("max_pool/level1", 2, "int64")],
        [("max_pool/level0", 0, "int64"), ("max_pool/level0", 1, "int64"),
         ("max_pool/level0", 0, "uint8"), ("max_pool/level0", 1, "uint8"),
         ("max_pool/level1", 0, "int64"), ("max_pool/level1", 1, "int64"),
         ("max_pool/level1", 0, "uint8"), ("max_pool/level1", 1, "uint8")],
    ),
    "avg-pool": (
        [("conv/open-weights", 1, "int64")],
        [("conv", 0, "int64"), ("conv", 2, "int64")],
        [],
    ),
    "output": (
        [("conv/open-weights", 1, "int64"), ("output", 1, "int64")],
        [("conv", 0, "int64"), ("conv", 2, "int64")],
        [],
    ),
}
# a DReLU at any width sends the same messages (narrower openings and fewer Z_67 words)
VIEW_TABLE.update({f"drelu-w{bits}": VIEW_TABLE["drelu"] for bits in WIDTHS})
# every piecewise-linear table is one call: the messages of a ReLU over k·n elements
VIEW_TABLE["sigmoid"] = VIEW_TABLE["relu6"]


# ---------------------------------------------------------------------- running and decoding

def _elements(tensor: torch.Tensor, sender: int, receiver: int, opening_bytes: int
              ) -> tuple[np.ndarray, int]:
    """A received message as its wire elements (uint64) and their bit width: ring elements
    (int64), packed Z_67 words (uint8 messages to or from P2, 4 bytes a word) or ℓ-bit
    openings (uint8 messages between P0 and P1, ``opening_bytes`` each)."""
    if tensor.dtype == torch.int64:
        return tensor.reshape(-1).numpy().view(np.uint64), 64
    raw = tensor.reshape(-1).numpy()
    if sender == 2 or receiver == 2:
        return raw.view(np.int32).astype(np.uint64), 32
    rows = raw.reshape(-1, opening_bytes).astype(np.uint64)
    shifts = np.arange(opening_bytes, dtype=np.uint64) * np.uint64(8)
    return (rows << shifts).sum(axis=1, dtype=np.uint64), 8 * opening_bytes


def _keys_for(receiver: int, fixed: dict) -> dict:
    """R's two keys from ``fixed``; the key of the other two parties fresh."""
    return {pair: fixed[pair] if receiver in pair else os.urandom(32) for pair in PAIRS}


@functools.lru_cache(maxsize=None)
def _experiment(case: str, receiver: int):
    """RUNS views of ``receiver`` per secret, its own keys fixed throughout."""
    body, opening = CASES[case]
    fixed = {pair: os.urandom(32) for pair in PAIRS}
    per_secret = []
    for secret in SECRETS:
        runs = []
        for _ in range(RUNS):
            _, views = _run_in_process_with_keys(functools.partial(body, s=secret),
                                                 _keys_for(receiver, fixed),
                                                 prg=CASE_PRG.get(case, "aes"),
                                                 preprocess=CASE_PREPROCESS.get(case, "ahead"))
            runs.append(views[receiver].received)
        per_secret.append(runs)
    layout = [(scope, frm, t.dtype, tuple(t.shape)) for scope, frm, t in per_secret[0][0]]
    for runs in per_secret:
        for view in runs:   # what R receives and when is public: the same in every run
            assert [(sc, f, t.dtype, tuple(t.shape)) for sc, f, t in view] == layout
    def elements(scope, frm, t):
        if _is_public(scope, receiver):   # not decoded: compared by neither test
            return t.reshape(-1).view(torch.uint8).numpy().astype(np.uint64), 8
        return _elements(t, frm, receiver, opening(scope) if callable(opening) else opening)

    decoded = [[[elements(*msg)[0] for msg in view] for view in runs] for runs in per_secret]
    widths = [elements(*msg)[1] for msg in per_secret[0][0]]
    return layout, widths, decoded


# ------------------------------------------------------------------------------------- tests

CASE_RECEIVERS = [(c, r) for c in CASES for r in (0, 1, 2)]
IDS = [f"{c}-P{r}" for c, r in CASE_RECEIVERS]


@pytest.mark.parametrize("case,receiver", CASE_RECEIVERS, ids=IDS)
def test_every_received_element_is_masked_by_a_key_the_receiver_lacks(case, receiver):
    layout, _, decoded = _experiment(case, receiver)
    unmasked = []
    for i, (scope, frm, _, _) in enumerate(layout):
        if _is_public(scope, receiver):
            continue
        values = np.stack([view[i] for view in decoded[0]])          # [RUNS, elements]
        constant = (values[1:] == values[0]).all(axis=0)
        if constant.any():
            unmasked.append(f"{scope} from P{frm}: {int(constant.sum())} of {constant.size} "
                            "elements do not change with the other parties' key")
    assert not unmasked, "\n".join(unmasked)


def _two_sample_z(a: np.ndarray, b: np.ndarray, width: int) -> float:
    """z-score of Σ (ones_a − ones_b)² / (RUNS/2) over every (element, bit), against its
    chi-square null (df cells; conservative for bits that are not fair coins)."""
    shifts = np.arange(width, dtype=np.uint64)
    ones_a = ((a[..., None] >> shifts) & np.uint64(1)).sum(axis=0).astype(np.float64)
    ones_b = ((b[..., None] >> shifts) & np.uint64(1)).sum(axis=0).astype(np.float64)
    df = ones_a.size
    stat = float(((ones_a - ones_b) ** 2).sum() / (a.shape[0] / 2))
    return (stat - df) / np.sqrt(2 * df)


@pytest.mark.parametrize("case,receiver", CASE_RECEIVERS, ids=IDS)
def test_views_of_two_secrets_are_indistinguishable(case, receiver):
    layout, widths, decoded = _experiment(case, receiver)
    distinguished = []
    for i, (scope, frm, _, _) in enumerate(layout):
        if _is_public(scope, receiver):
            continue
        a = np.stack([view[i] for view in decoded[0]])
        b = np.stack([view[i] for view in decoded[1]])
        z = _two_sample_z(a, b, widths[i])
        if z >= Z_THRESHOLD:
            distinguished.append(f"{scope} from P{frm}: z = {z:.1f}")
    assert not distinguished, "\n".join(distinguished)


def test_the_statistic_catches_a_message_fixed_by_the_receivers_keys():
    """Negative control: a message that is a function of the secret once R's keys are fixed
    (the old leak's shape) is flagged with a huge margin; fresh uniform words are not."""
    rng = np.random.default_rng()
    n = 50
    fixed_a = np.tile(rng.integers(0, 2 ** 63, n, dtype=np.uint64), (RUNS, 1))
    fixed_b = np.tile(rng.integers(0, 2 ** 63, n, dtype=np.uint64), (RUNS, 1))
    assert _two_sample_z(fixed_a, fixed_b, 64) > 50 * Z_THRESHOLD
    fresh = [np.frombuffer(os.urandom(8 * n * RUNS), dtype=np.uint64).reshape(RUNS, n)
             for _ in range(2)]
    assert _two_sample_z(*fresh, 64) < Z_THRESHOLD


@pytest.mark.parametrize("case", list(VIEW_TABLE))
def test_receivers_get_exactly_the_messages_of_the_view_table(case):
    for receiver in (0, 1, 2):
        layout, _, _ = _experiment(case, receiver)
        got = [(scope, frm, str(dtype).replace("torch.", "")) for scope, frm, dtype, _ in layout]
        assert got == VIEW_TABLE[case][receiver], f"P{receiver} in {case}"


def test_the_chacha20_cases_draw_chacha20():
    """The chacha20 cases are not AES runs under another name: with all keys fixed, every ring
    draw is the ChaCha20 stream of its identifier (none is the AES one), and every element
    the receivers get that is not public differs from the AES run's."""
    from secure_inference.mpc import prg
    keys = {pair: os.urandom(32) for pair in PAIRS}
    body = functools.partial(CASES["cnn-chacha20"][0], s=SECRETS[0])
    runs = {c: _run_in_process_with_keys(body, keys, prg=c)[1] for c in prg.CIPHERS}
    matches = {c: 0 for c in prg.CIPHERS}
    for role, view in enumerate(runs["chacha20"]):
        for other, scope, tag, n, t in view.draws:
            if t.dtype != torch.int64:
                continue
            key = keys[tuple(sorted((role, other)))]
            for c in prg.CIPHERS:
                want = prg.derive_stream(key, f"{scope}\x00{tag}\x00{n}", c).ring(t.shape)
                matches[c] += int(torch.equal(want, t))
    assert matches["chacha20"] > 0 and matches["aes"] == 0, matches
    for receiver in (0, 1, 2):
        for (scope, frm, a), (_, _, b) in zip(runs["aes"][receiver].received,
                                              runs["chacha20"][receiver].received):
            if not _is_public(scope, receiver):
                (ea, width), (eb, _) = (_elements(a, frm, receiver, 8),
                                        _elements(b, frm, receiver, 8))
                same = ea == eb
                if width == 32:   # a packed message's last word may hold one Z_67 digit only:
                    same = same[:-1]   # equal by chance 1 time in 67; full words 1 in 67^5
                assert not same.any(), f"P{receiver} {scope} from P{frm}"
