"""Linear protocols on additive shares over Z_2^64: share, reconstruct, local ops, Beaver
products, and convolution/linear layers with the server's weights.

Conventions. P0 (client) and P1 (server) hold int64 shares ``x0 + x1 = x (mod 2^64)``; the
helper P2 holds a shape-only tensor (``party.placeholder``) wherever the others hold shares,
and gets placeholders back. Fixed-point values carry ``party.frac_bits`` fractional bits; a
product of two of them carries twice as many until :func:`truncate` (``truncate=True`` in the
product functions) brings it back.

Communication (payload bytes, n = elements; all sends overlap, so each product is one round):

=========================  =====================================================  ========
protocol                   bytes                                                  rounds
=========================  =====================================================  ========
share (owner P0 or P1)     0 (the other share is drawn from the P0–P1 pair key)   0
share (owner P2)           8·n  (P2→P1)                                           1
reconstruct to P0 and P1   16·n (8·n each way)                                    1
mul / matmul (shared×      8·out (P2→P1) + 16·(|x|+|y|) (E, F each way, one       1
shared, Beaver)            frame per direction)
conv2d / linear (server    per image: 8·|x| (P0→P1) + 8·|out| (P2→P1);            1
weights)                   once per session and layer: 8·|W| (P1→P0)
=========================  =====================================================  ========

Beaver triples from the helper are compressed with the pair keys: ``a0, b0, c0`` come from the
P0–P2 key, ``a1, b1`` from the P1–P2 key, and P2 sends only ``c1 = op(a, b) − c0`` to P1.

Server-weight layers (:func:`conv2d`, :func:`linear`). With x = x0 + x1 and the server's
plaintext W, ``op(x, W) = op(x0, W) + op(x1, W)``; P1 computes ``op(x1, W)`` alone and the
cross term ``op(x0, W)`` uses a Beaver-style mask on each side:

* once per session and layer: ``B`` is drawn from the P1–P2 key, P1 sends ``F = W − B`` to P0
  (cached by P0; P2 caches B);
* per image: ``A`` (shape of x) and ``c0`` come from the P0–P2 key; P0 sends ``E = x0 − A`` to
  P1; P2 sends ``c1 = op(A, B) − c0`` to P1. Then ``z0 = op(A, F) + c0`` and
  ``z1 = op(x1 + E, W) + c1 (+ bias)``, and ``z0 + z1 = op(A, W) + op(x0 − A, W) + op(x1, W)``.

What each party learns: P0 sees ``F = W − B`` once, uniformly random because B (unknown to P0)
is uniform, so nothing about W; P1 sees ``E = x0 − A`` and ``c1``, both masked by fresh
uniform values from the P0–P2 key that P1 never sees, so nothing about x (new A and c0 for
every call); P2 receives nothing. B is reused across images, but nothing P0 or P1 receives
after the session start depends on B except through ``c1``, which a fresh ``c0`` masks.
(Semi-honest security, no two parties colluding.) The output shares are uniform: z0 contains
the fresh c0, z1 = result − z0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..backends import SMALL_WEIGHT_BITS, fits_small
from ..ring import encode, truncate_share
from ..runtime import OpenedWeights, Party
from ..session import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER
from ..session import SCOPE_PREPROCESS, SCOPE_SETUP

Share = torch.Tensor
BilinearOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["check_weight_bound", "share", "reconstruct", "add", "sub", "neg", "add_public", "mul_public", "truncate",
           "concat", "mul", "matmul", "open_weights", "prepare_conv", "conv2d", "linear", "to_ring",
           "Preprocessed", "preprocess", "conv_op", "linear_op"]


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=torch.int64, device="meta")


def to_ring(party: Party, x: torch.Tensor | float, frac_bits: int | None = None) -> torch.Tensor:
    """Ring elements on the party's device: floats are encoded with ``frac_bits`` (default
    ``party.frac_bits``); int64 tensors are taken as ring elements unchanged."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.int64:
        return x.to(party.device)
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        raise TypeError(f"expected int64 ring elements or floating-point values, got {x.dtype}")
    return encode(x, party.frac_bits if frac_bits is None else frac_bits, device=party.device)


# --- sharing --------------------------------------------------------------------------------

def share(party: Party, x: torch.Tensor | None, owner: int, shape: Sequence[int] | None = None,
          *, scope: str = "share") -> Share:
    """Secret-share the owner's ring tensor ``x``; the other parties pass ``shape``.

    Owner P0 or P1: the other share is drawn from the P0–P1 key (no communication). Owner P2:
    P0's share comes from the P0–P2 key and P2 sends P1 the rest.
    """
    if party.role == owner:
        if x is None or x.dtype != torch.int64:
            raise TypeError("the owner must pass its secret as an int64 ring tensor (see encode)")
        x = x.to(party.device)
        shape = tuple(x.shape)
    elif shape is None:
        raise ValueError(f"party {party.role} must pass the public shape of party {owner}'s input")
    shape = tuple(int(s) for s in shape)
    with party.scope(scope):
        if owner in (ROLE_CLIENT, ROLE_SERVER):
            other = 1 - owner
            if party.role == ROLE_HELPER:
                return party.placeholder(shape)
            mask = party.pair_random(other if party.role == owner else owner, shape, tag="share")
            return x - mask if party.role == owner else mask
        if owner != ROLE_HELPER:
            raise ValueError(f"owner must be 0, 1 or 2, got {owner}")
        if party.role == ROLE_CLIENT:
            return party.pair_random(ROLE_HELPER, shape, tag="share")
        if party.role == ROLE_HELPER:
            x0 = party.pair_random(ROLE_CLIENT, shape, tag="share")
            party.send(ROLE_SERVER, x - x0)
            return party.placeholder(shape)
        return party.recv(ROLE_HELPER, shape)


def reconstruct(party: Party, x: Share, *, to: int | Sequence[int] = (ROLE_CLIENT, ROLE_SERVER),
                scope: str = "reconstruct") -> torch.Tensor | None:
    """Open a shared value to the parties in ``to``; they get the ring value, the rest None."""
    to = (to,) if isinstance(to, int) else tuple(to)
    if not set(to) <= {0, 1, 2} or not to:
        raise ValueError(f"'to' must name parties 0, 1, 2, got {to}")
    with party.scope(scope):
        if party.role == ROLE_HELPER:
            if ROLE_HELPER not in to:
                return None
            return party.recv(ROLE_CLIENT, x.shape) + party.recv(ROLE_SERVER, x.shape)
        other = 1 - party.role
        if other in to:
            party.send(other, x)
        if ROLE_HELPER in to:
            party.send(ROLE_HELPER, x)
        if party.role in to:
            return x + party.recv(other, x.shape)
        return None


# --- local operations -----------------------------------------------------------------------

def add(x: Share, y: Share) -> Share:
    """Shares of x + y (also the residual add)."""
    return x + y


def sub(x: Share, y: Share) -> Share:
    """Shares of x − y."""
    return x - y


def neg(x: Share) -> Share:
    """Shares of −x."""
    return -x


def add_public(party: Party, x: Share, c: torch.Tensor | int) -> Share:
    """Shares of x + c for a public ring value c (P0 adds it)."""
    shape = torch.broadcast_shapes(x.shape, c.shape if isinstance(c, torch.Tensor) else ())
    if party.role == ROLE_CLIENT:
        return x + (c.to(party.device) if isinstance(c, torch.Tensor) else c)
    if party.role == ROLE_HELPER:
        return party.placeholder(shape)
    return x if x.shape == shape else x.expand(shape).contiguous()


def mul_public(x: Share, c: torch.Tensor | int) -> Share:
    """Shares of x · c for a public integer (ring) value c; truncate afterwards if c is fixed point."""
    if isinstance(c, torch.Tensor):
        if c.dtype != torch.int64:
            raise TypeError("public multipliers must be int64 ring values (encode floats first)")
        if x.is_meta:
            return torch.empty(torch.broadcast_shapes(x.shape, c.shape), dtype=torch.int64,
                               device="meta")
        c = c.to(x.device)
    return x * c


def truncate(party: Party, x: Share, bits: int | None = None) -> Share:
    """Local truncation by ``bits`` (default ``party.frac_bits``); see :mod:`..ring` for the
    ±1 LSB error and the 2^(l+1-64) failure probability."""
    bits = party.frac_bits if bits is None else bits
    if party.role == ROLE_HELPER:
        return x
    return truncate_share(x, bits, party.role)


def concat(xs: Sequence[Share], dim: int = 1) -> Share:
    """Shares of the concatenation (local)."""
    return torch.cat(list(xs), dim=dim)


# --- Beaver products (both operands shared) -------------------------------------------------

def _beaver(party: Party, x: Share, y: Share, op: BilinearOp, truncate_result: bool,
            scope: str) -> Share:
    """Shares of op(x, y) for a bilinear op with a helper-dealt, PRG-compressed triple."""
    out_shape = op(_meta(x), _meta(y)).shape
    with party.scope(scope):
        if party.role == ROLE_HELPER:
            a0 = party.pair_random(ROLE_CLIENT, x.shape, tag="a")
            b0 = party.pair_random(ROLE_CLIENT, y.shape, tag="b")
            c0 = party.pair_random(ROLE_CLIENT, out_shape, tag="c")
            a1 = party.pair_random(ROLE_SERVER, x.shape, tag="a")
            b1 = party.pair_random(ROLE_SERVER, y.shape, tag="b")
            party.send(ROLE_SERVER, op(a0 + a1, b0 + b1) - c0)
            return party.placeholder(out_shape)
        a = party.pair_random(ROLE_HELPER, x.shape, tag="a")
        b = party.pair_random(ROLE_HELPER, y.shape, tag="b")
        other = 1 - party.role
        ef = torch.cat([(x - a).reshape(-1), (y - b).reshape(-1)])
        party.send(other, ef)  # E and F in one frame, before waiting for anything
        if party.role == ROLE_CLIENT:
            c = party.pair_random(ROLE_HELPER, out_shape, tag="c")
        else:
            c = party.recv(ROLE_HELPER, out_shape)
        ef = ef + party.recv(other, ef.shape)
        e = ef[:x.numel()].reshape(x.shape)
        f = ef[x.numel():].reshape(y.shape)
        z = op(e, b) + op(a, f) + c
        if party.role == ROLE_CLIENT:
            z = z + op(e, f)
        return truncate(party, z) if truncate_result else z


def mul(party: Party, x: Share, y: Share, *, truncate: bool = True, scope: str = "mul") -> Share:
    """Shares of the elementwise product x ⊙ y (broadcasting, e.g. one bit per Block-ReLU patch
    against its pixels: E is opened at x's shape and F at y's, so a broadcast operand is cheap).

    ``truncate`` divides by 2^f afterwards (for two fixed-point operands; pass False when one
    operand is an integer such as a 0/1 bit).
    """
    return _beaver(party, x, y, torch.mul, truncate, scope)


def matmul(party: Party, x: Share, y: Share, *, truncate: bool = True,
           scope: str = "matmul") -> Share:
    """Shares of x @ y for two shared matrices (torch.matmul broadcasting)."""
    return _beaver(party, x, y, party.backend.matmul, truncate, scope)


# --- layers with the server's plaintext weights ---------------------------------------------

def check_weight_bound(name: str, w: torch.Tensor, frac_bits: int) -> None:
    """Refuse encoded server weights at or beyond 2^SMALL_WEIGHT_BITS (the bound the secure
    convolution is built for), naming the layer and the fix."""
    if not fits_small(w):
        biggest = float(w.abs().max()) / 2 ** frac_bits
        bound = 2.0 ** (SMALL_WEIGHT_BITS - frac_bits)
        raise ValueError(
            f"layer '{name}' has a weight of magnitude {biggest:.4g}; encoded with "
            f"{frac_bits} fractional bits it reaches 2^{SMALL_WEIGHT_BITS}, the bound "
            f"the secure convolution is built for (|w| < {bound:g} at f = "
            f"{frac_bits}). Use fewer fractional bits (--frac-bits) or rescale this "
            "layer (e.g. move the factor into the next layer)")


def open_weights(party: Party, weight: torch.Tensor | None, *, weight_shape: Sequence[int],
                 name: str) -> None:
    """Session set-up for one weight tensor of the server: P1 sends ``F = W − B`` to P0 once.

    Done automatically by :func:`conv2d`/:func:`linear` on first use of ``name``; call it up
    front to move this traffic out of the first image. Idempotent per ``name``; P1 must pass
    the same weights on every later call (checked).
    """
    with party.scope(name):
        _open_weights(party, weight, weight_shape, name)


def _open_weights(party: Party, weight: torch.Tensor | None, weight_shape: Sequence[int],
                  name: str) -> torch.Tensor:
    """In the layer's scope: open F once (kept in ``party.weights``), return this party's
    weight-side tensor (P0: F, P1: W, P2: B)."""
    shape = tuple(int(s) for s in weight_shape)
    opened = party.weights.get(name)
    if party.role == ROLE_SERVER:
        if weight is None:
            raise ValueError("the server (P1) must pass its weights")
        if opened is not None and opened.source is weight \
                and opened.source_version == weight._version:
            return opened.tensor     # the very tensor opened before, unmodified: encoded
        w = to_ring(party, weight)
        if tuple(w.shape) != shape:
            raise ValueError(f"weights of '{name}' have shape {list(w.shape)}, public shape is "
                             f"{list(shape)}")
        check_weight_bound(name, w, party.frac_bits)
        if opened is not None:
            if not torch.equal(opened.tensor, w):
                raise ValueError(f"weights of '{name}' changed within the session; use a new name")
            return w
    elif opened is not None:
        return opened.tensor
    with party.scope(SCOPE_SETUP):
        if party.role == ROLE_CLIENT:
            opened = OpenedWeights(party.recv(ROLE_SERVER, shape))
        elif party.role == ROLE_SERVER:
            party.send(ROLE_CLIENT, w - party.pair_random(ROLE_HELPER, shape, tag="B"))
            opened = OpenedWeights(w, source=weight, source_version=weight._version)
        else:
            opened = OpenedWeights(party.pair_random(ROLE_SERVER, shape, tag="B"))
    party.weights[name] = opened
    return opened.tensor


def prepare_conv(party: Party, name: str, x_shape: Sequence[int], stride=1, padding=0,
                 dilation=1, groups: int = 1) -> None:
    """Session set-up of an opened conv layer ``name`` (after :func:`open_weights`): the
    backend's per-tensor work on this party's weight-side tensor (P0: F, P1: W, P2: B), so
    that the first image does not pay for it. Local, no communication."""
    opened = party.weights.get(name)
    if opened is None:
        raise ValueError(f"open the weights of '{name}' before preparing them")
    party.backend.prepare_conv(opened.tensor, tuple(int(v) for v in x_shape), stride, padding,
                               dilation, groups, small_weight=party.role == ROLE_SERVER)


@dataclass
class Preprocessed:
    """Input-independent half of one server-weight layer for one batch (see
    :func:`preprocess`): P0 holds the mask ``a`` and its output share ``z0 = op(A, F) + c0``,
    P1 the helper's correction ``c1 = op(A, B) − c0``; P2 keeps nothing."""

    a: torch.Tensor | None = None
    z0: torch.Tensor | None = None
    c1: torch.Tensor | None = None


def preprocess(party: Party, layers: Sequence[tuple[str, Sequence[int], Sequence[int],
                                                    BilinearOp]],
               *, scope: str = SCOPE_PREPROCESS) -> dict[str, Preprocessed]:
    """The input-independent work of the server-weight layers ``(name, x_shape, weight_shape,
    op)`` for one batch, done before the input exists: P0 and P2 draw each layer's A and c0
    from their pair key and compute op(A, F) and op(A, B) (in parallel, one each), and P2 sends
    P1 every c1 (8·|out| bytes per layer, all in one round). The online layer is then one
    message, E = x0 − A (P0 → P1), and P1's own product. Same security argument as
    :func:`conv2d`: A and c0 are fresh per layer and batch, and P1 only ever sees them masked.
    Each layer's weights must have been opened (:func:`open_weights`)."""
    out: dict[str, Preprocessed] = {}
    with party.scope(scope):
        for name, x_shape, weight_shape, op in layers:
            if party.role != ROLE_SERVER and name not in party.weights:
                raise ValueError(f"open the weights of '{name}' before preprocessing it")
            w = party.weights[name].tensor if name in party.weights else None
            out[name] = _mask_products(party, name, x_shape, _out_shape(op, x_shape,
                                                                        weight_shape), op, w)
    return out


def _out_shape(op: BilinearOp, x_shape: Sequence[int], weight_shape: Sequence[int]
               ) -> tuple[int, ...]:
    meta = {"dtype": torch.int64, "device": "meta"}
    return tuple(op(torch.empty(tuple(int(v) for v in x_shape), **meta),
                    torch.empty(tuple(int(v) for v in weight_shape), **meta)).shape)


def _mask_products(party: Party, name: str, x_shape: Sequence[int], out_shape: Sequence[int],
                   op: BilinearOp, weight_side: torch.Tensor | None) -> Preprocessed:
    """The input-independent half of one server-weight layer in the current scope: P0 and P2
    draw the layer's A and c0 from their pair key; P0 keeps z0 = op(A, F) + c0, P2 sends P1
    c1 = op(A, B) − c0. ``weight_side`` is this party's opened weight tensor (P0: F, P2: B)."""
    if party.role == ROLE_SERVER:
        return Preprocessed(c1=party.recv(ROLE_HELPER, tuple(out_shape)))
    a, c0 = _masks(party, name, x_shape, out_shape)
    if party.role == ROLE_CLIENT:
        return Preprocessed(a=a, z0=op(a, weight_side) + c0)
    party.send(ROLE_SERVER, op(a, weight_side) - c0)
    return Preprocessed()


def _masks(party: Party, name: str, x_shape: Sequence[int], out_shape: Sequence[int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A (input shape) and c0 (output shape) of one layer, from the P0–P2 key."""
    other = ROLE_HELPER if party.role == ROLE_CLIENT else ROLE_CLIENT
    return (party.pair_random(other, tuple(int(v) for v in x_shape), tag=f"A:{name}"),
            party.pair_random(other, tuple(out_shape), tag=f"C:{name}"))


def _server_weight_op(party: Party, x: Share, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, weight_shape: Sequence[int], op: BilinearOp,
                      name: str, truncate_result: bool, pre: Preprocessed | None = None) -> Share:
    """One server-weight layer: its mask products (``pre``, or computed here in the layer's
    scope when None), then the online step."""
    out_shape = _out_shape(op, x.shape, weight_shape)
    with party.scope(name):
        if party.role == ROLE_CLIENT:
            if pre is None:   # E goes out before P0 waits for F (first call: still 1 round)
                a, c0 = _masks(party, name, x.shape, out_shape)
                party.send(ROLE_SERVER, x - a)
                z = op(a, _open_weights(party, None, weight_shape, name)) + c0
            else:
                if pre.a is None or tuple(pre.a.shape) != tuple(x.shape):
                    raise ValueError(f"layer '{name}' was preprocessed for another input shape")
                party.send(ROLE_SERVER, x - pre.a)
                z = pre.z0
            return truncate(party, z) if truncate_result else z
        w = _open_weights(party, weight, weight_shape, name)   # P1: W, P2: B
        if party.role == ROLE_HELPER:
            if pre is None:
                _mask_products(party, name, x.shape, out_shape, op, w)
            return party.placeholder(out_shape)
        if pre is not None and (pre.c1 is None or tuple(pre.c1.shape) != out_shape):
            raise ValueError(f"layer '{name}' was preprocessed for another input shape")
        # while the helper computes c1; the weights were checked below 2^21 when opened, so
        # the backend's path follows from that public bound, never from the weights' values
        z = op(x + party.recv(ROLE_CLIENT, x.shape), w, small_weight=True)
        z += (pre or _mask_products(party, name, x.shape, out_shape, op, w)).c1
        if bias is not None:
            b = to_ring(party, bias, 2 * party.frac_bits) if bias.is_floating_point() \
                else to_ring(party, bias)
            z = z + _bias_view(b, z)
        return truncate(party, z) if truncate_result else z


def _bias_view(b: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-output-channel bias shaped to broadcast against z ([N, C, ...] or [..., C])."""
    if z.ndim >= 3 and b.ndim == 1:  # convolution output [N, C, H, W]
        return b.reshape(1, -1, *([1] * (z.ndim - 2)))
    return b


def conv_op(party: Party, stride=1, padding=0, dilation=1, groups: int = 1) -> BilinearOp:
    """The ring convolution of a layer with these hyperparameters (party's backend).
    ``small_weight=True`` declares |w| < 2^21 (only the server's own encoded weights)."""
    def op(a, w, small_weight: bool = False):
        return party.backend.conv2d(a, w, stride, padding, dilation, groups,
                                    small_weight=small_weight)
    return op


def linear_op(party: Party) -> BilinearOp:
    """The ring product ``a @ W.T`` of a linear layer (party's backend)."""
    def op(a, w, small_weight: bool = False):
        return party.backend.matmul(a, w.transpose(-1, -2))
    return op


def conv2d(party: Party, x: Share, weight: torch.Tensor | None, bias: torch.Tensor | None, *,
           weight_shape: Sequence[int], stride=1, padding=0, dilation=1, groups: int = 1,
           name: str, truncate: bool = True, pre: Preprocessed | None = None) -> Share:
    """Shares of conv2d(x, W) + bias with the server's plaintext weights (1 round per image).

    P1 passes ``weight`` [C_out, C_in/groups, kh, kw] and optional ``bias`` [C_out] (floats
    are encoded: weights with f fractional bits, the bias with 2f, the product's scale, so it is
    added before truncation; int64 tensors are taken as already encoded at those scales);
    P0 and P2 pass None. ``name`` identifies the layer for the once-per-session weight opening
    and is its statistics scope. ``pre``: this layer's :func:`preprocess` output for the batch
    (then the online step is only E, 8·|x| bytes).
    """
    return _server_weight_op(party, x, weight, bias, weight_shape,
                             conv_op(party, stride, padding, dilation, groups), name, truncate,
                             pre)


def linear(party: Party, x: Share, weight: torch.Tensor | None, bias: torch.Tensor | None, *,
           weight_shape: Sequence[int], name: str, truncate: bool = True,
           pre: Preprocessed | None = None) -> Share:
    """Shares of ``x @ W.T + bias`` (torch.nn.functional.linear) with the server's weights
    [out, in]; same protocol and conventions as :func:`conv2d`."""
    return _server_weight_op(party, x, weight, bias, weight_shape, linear_op(party), name,
                             truncate, pre)
