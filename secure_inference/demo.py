"""Pieces of the end-to-end demo (``make demo``): a real data set, evaluation, table and plots.

The data set is scikit-learn's bundled handwritten digits (1,797 real 8×8 scans of 10
digits), shipped inside an installed package so nothing is downloaded; it is written as PNG
files in the mmpretrain ``CustomDataset`` layout so the demo drives the same MMLab code
paths (configs, dataset classes, pipelines, trainer) as the reference tasks.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

SPLITS = ("train", "val", "test")


def write_digits_dataset(root: str | os.PathLike, size: int = 16, val_fraction: float = 0.15,
                         test_fraction: float = 0.15, split_seed: int = 0) -> dict[str, int]:
    """Write the digits as ``root/{train,val,test}/<digit>/<index>.png`` (grey, size×size).

    The split is a fixed, recorded permutation (``split_seed``; nothing secret depends on it),
    stratified by class. Returns the image count per split. Existing complete folders are kept.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / "dataset.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("size") == size and info.get("split_seed") == split_seed:
            return info["counts"]
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                       align_corners=False).clamp(0, 1)
    pixels = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    rng = np.random.default_rng(split_seed)
    counts = dict.fromkeys(SPLITS, 0)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        parts = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val],
                 "train": idx[n_test + n_val:]}
        for split, members in parts.items():
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in members:
                Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")
            counts[split] += len(members)
    marker.write_text(json.dumps({"source": "sklearn.datasets.load_digits", "size": size,
                                  "split_seed": split_seed, "counts": counts}, indent=1))
    return counts


def split_inputs(cfg, model: nn.Module, split: str = "test", limit: int | None = None,
                 batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model-ready inputs and labels of a config's ``{split}_dataloader`` dataset, in order."""
    from .mmlab.datasets import build_dataset, preprocessed_batches

    dataset = build_dataset(cfg, cfg[f"{split}_dataloader"]["dataset"])
    total = len(dataset) if limit is None else min(limit, len(dataset))
    for x, samples in preprocessed_batches(dataset, model, range(total), batch_size):
        yield x, torch.tensor([int(s.gt_label) for s in samples])


@dataclass
class DemoRow:
    """One line of the demo's result table."""

    budget: str                        # "all ReLUs" or "5%" …
    drelus: int                        # DReLUs per image
    plaintext_accuracy: float
    secure_images: int = 0             # images run through secure inference (spread over the test set)
    plaintext_accuracy_secure_images: float | None = None  # plaintext, on those same images
    secure_accuracy: float | None = None
    agreement: float | None = None     # share of images where secure and plaintext argmax agree
    max_abs_logit_error: float | None = None
    bytes_per_image: float | None = None
    seconds_per_image: float | None = None
    rounds: int | None = None
    site_drelus: dict[str, int] = field(default_factory=dict)
    bytes_per_image_64bit: float | None = None  # the same run with every DReLU at 64 bits (exact)
    drelu_widths: list[int] | None = None      # bits compared per DReLU layer (min, max)


def write_uniform_spec(config: str | os.PathLike, size: tuple[int, int],
                       path: str | os.PathLike) -> int:
    """Write the uniform Block-ReLU spec (patch ``size`` at every site of the config's model)
    to ``path``; returns its DReLUs per image, the budget the knapsack is compared at."""
    from .mmlab.config_utils import input_shape_from_cfg, load_task_config
    from .mmlab.finetune import build_task_model, prepare_model
    from .sites import find_relu_sites
    from .spec import count_drelus, save_spec
    from .study.budgets import uniform_spec

    cfg = load_task_config(config)
    shape = input_shape_from_cfg(cfg)
    sites = find_relu_sites(prepare_model(build_task_model(cfg), cfg, None), shape)
    spec = uniform_spec(sites, size)
    save_spec(spec, path)
    return count_drelus(spec, sites)["total"]


def format_table(rows: Sequence[DemoRow]) -> str:
    """A fixed-width text table of the demo results."""
    n = max((r.secure_images for r in rows), default=0)
    head = ("budget", "DReLUs/img", "plain acc", f"plain@{n}", f"secure@{n}", "agreement",
            "MB/img", "MB@64bit", "bits", "s/img")
    lines = ["{:<12} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6} {:>7}".format(*head)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def mb(v):
        return "-" if v is None else f"{v / 1e6:.2f}"

    for r in rows:
        bits = "-" if not r.drelu_widths else (
            f"{r.drelu_widths[0]}" if r.drelu_widths[0] == r.drelu_widths[-1]
            else f"{r.drelu_widths[0]}-{r.drelu_widths[-1]}")
        lines.append("{:<12} {:>11,} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>6} {:>7}".format(
            r.budget, r.drelus, pct(r.plaintext_accuracy),
            pct(r.plaintext_accuracy_secure_images), pct(r.secure_accuracy),
            pct(r.agreement), mb(r.bytes_per_image), mb(r.bytes_per_image_64bit), bits,
            "-" if r.seconds_per_image is None else f"{r.seconds_per_image:.2f}"))
    lines.append(f"plain acc: all test images; plain@{n}/secure@{n}: the {n} images run under "
                 "secure inference; agreement: same predicted class secure vs plaintext")
    lines.append("MB/img: sent per image (set-up included) with the bits each DReLU layer "
                 "compares (bits: calibrated on training images); MB@64bit: the same run with "
                 "every DReLU at 64 bits (exact byte count)")
    if any(r.budget.startswith("uniform") for r in rows):
        lines.append("uniform HxW: the same patch size for every channel; knap@HxW: the "
                     "knapsack at exactly the uniform spec's DReLU count")
    return "\n".join(lines)


def write_results(folder: str | os.PathLike, rows: Sequence[DemoRow], extra: dict) -> Path:
    """``results.json`` with every row and the run's settings."""
    path = Path(folder) / "results.json"
    path.write_text(json.dumps({"rows": [asdict(r) for r in rows], **extra}, indent=1))
    return path


def plot_results(folder: str | os.PathLike, rows: Sequence[DemoRow]) -> list[Path]:
    """Two PNGs: accuracy vs DReLUs, and DReLUs per site for every budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    out = []
    rows = sorted(rows, key=lambda r: r.drelus)
    fig, ax = plt.subplots(figsize=(6, 4))
    uniform = [r for r in rows if r.budget.startswith("uniform")]
    rows = [r for r in rows if not r.budget.startswith("uniform")]  # the knapsack line
    xs = [r.drelus for r in rows]
    ax.plot(xs, [100 * r.plaintext_accuracy for r in rows], "o-", label="plaintext, all test images")
    if uniform:
        ax.plot([r.drelus for r in uniform], [100 * r.plaintext_accuracy for r in uniform], "D",
                color="tab:red", label="uniform Block-ReLU, plaintext")
    if rows and all(r.secure_accuracy is not None for r in rows):
        n = rows[0].secure_images
        ax.plot(xs, [100 * r.plaintext_accuracy_secure_images for r in rows], "s:",
                label=f"plaintext, {n} images")
        ax.plot(xs, [100 * r.secure_accuracy for r in rows], "x--",
                label=f"secure (3 parties), {n} images")
    for r in rows + uniform:
        ax.annotate(r.budget, (r.drelus, 100 * r.plaintext_accuracy), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("DReLUs per image (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs DReLU budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.append(folder / "accuracy_vs_drelus.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)

    rows = sorted(rows + uniform, key=lambda r: r.drelus)
    sites = list(rows[0].site_drelus)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(sites)), 4))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        ax.bar(np.arange(len(sites)) + i * width, [r.site_drelus.get(s, 0) for s in sites],
               width, label=r.budget)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - width / 2)
    ax.set_xticklabels(sites, rotation=70, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("DReLUs per image (log)")
    ax.set_title("DReLUs per site")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(folder / "drelus_per_site.png")
    fig.savefig(out[-1], dpi=120)
    plt.close(fig)
    return out


def plaintext_logits(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``model`` over preprocessed (inputs, labels) batches."""
    from .sites import run_model
    logits, labels = [], []
    with torch.no_grad():
        for x, y in batches:
            logits.append(run_model(model, x).float())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def secure_subset(total: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced indices of ``total`` (test folders are sorted by class, so this
    samples every class alike; deterministic so every model sees the same images)."""
    count = min(count, total)
    return torch.linspace(0, total - 1, count).round().long().unique()


def evaluate_model(config: str, checkpoint: str | os.PathLike, name: str,
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor]], secure_images: int,
                   secure_options: dict | None = None,
                   calibration_inputs: torch.Tensor | None = None) -> DemoRow:
    """Plaintext accuracy on every batch; secure accuracy and agreement on a spread subset.

    Secure inference runs the three parties as separate processes over loopback TCP
    (:func:`secure_inference.mpc.run_local`); the revealed logits are compared with the
    plaintext logits of the same Block-ReLU model. With ``calibration_inputs`` (training
    images) the model is calibrated first and every DReLU layer compares only the bits its
    range needs; the row also gives the exact bytes the same run sends at 64 bits.
    """
    from .mmlab.finetune import load_finetuned
    from .mmlab.config_utils import input_shape_from_cfg, load_task_config
    from .sites import find_relu_sites
    from .spec import count_drelus, extract_block_spec

    cfg = load_task_config(config)
    shape = input_shape_from_cfg(cfg)
    model = load_finetuned(cfg, checkpoint)
    logits, labels = plaintext_logits(model, batches)
    sites = find_relu_sites(model, shape)
    spec = extract_block_spec(model, shape)
    counts = count_drelus(spec, sites)
    row = DemoRow(budget=name, drelus=counts.pop("total"),
                  plaintext_accuracy=float((logits.argmax(1) == labels).float().mean()),
                  site_drelus=counts)
    if secure_images <= 0:
        return row
    from .mpc import run_local
    from .mpc.calibrate import calibrate
    options = dict(secure_options or {})
    calibrated = None
    if calibration_inputs is not None and len(calibration_inputs):
        calibrated = calibrate(model, calibration_inputs,
                               frac_bits=options.get("frac_bits", 16))
    pick = secure_subset(len(labels), secure_images)
    x = torch.cat([b[0] for b in batches])[pick]
    result = run_local(model, x, calibrated, **options)
    score_secure_run(row, result, logits[pick], labels[pick])
    return row


def score_secure_run(row: DemoRow, result, plain: torch.Tensor, truth: torch.Tensor
                     ) -> torch.Tensor:
    """Fill ``row``'s secure columns from a ``run_local`` result on images whose plaintext
    logits are ``plain`` and labels ``truth``: accuracies, agreement, logit error, bytes per
    image at the run's widths and (exact) at 64 bits, the widths, seconds, rounds. Returns
    the secure logits."""
    from .mpc.calibrate import bytes_saved_by_widths
    secure = torch.as_tensor(result.outputs).float()
    row.secure_images = len(secure)
    row.plaintext_accuracy_secure_images = float((plain.argmax(1) == truth).float().mean())
    row.secure_accuracy = float((secure.argmax(1) == truth).float().mean())
    row.agreement = float((secure.argmax(1) == plain.argmax(1)).float().mean())
    row.max_abs_logit_error = float((secure - plain).abs().max())
    per_image = result.report["per_image"]
    sizes = result.report["batch_sizes"]
    row.bytes_per_image = per_image["bytes_with_setup"]
    row.bytes_per_image_64bit = (per_image["bytes_with_setup"]
                                 + bytes_saved_by_widths(result.program, sizes) / sum(sizes))
    widths = sorted(set(result.program.widths().values()))
    row.drelu_widths = [widths[0], widths[-1]] if widths else None
    row.seconds_per_image = per_image["seconds_with_setup"]
    row.rounds = result.report["online"]["rounds"]
    return secure
