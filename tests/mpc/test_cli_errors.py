"""The party CLIs with bad input or failing peers: the client checks every input before it
connects, keeps its logits when the report exchange fails, and every user error is one line
naming the cause (no traceback)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.processes  # every test here starts Python processes

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "research" / "secure_inference"
MODEL = ["--model", "resnet18", "--input-shape", "3", "32", "32"]
NOWHERE = ["--server", "127.0.0.1:9", "--helper", "127.0.0.1:9", "--timeout", "3"]


def _run(script: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("case", ["labels-length", "labels-dtype", "no-images", "no-certs",
                                  "output-folder"])
def test_client_refuses_bad_input_before_connecting(case, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2 if case != "no-images" else 0, 3, 32, 32),
                                        np.float32))
    np.save(tmp_path / "y.npy", np.zeros(3 if case == "labels-length" else 2,
                                         np.float32 if case == "labels-dtype" else np.int64))
    out = tmp_path / ("folder" if case == "output-folder" else "out.npz")
    out.parent.mkdir(exist_ok=True)
    if case == "output-folder":
        out.mkdir()
    tls = ["--certs", tmp_path / "missing"] if case == "no-certs" else ["--plaintext"]
    proc = _run("client.py", "--images", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                "--output", out, *MODEL, *NOWHERE, *tls)
    expected = {"labels-length": "expected class indices [N] for 2 image(s)",
                "labels-dtype": "labels are integer class indices",
                "no-images": "holds no images", "no-certs": "is not a folder",
                "output-folder": "is a folder"}[case]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "connect" not in proc.stderr          # refused before dialling anybody
    assert len(proc.stderr.strip().splitlines()) == 1


def test_helper_port_in_use_and_wrong_certs_are_one_line(tmp_path):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        proc = _run("crypto_provider.py", *MODEL, "--plaintext", "--server", "127.0.0.1:9",
                    "--helper", f"127.0.0.1:{port}", "--timeout", "3")
    finally:
        held.close()
    assert proc.returncode == 1
    assert "already in use" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _run("crypto_provider.py", *MODEL, "--certs", tmp_path / "nope", *NOWHERE)
    assert proc.returncode == 1
    assert "certs:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = _run("crypto_provider.py", *MODEL, "--certs", tmp_path / "nope", *NOWHERE,
                "--debug")
    assert "Traceback" in proc.stderr


def test_client_keeps_logits_when_the_server_dies_in_the_report_exchange(tmp_path):
    torch.manual_seed(0)
    import torchvision
    net = torchvision.models.resnet18().eval()
    torch.save(net.state_dict(), tmp_path / "ckpt.pth")
    x = torch.randn(2, 3, 32, 32)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", np.zeros(2, np.int64))
    env = dict(os.environ, WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               SERVER_PORT="7321", HELPER_PORT="7322", SERVER_ARGS="--input-shape 3 32 32",
               SI_TEST_FAULT="1:report")   # test hook: the server kills itself there
    proc = subprocess.run(
        ["bash", str(CLI / "run_local.sh"), "resnet18", str(tmp_path / "ckpt.pth"),
         str(tmp_path / "x.npy"), "", "--", "--input-shape", "3", "32", "32", "--labels",
         str(tmp_path / "y.npy"), "--output", str(tmp_path / "out.npz"), "--report",
         str(tmp_path / "run.json")], env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode != 0
    assert "the logits are saved in" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("a party failed")[0]
    assert "party 1" in proc.stderr
    out = np.load(tmp_path / "out.npz")
    assert out["logits"].shape[0] == 2
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(out["logits"] - ref).max() < 1e-2
    rep = json.loads((tmp_path / "run.json").read_text())
    assert rep["complete"] is False and "report exchange" in rep["note"]
    assert rep["images"] == 2 and "top1_accuracy" in rep["metrics"]


@pytest.mark.parametrize("case", ["uint8", "nan", "huge"])
def test_client_refuses_images_the_fixed_point_cannot_carry(case, tmp_path):
    """Raw pixels, NaN and values too large for frac_bits: one line before connecting (issue
    22 item 1: images scaled to 1e6 ran and returned garbage with exit code 0)."""
    x = np.zeros((2, 3, 32, 32), np.uint8 if case == "uint8" else np.float32)
    if case == "nan":
        x[1, 0, 0, 0] = np.nan
    if case == "huge":
        x[0, 1, 2, 3] = 1e6
    np.save(tmp_path / "x.npy", x)
    proc = _run("client.py", "--images", tmp_path / "x.npy", *MODEL, *NOWHERE, "--plaintext")
    expected = {"uint8": "preprocessed float images", "nan": "NaN",
                "huge": "--frac-bits"}[case]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Connection refused" not in proc.stderr   # refused before it dialled anyone


def test_mmlab_commands_without_mmlab_say_what_to_install(tmp_path):
    """Without the [mmlab] extra: one line naming the fix, not a ModuleNotFoundError trace."""
    blocker = tmp_path / "sitecustomize.py"   # makes `import mmengine` fail in the child
    blocker.write_text("import sys\nsys.modules['mmengine'] = None\n")
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    config = ROOT / "configs" / "demo" / "digits_resnet18.py"
    for cmd in ([sys.executable, "-m", "secure_inference.cli.mmlab_train", str(config)],
                [sys.executable, str(CLI / "crypto_provider.py"), "--model", str(config),
                 *NOWHERE, "--plaintext"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env=dict(os.environ, **env))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "secure-inference[mmlab]" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_run_local_sh_gives_the_shape_to_all_and_stops_when_a_party_dies(tmp_path):
    """The script's own usage example (--input-shape among the client arguments) reaches the
    server and helper through the session file; a server that dies at once (missing
    checkpoint) ends the run at once instead of the client waiting out its 120 s timeout."""
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    env = dict(os.environ, WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               SERVER_PORT="7331", HELPER_PORT="7332")
    proc = subprocess.run(
        ["bash", str(CLI / "run_local.sh"), "resnet18", str(tmp_path / "missing.pth"),
         str(tmp_path / "x.npy"), "", "--", "--input-shape", "3", "32", "32",
         "--frac-bits", "14"], env=env, capture_output=True, text=True, timeout=100)
    session = (tmp_path / "work" / "session.yaml").read_text()
    assert "input_shape: [3, 32, 32]" in session and "frac_bits: 14" in session
    assert proc.returncode != 0
    assert "the server exited with status 1" in proc.stderr, proc.stderr[-3000:]
    assert "checkpoint file not found" in proc.stderr
    helper_log = (tmp_path / "work" / "helper.log").read_text()
    assert "no input shape known" not in helper_log   # the helper got the shape too
