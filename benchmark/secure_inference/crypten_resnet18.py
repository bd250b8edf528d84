#!/usr/bin/env python
"""CrypTen 0.4.1 side of the benchmark (runs in its own virtual environment, made by
bench.py --crypten): one 32x32 image through a CIFAR-style ResNet18 (3x3 stem, no max pool,
BasicBlocks 64-512, global average pooling, 100 classes: the same network as mmpretrain's
ResNet18-CIFAR-100), all ReLUs, private weights and input.

Three processes on loopback: CrypTen's two computing parties plus its trusted third party
(provider "TTP") that deals the Beaver triples and comparison randomness: the same trust
split as our client/server/helper. Prints one JSON line: seconds, rounds and bytes as
CrypTen's own communication counters report them (the two computing parties, summed).

The clock (``seconds``, the slower party) runs from after the model's weights and the image
are encrypted to the logits revealed to party 0: the forward pass, including the TTP's
in-line generation of every triple and comparison mask it asks for (CrypTen has no separate
offline phase). Left out: process start, gloo rendezvous, ONNX import, weight and input
encryption. ``--threads T`` (default 1): OMP_NUM_THREADS and torch.set_num_threads in every
process (both parties and the TTP); each process reports what it ran with. ``cpu_seconds``:
the two parties' CPU during the clock; ``ttp_cpu_seconds``: the TTP process's CPU over its
whole life (it idles until the forward pass asks for randomness).

Compatibility shims for torch 2.13 (see ../../../shared DEPENDENCIES notes): the ONNX registry
module alias, torch.onnx.export(dynamo=False), and a pass-through for ONNX Identity nodes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _threads_arg() -> int:
    """--threads T from the command line (parsed before torch is imported: OMP_NUM_THREADS
    must be set first)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads in each CrypTen process (default 1)")
    return max(1, parser.parse_args().threads)


THREADS = _threads_arg() if __name__ == "__main__" else 1
os.environ["OMP_NUM_THREADS"] = str(THREADS)


def _shims() -> None:
    import importlib
    import torch
    import torch.onnx
    try:
        importlib.import_module("torch.onnx._internal.registration")
    except ImportError:
        sys.modules["torch.onnx._internal.registration"] = importlib.import_module(
            "torch.onnx._internal.torchscript_exporter.registration")
    original = torch.onnx.export

    def export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)
    torch.onnx.export = export


def _identity_shim() -> None:
    import crypten.nn.module as cm
    import crypten.nn.onnx_converter as conv

    class Identity(cm.Module):
        def forward(self, x):
            return x

        @staticmethod
        def from_onnx(attributes=None):
            return Identity()
    conv.ONNX_TO_CRYPTEN.setdefault("Identity", Identity)


def resnet18_cifar(num_classes: int = 100):
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x):
            out = self.relu1(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu2(out + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers).eval()


def _ttp_with_cpu(crypten) -> None:
    """Make CrypTen's TTP process report its CPU seconds and threads: run_multiprocess looks
    ``crypten.mpc.provider.TTPServer`` up when it starts the processes and queues what it
    returns (as rank 2, after the two parties)."""
    import torch
    server = crypten.mpc.provider.TTPServer

    def ttp() -> dict:
        torch.set_num_threads(THREADS)
        cpu = time.process_time()
        server()  # serves requests until the parties terminate it
        return {"rank": "ttp", "ttp_cpu_seconds": time.process_time() - cpu,
                "threads": torch.get_num_threads()}
    crypten.mpc.provider.TTPServer = ttp


def main() -> int:
    _shims()
    import crypten
    import crypten.communicator as comm
    import crypten.mpc as mpc
    import torch
    _identity_shim()
    crypten.cfg.mpc.provider = "TTP"
    crypten.cfg.communicator.verbose = True  # count rounds and bytes
    torch.set_num_threads(THREADS)
    _ttp_with_cpu(crypten)

    @mpc.run_multiprocess(world_size=2)
    def party():
        torch.set_num_threads(THREADS)
        model = resnet18_cifar()
        dummy = torch.empty(1, 3, 32, 32)
        private = crypten.nn.from_pytorch(model, dummy).encrypt(src=1)  # server's weights
        x = crypten.cryptensor(torch.randn(1, 3, 32, 32), src=0)       # client's image
        comm.get().reset_communication_stats()
        start, cpu, times = time.perf_counter(), time.process_time(), os.times()
        out = private(x)
        logits = out.get_plain_text(dst=0)
        seconds = time.perf_counter() - start
        end = os.times()
        stats = comm.get().get_communication_stats()
        return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu,
                "user_s": end.user - times.user, "system_s": end.system - times.system,
                "rounds": stats["rounds"], "bytes": stats["bytes"],
                "rank": comm.get().get_rank(), "threads": torch.get_num_threads(),
                "shape": None if logits is None else list(logits.shape)}

    results = party()
    if not results or any(r is None for r in results):
        print(json.dumps({"error": "a CrypTen party failed"}))
        return 1
    parties = [r for r in results if "seconds" in r]
    ttp = [r for r in results if r.get("rank") == "ttp"]
    if len(parties) != 2:
        print(json.dumps({"error": f"expected 2 party results, got {results!r}"}))
        return 1
    print(json.dumps({"crypten": getattr(crypten, "__version__", "0.4.1"),
                      "seconds": max(r["seconds"] for r in parties),
                      "rounds": max(r["rounds"] for r in parties),
                      "cpu_seconds": sum(r["cpu_seconds"] for r in parties),
                      "ttp_cpu_seconds": ttp[0]["ttp_cpu_seconds"] if ttp else None,
                      "bytes": sum(r["bytes"] for r in parties),
                      "threads": {"requested": THREADS,
                                  "parties": [r["threads"] for r in parties],
                                  "ttp": ttp[0]["threads"] if ttp else None},
                      "parties": parties}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
