"""The fused Triton ChaCha20 kernel (the GPU path of ``chacha.keystream``) against OpenSSL's
ChaCha20: on the CPU through Triton's interpreter, and on CUDA where present."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from secure_inference.mpc import chacha, chacha_triton

from helpers.scripts import REPO

triton = pytest.importorskip("triton", reason="the Triton kernel needs the triton package")


@pytest.mark.processes
def test_interpreted_kernel_equals_openssl_and_the_torch_implementation():
    """Triton's interpreter runs the kernel's exact integer semantics on the CPU (it must be
    chosen before triton is imported: a process of its own)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "tests/helpers/triton_chacha_check.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count(": ok") == 8, proc.stdout


@pytest.mark.processes
def test_cpu_parties_never_import_triton():
    """Importing the runtime and drawing ChaCha20 on the CPU leaves Triton unimported (its
    import takes seconds in every party process)."""
    code = ("import sys, torch; from secure_inference.mpc import chacha, local, party; "
            "assert chacha.keystream(bytes(32), 100, 'cpu').numel() == 100; "
            "sys.exit(1 if 'triton' in sys.modules else 0)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] or "triton was imported"


@pytest.mark.skipif(chacha_triton._interpreting(), reason="TRITON_INTERPRET is set here")
def test_the_kernel_is_not_used_on_a_cpu_and_asking_for_it_says_why():
    assert not chacha_triton.available(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA device and the triton package"):
        chacha.keystream(bytes(32), 64, "cpu", method="triton")
    with pytest.raises(ValueError, match="method must be one of"):
        chacha.keystream(bytes(32), 64, method="numpy")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("nbytes,counter", [(1, 0), (65, 7), (10 * (1 << 22) + 5, 99),
                                            (640 * 64, (1 << 32) - 640)])
def test_cuda_kernel_equals_openssl_and_the_torch_path(nbytes, counter):
    key, nonce = os.urandom(32), os.urandom(12)
    got = chacha.keystream(key, nbytes, "cuda", nonce=nonce, counter=counter, method="triton")
    assert got.device.type == "cuda" and got.shape == (nbytes,)
    assert bytes(got.cpu().numpy()) == chacha.keystream_reference(key, nbytes, nonce=nonce,
                                                                  counter=counter)
    assert torch.equal(got, chacha.keystream(key, nbytes, "cuda", nonce=nonce, counter=counter,
                                             method="torch"))
