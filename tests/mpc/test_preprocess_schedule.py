"""The preprocessing schedule (session setting ``preprocess``): interleaved mask products give
the plaintext model's outputs within the error analysis with exactly the bytes and rounds of
the ahead-of-time schedule, move those bytes into the layers, and a party on the other
schedule is refused at the header with the setting named."""
from __future__ import annotations

import pytest
import torch

from secure_inference.mpc.analysis import error_bound
from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.harness import run_in_process
from secure_inference.mpc.local import run_local
from secure_inference.mpc.options import SessionOptions
from secure_inference.mpc.party import run_party
from secure_inference.mpc.session_config import SessionConfigError, merge_settings

from tests.helpers.nets import tiny_resnet


def _totals(report: dict) -> tuple[int, int]:
    return (report["online"]["bytes"] + report["preprocess"]["bytes"],
            report["online"]["rounds"])


@pytest.mark.parametrize("in_process", [True, pytest.param(False, marks=pytest.mark.processes)])
def test_interleaved_matches_plaintext_with_the_bytes_and_rounds_of_ahead(in_process):
    model = tiny_resnet(seed=5, width=4).eval()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    ahead = run_local(model, x, in_process=in_process, preprocess="ahead")
    inter = run_local(model, x, in_process=in_process)          # the default schedule
    program, weights = compile_model(model, (2, 3, 16, 16))
    with torch.no_grad():
        ref = model(x).double()
    bound = error_bound(program, weights, x, 16)
    for result in (ahead, inter):
        assert ((result.outputs - ref).abs() <= bound).all()
    assert _totals(inter.report) == _totals(ahead.report)
    assert inter.report["preprocess"]["bytes"] == 0 < ahead.report["preprocess"]["bytes"]
    assert inter.report["per_image"]["preprocess_seconds"] == 0.0
    assert inter.report["meta"]["preprocess"] == "interleaved"
    layers_a = {ly["name"]: ly for ly in ahead.report["layers"]}
    moved = 0
    for ly in inter.report["layers"]:   # each conv/linear layer now carries its own c1
        extra = ly["bytes"] - layers_a[ly["name"]]["bytes"]
        if ly["op"] in ("conv2d", "linear"):
            assert extra == 8 * 2 * int(torch.tensor(ly["output_shape"]).prod())
            moved += extra
        else:
            assert extra == 0
    assert moved == ahead.report["preprocess"]["bytes"]


def test_a_party_on_the_other_schedule_is_refused_and_named():
    model = tiny_resnet(seed=1, width=4).eval()
    program, weights = compile_model(model, (1, 3, 16, 16))
    options = [SessionOptions(preprocess=mode) for mode in ("ahead", "interleaved", "ahead")]

    def fn(party):
        run_party(party, program, images=[torch.randn(1, 3, 16, 16)] if party.role == 0 else None,
                  weights=weights if party.role == 1 else None)

    with pytest.raises(ProtocolError) as info:
        run_in_process(fn, options=options, timeout=30)
    msg = str(info.value)
    assert "preprocess=" in msg and "--preprocess" in msg and "interleaved" in msg


def test_the_setting_is_checked_where_users_set_it():
    with pytest.raises(ValueError, match="preprocess must be one of ahead, interleaved"):
        SessionOptions(preprocess="later")
    with pytest.raises(SessionConfigError, match="--preprocess"):
        merge_settings({"model": "resnet18", "preprocess": "sometimes"})
    assert merge_settings({"model": "resnet18"})["preprocess"] == "interleaved"
