"""Where each party runs: one device for all or one per role, checked before a session starts.
The CUDA cases run only where a GPU exists (a mixed session must give the CPU run's outputs
and bytes, bit for bit)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from secure_inference.mpc.harness import party_device
from secure_inference.mpc.local import run_local
from secure_inference.mpc.session_config import SessionConfigError, check_device


def test_one_device_or_one_per_role():
    assert party_device("cpu", 2) == torch.device("cpu")
    assert party_device(("cpu", "cuda:1", "cuda:0"), 1) == torch.device("cuda:1")
    with pytest.raises(ValueError, match="one device or three"):
        party_device(("cpu", "cpu"), 0)


def test_one_prg_or_one_per_role():
    from secure_inference.mpc.harness import party_prg
    assert party_prg("chacha20", 1) == "chacha20"
    assert party_prg(("aes", "aes", "chacha20"), 2) == "chacha20"
    with pytest.raises(ValueError, match="one prg or three"):
        party_prg(("aes", "aes"), 0)
    with pytest.raises(ValueError, match="aes, chacha20"):
        party_prg(("aes", "aes", "des"), 0)


def test_device_setting_is_checked_with_a_clear_message():
    assert check_device("cpu") == "cpu"
    with pytest.raises(SessionConfigError, match="not a torch device"):
        check_device("gpu0")
    with pytest.raises(SessionConfigError, match="cpu or cuda"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(SessionConfigError, match="no usable CUDA device"):
            check_device("cuda")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 3)).eval()


@pytest.mark.processes
def test_per_role_devices_on_cpu_equal_the_default_run():
    x = torch.randn(2, 3, 8, 8)
    base = run_local(_model(), x, in_process=True)
    per_role = run_local(_model(), x, in_process=True, device=("cpu", "cpu", "cpu"))
    assert per_role.report["meta"]["device"] == ["cpu", "cpu", "cpu"]
    assert per_role.report["total"]["bytes"] == base.report["total"]["bytes"]
    assert torch.allclose(per_role.outputs, base.outputs, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.processes
def test_mixed_cpu_and_cuda_session_gives_the_cpu_outputs_and_bytes():
    x = torch.randn(2, 3, 8, 8)
    cpu = run_local(_model(), x, timeout=300)
    mixed = run_local(_model(), x, timeout=300, device=("cpu", "cuda", "cuda"))
    assert mixed.report["total"]["bytes"] == cpu.report["total"]["bytes"]
    assert torch.allclose(mixed.outputs, cpu.outputs, atol=1e-3)


def test_party_command_lines_take_a_device(capsys):
    from secure_inference.cli import client, crypto_provider, server
    for cli in (server, client, crypto_provider):
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert "--device" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chacha20_parties_on_cuda_draw_on_the_device(monkeypatch):
    """With prg="chacha20" parties on a GPU never expand randomness on the host (the host
    keystream path is disabled here), and a mixed CPU/GPU session gives the CPU run's outputs
    and bytes."""
    from secure_inference.mpc import prg
    x = torch.randn(2, 3, 8, 8)
    cpu = run_local(_model(), x, in_process=True, prg="chacha20")
    mixed = run_local(_model(), x, in_process=True, prg="chacha20",
                      device=("cpu", "cuda", "cuda"))
    assert mixed.report["total"]["bytes"] == cpu.report["total"]["bytes"]
    assert torch.allclose(mixed.outputs, cpu.outputs, atol=1e-3)

    def no_host(data):
        raise AssertionError("randomness was expanded on the host")
    monkeypatch.setattr(prg, "_host_tensor", no_host)
    gpu = run_local(_model(), x, in_process=True, prg="chacha20", device="cuda")
    assert torch.allclose(gpu.outputs, cpu.outputs, atol=1e-3)
