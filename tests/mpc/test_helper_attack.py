"""Regression test of the attack that broke the fused multiplication: a hostile helper runs
lattice reduction on its own view of Conv2d(1→1, 2×2) → ReLU and must find nothing.

Before the fix P1 sent its raw share of the ReLU's input to P2 in the DReLU's first round; P2
dealt that share's masks, so its view determined the weights (see :mod:`helper_attack`). The
control test feeds the attack exactly that old message (P1's share, taken from P1's side of
the same run) and must recover W, so a silent failure of the attack cannot pass for safety.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from mpc.helper_attack import recover_weights
from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.party import run_party
from secure_inference.mpc.ring import encode
from secure_inference.mpc.session import ROLE_CLIENT, ROLE_HELPER, ROLE_SERVER
from secure_inference.mpc.harness import _run_in_process_with_keys

FRAC = 16


def _tiny_run(seed: int):
    """One secure run of conv→ReLU with recorded views; returns what P2 holds, P1's share of
    the ReLU input, and the encoded weights."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 1, 2, padding=1), nn.ReLU()).eval()
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    program, weights = compile_model(model, (1, 1, 8, 8))
    conv, relu = program.layers[1].name, program.layers[2].name
    keys = {pair: os.urandom(32) for pair in ((0, 1), (0, 2), (1, 2))}
    captured = {}

    def body(party):
        if party.role == ROLE_SERVER:   # keep P1's share of the ReLU input for the control
            from secure_inference.mpc.protocols import relu as R
            original = R.mul_drelu

            def spy(p, d, v, *args, **kwargs):
                # the patch is module-wide and the other parties run in threads of this
                # process: keep only the server's share (the client's call raced it, and a
                # captured client share made the control attack fail now and then)
                if p.role == ROLE_SERVER:
                    captured["v1"] = v.clone()
                return original(p, d, v, *args, **kwargs)
            R.mul_drelu = spy
            try:
                return run_party(party, program, weights=weights)
            finally:
                R.mul_drelu = original
        return run_party(party, program, images=[x] if party.role == ROLE_CLIENT else None)

    _, views = _run_in_process_with_keys(body, keys, frac_bits=FRAC)
    helper = views[ROLE_HELPER]
    draws = {(other, scope, tag): t for other, scope, tag, _, t in helper.draws}
    a_mask = draws[(ROLE_CLIENT, "preprocess", f"A:{conv}")]
    c0 = draws[(ROLE_CLIENT, "preprocess", f"C:{conv}")]
    b_mask = draws[(ROLE_SERVER, f"{conv}/open-weights", "B")]
    from_server = [t for scope, frm, t in helper.received
                   if frm == ROLE_SERVER and scope == relu and t.dtype == torch.int64
                   and t.numel() == 81]
    assert len(from_server) == 1, "P2 receives one payload message from P1 in the ReLU"
    w_int = encode(weights[conv]["weight"], FRAC)
    return a_mask, b_mask, c0, from_server[0], captured["v1"], w_int


@pytest.mark.parametrize("seed", [0, 1])
def test_helper_view_does_not_reveal_weights(seed):
    a_mask, b_mask, c0, received, _, w_int = _tiny_run(seed)
    found = recover_weights(a_mask, b_mask, c0, received, FRAC)
    assert found is None or not torch.equal(found, w_int)


@pytest.mark.parametrize("seed", [0, 1])
def test_attack_recovers_weights_from_the_old_message(seed):
    """Control: the pre-fix message (P1's raw share) gives the weights exactly."""
    a_mask, b_mask, c0, _, old_message, w_int = _tiny_run(seed)
    found = recover_weights(a_mask, b_mask, c0, old_message, FRAC)
    assert found is not None and torch.equal(found, w_int)
