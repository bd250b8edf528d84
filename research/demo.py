"""End-to-end demo (work in progress): runs the pipeline stages that exist so far.

Today it loads scikit-learn's bundled handwritten digits (a real data set shipped inside an
installed package), builds a small CIFAR-style ResNet, lists its ReLU sites, and applies a
Block-ReLU spec to count the DReLUs saved. Distortion extraction, knapsack, finetuning and
secure inference join as their issues land.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.parse_args()
    import secure_inference as si
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear").repeat(1, 3, 1, 1)
    print(f"data: scikit-learn digits, {len(images)} images, upscaled to 32x32")
    import torchvision
    model = torchvision.models.resnet18(num_classes=10).eval()
    shape = (3, 32, 32)
    sites = si.find_relu_sites(model, shape)
    print(f"model: torchvision resnet18, {len(sites)} ReLU sites, {si.total_relus(sites):,} ReLUs/image")
    spec = {s.name: np.tile([[2, 2]], (s.channels, 1)).astype(np.int32) for s in sites}
    si.apply_block_spec(model, spec, shape)
    counts = si.count_drelus(spec, sites)
    print(f"with 2x2 Block-ReLUs everywhere: {counts['total']:,} DReLUs/image "
          f"({counts['total'] / si.total_relus(sites):.1%} of all ReLUs)")
    with torch.no_grad():
        model(images[:8])
    print("missing so far: distortion extraction, knapsack, finetuning, secure inference "
          "(see the open issues)")


if __name__ == "__main__":
    main()
