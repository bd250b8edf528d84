"""The party CLIs end to end: run_local.sh starts the helper, server and client on three
loopback addresses (127.0.0.1/2/3) with TLS certificates from make_certificates.py; the
client's logits match the plaintext Block-ReLU model, the report and plot are written;
parties that compiled different programs stop with a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import secure_inference as si
from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.party import check_program, run_party
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.harness import run_in_process

from helpers.reference_models import mixed_spec, randomize_bn

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.processes
def test_run_local_sh_three_addresses_tls(tmp_path):
    from secure_inference.mmlab.config_utils import load_task_config
    from secure_inference.mmlab.finetune import build_task_model
    config = tmp_path / "tiny.py"
    config.write_text(f"_base_ = ['{ROOT}/configs/classification/resnet18_cifar100.py']\n"
                      "model = dict(backbone=dict(stem_channels=4, base_channels=4),\n"
                      "             head=dict(num_classes=10, in_channels=32))\n")
    torch.manual_seed(0)
    model = randomize_bn(build_task_model(load_task_config(config)).eval())
    spec = mixed_spec(model, (3, 32, 32))
    si.save_spec(spec, tmp_path / "spec.pickle")
    torch.save({"state_dict": model.state_dict(), "meta": {}}, tmp_path / "ckpt.pth")
    x = torch.randn(3, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    si.apply_block_spec(model, spec, (3, 32, 32))
    with torch.no_grad():
        ref = model(x, mode="tensor").double()
    np.save(tmp_path / "y.npy", ref.argmax(1).numpy())
    env = dict(os.environ, WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               SERVER_PORT="7311", HELPER_PORT="7312", PRG="chacha20")
    proc = subprocess.run(
        ["bash", str(ROOT / "research/secure_inference/run_local.sh"), str(config),
         str(tmp_path / "ckpt.pth"), str(tmp_path / "x.npy"), str(tmp_path / "spec.pickle"), "--",
         "--labels", str(tmp_path / "y.npy"), "--batch-size", "2", "--output",
         str(tmp_path / "out.npz"), "--report", str(tmp_path / "run.json"), "--plot",
         str(tmp_path / "run.png")], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert np.abs(out["logits"] - ref.numpy()).max() < 1e-3
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["top1_accuracy"] == 1.0 and summary["images"] == 3
    rep = json.loads((tmp_path / "run.json").read_text())
    assert rep["batch_sizes"] == [2, 1] and rep["meta"]["tls"] is True
    assert rep["meta"]["prg"] == "chacha20"       # the session file's prg reached the client
    assert all(rep["online"]["bytes_sent"][k] > 0 for k in ("client", "server", "helper"))
    assert (tmp_path / "run.png").stat().st_size > 1000
    yaml_text = (tmp_path / "work" / "session.yaml").read_text()
    assert "127.0.0.2:7311" in yaml_text and "127.0.0.3:7312" in yaml_text
    assert "prg: chacha20" in yaml_text


def test_parties_with_different_programs_stop_with_a_clear_error():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    prog_a, _ = compile_model(net, (1, 3, 8, 8))
    prog_b, _ = compile_model(net, (1, 3, 8, 8), spec={"1": np.array([[2, 2]] * 4, np.int32)})
    assert prog_a.fingerprint() != prog_b.fingerprint()
    assert prog_a.fingerprint() == compile_model(net, (3, 3, 8, 8))[0].fingerprint()

    def fn(party):
        check_program(party, prog_b if party.role == 2 else prog_a)
    with pytest.raises(ProtocolError, match="different program"):
        run_in_process(fn, timeout=10)


@pytest.mark.processes
def test_cli_help_and_missing_settings():
    for script in ("server.py", "client.py", "crypto_provider.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "research/secure_inference" / script),
                               "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--config-file" in proc.stdout
    proc = subprocess.run([sys.executable, str(ROOT / "research/secure_inference/crypto_provider.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no model" in proc.stderr


@pytest.mark.parametrize("setting,values", [("frac_bits", (16, 12)),
                                            ("drelu_ring_bits", (None, 40)),
                                            ("drelu_drop_bits", (None, 8)),
                                            ("prg", ("aes", "chacha20"))])
def test_parties_with_different_settings_stop_naming_the_setting(setting, values):
    """The server at f = 12 (or another DReLU) while the others use f = 16 used to complete and
    hand the client 1.7e10 for a plaintext 0.289: every public setting that changes the
    computation is compared at the start."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    program, weights = compile_model(net, (1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    from secure_inference.mpc.protocols.drelu import DReLUConfig

    def fn(party):
        mine, other = values
        cfg = None
        if setting == "frac_bits":
            party.frac_bits = other if party.role == 1 else mine
        elif setting == "prg":
            party.prg = other if party.role == 1 else mine
        elif setting == "drelu_ring_bits":
            cfg = DReLUConfig(ring_bits=40) if party.role == 1 else None
        else:
            cfg = DReLUConfig(ring_bits=56, drop_bits=8) if party.role == 1 else None
        return run_party(party, program, images=[x] if party.role == 0 else None,
                         weights=weights if party.role == 1 else None, drelu=cfg)
    with pytest.raises(ProtocolError, match=setting) as err:
        run_in_process(fn, timeout=10)
    if setting == "prg":   # names both ciphers and the flag that fixes it
        assert "prg=chacha20" in str(err.value) and "prg=aes" in str(err.value)
        assert "--prg" in str(err.value)


@pytest.mark.processes
def test_party_processes_with_different_prg_stop_naming_prg():
    """The per-role prg of the process harness reaches each party: a helper on chacha20 with
    the others on aes is refused at the header (the server's and the client's errors name
    prg and --prg), before any randomness is drawn."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    program, weights = compile_model(net, (1, 3, 8, 8))
    from secure_inference.mpc.local import run_program
    with pytest.raises(ProtocolError, match="prg") as err:
        run_program(program, weights, [torch.randn(1, 3, 8, 8)], tls=False, timeout=60,
                    prg=("aes", "aes", "chacha20"))
    assert "--prg" in str(err.value)
