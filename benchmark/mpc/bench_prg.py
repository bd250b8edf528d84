#!/usr/bin/env python
"""Keystream throughput of the runtime's two PRG ciphers (``--prg aes`` / ``chacha20``).

Measures MB/s of producing N bytes of keystream as a uint8 tensor on a device, for:

* ``aes-ctr (cryptography)``: AES-256-CTR through OpenSSL, what ``prg=aes`` draws (CPU);
* ``chacha20 (cryptography)``: ChaCha20 through OpenSSL, what ``prg=chacha20`` draws on a
  CPU party;
* ``chacha20 (torch, DEVICE)``: :func:`secure_inference.mpc.chacha.keystream` as element-wise
  torch operations (on the CPU for comparison; on CUDA when present);
* ``chacha20 (triton, cuda)``: the fused Triton kernel (:mod:`secure_inference.mpc.chacha_triton`),
  what ``prg=chacha20`` draws on a GPU party where Triton is installed (CUDA only);
* ``aes-ctr -> cuda``: AES on the CPU plus the copy to the GPU, what ``prg=aes`` costs a GPU
  party (CUDA only).

Best of ``--repeats`` timings per size (the machine may be shared: best-of filters the noise
of other jobs, not its own variance), CUDA timings synchronised.

Usage:  python benchmark/mpc/bench_prg.py [--sizes-mb 1 4 16 64] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secure_inference.mpc import chacha, chacha_triton


def _aes(key: bytes, n: int) -> torch.Tensor:
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return torch.frombuffer(bytearray(enc.update(bytes(n))), dtype=torch.uint8)


def _chacha_ssl(key: bytes, n: int) -> torch.Tensor:
    enc = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return torch.frombuffer(bytearray(enc.update(bytes(n))), dtype=torch.uint8)


def _methods(cuda: bool) -> dict:
    out = {"aes-ctr (cryptography)": lambda k, n: _aes(k, n),
           "chacha20 (cryptography)": lambda k, n: _chacha_ssl(k, n),
           "chacha20 (torch, cpu)": lambda k, n: chacha.keystream(k, n, "cpu", method="torch")}
    if cuda:
        out["aes-ctr -> cuda"] = lambda k, n: _aes(k, n).to("cuda")
        out["chacha20 (torch, cuda)"] = lambda k, n: chacha.keystream(k, n, "cuda", method="torch")
        if chacha_triton.available(torch.device("cuda")):
            out["chacha20 (triton, cuda)"] = lambda k, n: chacha.keystream(k, n, "cuda",
                                                                            method="triton")
    return out


def _best_seconds(fn, key: bytes, n: int, repeats: int, cuda: bool) -> float:
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(key, n)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    methods = _methods(cuda)
    key = os.urandom(32)
    for fn in methods.values():          # warm-up: allocator, CUDA context, lazy imports
        fn(key, 1 << 16)
    print(f"# {date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads){', ' + torch.cuda.get_device_name() if cuda else ''}; "
          f"best of {args.repeats}")
    sizes = [mb << 20 for mb in args.sizes_mb]
    print("| method | " + " | ".join(f"{mb} MB" for mb in args.sizes_mb) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, fn in methods.items():
        rates = [n / _best_seconds(fn, key, n, args.repeats, cuda) / 1e6 for n in sizes]
        print(f"| {name} | " + " | ".join(f"{r:,.0f}" for r in rates) + " |", flush=True)
    print("(MB/s; 1 MB = 2^20 bytes of keystream, rates in 10^6 bytes per second)")


if __name__ == "__main__":
    main()
