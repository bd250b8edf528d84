"""One-line errors that say what to fix (issue 22 items 6, 7, 9): TLS files, checkpoints,
torchvision models with another number of classes, the certificate command's name."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from secure_inference.checkpoints import ModelLoadError, read_checkpoint
from secure_inference.models import build_named_model, load_model, split_model_arguments
from secure_inference.mpc.transport.tls import TLSConfig

ROOT = Path(__file__).resolve().parents[2]


def test_tls_advice_depends_on_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="si-certificates request --role server"):
        TLSConfig.from_dir(tmp_path, 1)
    (tmp_path / "server.pem").write_text("x")
    (tmp_path / "server.key").write_text("x")
    with pytest.raises(FileNotFoundError) as info:     # only the CA certificate is missing
        TLSConfig.from_dir(tmp_path, 1)
    assert "copy the CA certificate ca.pem" in str(info.value)
    assert "request" not in str(info.value)


def test_checkpoint_errors_say_what_the_file_is(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="not a torch checkpoint"):
        read_checkpoint(tmp_path / "garbage.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pth")
    with pytest.raises(ModelLoadError) as info:
        read_checkpoint(tmp_path / "whole.pth")
    assert "state_dict()" in str(info.value) and "add_safe_globals" not in str(info.value)


def test_model_arguments_and_the_classes_hint(tmp_path):
    assert split_model_arguments("resnet18,num_classes=10,x='a'") == (
        "resnet18", {"num_classes": 10, "x": "a"})
    assert build_named_model("resnet18,num_classes=7").fc.out_features == 7
    with pytest.raises(ModelLoadError, match="key=value"):
        split_model_arguments("resnet18,10")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r.pth")
    with pytest.raises(ModelLoadError, match="--model resnet18,num_classes=10"):
        load_model("resnet18", str(tmp_path / "r.pth"))
    assert load_model("resnet18,num_classes=10", str(tmp_path / "r.pth")).fc.out_features == 10


@pytest.mark.processes
def test_certificate_command_calls_itself_by_the_name_the_user_typed():
    exe = Path(sys.executable).parent / "si-certificates"
    if exe.exists():
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
        assert "usage: si-certificates" in out.stdout and "make_certificates.py" not in out.stdout
    script = ROOT / "research" / "secure_inference" / "make_certificates.py"
    out = subprocess.run([sys.executable, str(script), "sign", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert "usage: make_certificates.py sign" in out.stdout


def test_unsupported_operations_are_named_as_the_user_wrote_them():
    from torch import nn

    from secure_inference.mpc.compile import UnsupportedOperationError, compile_model

    class Gate(nn.Module):
        def __init__(self, method: bool) -> None:
            super().__init__()
            self.conv, self.method = nn.Conv2d(1, 2, 3), method

        def forward(self, x):
            y = self.conv(x)
            return y.exp() if self.method else torch.exp(y)

    for method, name in ((False, "torch.exp"), (True, "Tensor.exp")):
        with pytest.raises(UnsupportedOperationError) as info:
            compile_model(Gate(method).eval(), (1, 1, 5, 5))
        assert name in str(info.value) and "_VariableFunctionsClass" not in str(info.value)
