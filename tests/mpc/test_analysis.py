"""The plaintext analyses of a compiled program: flipping Block-ReLU decisions (what
error_bound does for ambiguous patches), including patches that cover a whole map."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secure_inference.mpc.compile import compile_model, error_bound, run_float


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(12, 2)).eval()


def test_flipping_a_patch_that_covers_the_whole_map():
    """A 2x2 patch on a 2x2 map: one decision per map; flipping it must not crash (the mask
    was a stride-0 view) and must change exactly that channel of that image."""
    model = _net()
    spec = {"1": np.array([[2, 2]] * 3, dtype=np.int32)}
    program, weights = compile_model(model, (2, 2, 4, 4), spec=spec)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    name = next(layer.name for layer in program.layers if layer.op == "block_relu")
    captured = {}

    def hook(layer, ins, y):
        if layer.op == "block_relu":
            captured.setdefault("y", []).append((ins[0].clone(), y.clone()))

    run_float(program, weights, x, hook=hook)
    run_float(program, weights, x, hook=hook, flips=[(name, 1, 2, 0, 0)])
    (x_in, plain), (_, flipped) = captured["y"]
    keep = (x_in.sum((2, 3)) > 0).double()
    expected = plain.clone()
    expected[1, 2] = x_in[1, 2] * (1 - keep[1, 2])   # that patch decided the other way
    assert torch.equal(flipped, expected)


def test_error_bound_with_ambiguous_whole_map_patches():
    model = _net()
    with torch.no_grad():
        model[0].bias.zero_()
    spec = {"1": np.array([[2, 2]] * 3, dtype=np.int32)}
    program, weights = compile_model(model, (1, 2, 4, 4), spec=spec)
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)   # every patch sum is 0: all ambiguous
    bound = error_bound(program, weights, x, 16)
    assert bound.shape == (1, 2) and bool(torch.isfinite(bound).all())


def test_block_relu_after_a_linear_layer_runs_securely():
    """A site after a Linear layer ([N, C] values) with identity and ReLU channels mixed: it
    compiled to a Block-ReLU layer that the runtime refused ("expects [N, C, H, W]")."""
    import secure_inference as si
    from secure_inference.mpc.local import run_local
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    spec = {"2": np.array([[1, 1], [0, 1], [1, 1], [0, 1], [1, 1], [1, 1]], np.int32)}
    x = torch.randn(3, 3, 2, 2)
    result = run_local(model, x, spec, in_process=True)
    with torch.no_grad():
        ref = si.apply_block_spec(model, spec, (3, 2, 2))(x).double()
    assert (result.outputs - ref).abs().max() < 1e-3
    layer = next(l for l in result.report["layers"] if l["op"] == "block_relu")
    assert layer["drelus"] == 3 * 4      # four non-identity channels, one pixel each


def test_server_checks_every_layers_weights_before_the_session_starts():
    """A too-large weight in the LAST layer stops the server before the header exchange
    (security review: checked layer by layer, a failure told the client which layer)."""
    from secure_inference.mpc.harness import run_in_process
    from secure_inference.mpc.party import run_party
    from secure_inference.mpc.errors import ProtocolError
    from secure_inference.mpc.session import SCOPE_HEADER
    model = _net()
    with torch.no_grad():
        model[3].weight[0, 0] = 100.0          # > 32: beyond 2^21 at 16 fractional bits
    program, weights = compile_model(model, (1, 2, 4, 4))
    sent_before_failure = []

    def fn(party):
        try:
            run_party(party, program, images=[torch.randn(1, 2, 4, 4)] if party.role == 0
                      else None, weights=weights if party.role == 1 else None)
        finally:
            sent_before_failure.append((party.role, party.stats.total(SCOPE_HEADER).sent))

    with pytest.raises((ValueError, ProtocolError), match="layer '3' has a weight of magnitude"):
        run_in_process(fn, timeout=30)
    assert dict(sent_before_failure)[1] == 0     # the server sent no header, nothing after it
