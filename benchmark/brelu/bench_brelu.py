"""Block-ReLU overhead: ResNet18-CIFAR-100 forward+backward, mixed spec vs nn.ReLU, same process.

Usage: python benchmark/brelu/bench_brelu.py [--batch 64] [--repeats 10] [--threads N]
The spec gives every channel a random candidate size of its site (identity and ReLU included),
the worst case for grouping. Prints the median seconds per step of both models and their ratio.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import secure_inference as si


def _model_zoo():
    """tests/model_zoo.py (the test suite's model builders), loaded by path."""
    path = Path(__file__).resolve().parents[2] / "tests" / "model_zoo.py"
    spec = importlib.util.spec_from_file_location("model_zoo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mmpretrain_resnet18_cifar = _model_zoo().mmpretrain_resnet18_cifar


def mixed_spec(model, shape, rng) -> dict:
    spec = {}
    for site in si.find_relu_sites(model, shape):
        options = si.candidate_block_sizes(site.height, site.width)
        spec[site.name] = options[rng.integers(0, len(options), size=site.channels)]
    return spec


def step_seconds(model, x, y, repeats: int) -> list[float]:
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x, mode="tensor"), y)
        loss.backward()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (3, 32, 32)
    base = mmpretrain_resnet18_cifar().train()
    brelu = copy.deepcopy(base)
    spec = mixed_spec(brelu, shape, np.random.default_rng())
    si.apply_block_spec(brelu, spec, shape)
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, 100, (args.batch,))
    # interleave the two models so machine noise hits both alike
    relu_t, brelu_t = [], []
    for _ in range(3):
        relu_t += step_seconds(base, x, y, args.repeats // 3 + 1)
        brelu_t += step_seconds(brelu, x, y, args.repeats // 3 + 1)
    r, b = statistics.median(relu_t), statistics.median(brelu_t)
    sizes = {tuple(v) for arr in spec.values() for v in arr.tolist()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"ResNet18-CIFAR-100, batch {args.batch}, forward+backward, {len(spec)} sites, "
          f"{len(sizes)} distinct block sizes")
    print(f"nn.ReLU model : {r * 1000:8.1f} ms/step (median of {len(relu_t)})")
    print(f"BlockReLU model: {b * 1000:8.1f} ms/step (median of {len(brelu_t)})")
    print(f"ratio BlockReLU / ReLU: {b / r:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
