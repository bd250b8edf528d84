"""The exact distortion engine: rows of (sample, channel, size) perturbations through the
site runner, identical rows merged (see :mod:`.engine` for the method)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..sites import ReluSite
from .base import Progress
from .tensors import block_relu_all, check_finite, take_rows
from .calls import _Call
from .site_runner import Capture, SiteRunner


@dataclass
class RowPlan:
    """Which (size, sample, channel) candidates of a chunk must run through the network.

    A candidate whose perturbed channel equals the clean one has distortion exactly 0 and is
    not run; candidates of the same (sample, channel) whose perturbed channels are equal
    (e.g. two large blocks that both keep every pixel) share one row.
    """

    size: torch.Tensor    # [U] candidate index of each row to run
    sample: torch.Tensor  # [U] sample index in the batch
    chan: torch.Tensor    # [U] position in the chunk's channel list
    slot: torch.Tensor    # [K, n, Cc] row (into the U rows) of every candidate; -1: zero

    @property
    def rows(self) -> int:
        """Number of rows to run (U)."""
        return int(self.size.numel())


def _unique_index(keys: np.ndarray) -> np.ndarray:
    """For rows of ``keys`` [M, L] (any dtype), the index of each row's class of
    byte-identical rows (classes numbered 0..U-1)."""
    flat = np.ascontiguousarray(keys).reshape(keys.shape[0], -1)
    void = flat.view(np.dtype((np.void, flat.shape[1] * flat.dtype.itemsize))).ravel()
    return np.unique(void, return_inverse=True)[1].reshape(-1)


def plan_rows(pert: torch.Tensor, base: torch.Tensor, dedupe: bool = True) -> RowPlan:
    """The rows to run for perturbed channels ``pert`` [K, n, Cc, H, W] against the clean
    ones ``base`` [n, Cc, H, W]: non-zero perturbations, identical ones merged per
    (sample, channel) when ``dedupe`` (values compared as floats: -0.0 == +0.0)."""
    k, n, cc = pert.shape[:3]
    flat = pert.reshape(k, n, cc, -1)
    nonzero = (flat != base.reshape(1, n, cc, -1)).any(dim=3).cpu()      # [K, n, Cc]
    m = k * n * cc
    if dedupe:
        values = (flat + 0.0).cpu().numpy().reshape(m, -1)             # + 0.0: -0.0 -> +0.0
        group = np.arange(m, dtype=np.int64) % (n * cc)                  # (sample, channel)
        cls = _unique_index(np.stack([group, _unique_index(values)], axis=1))
    else:
        cls = np.arange(m)
    cls = torch.from_numpy(cls).reshape(k, n, cc)
    # one row per class with a non-zero perturbation, at its first candidate
    first = torch.full((int(cls.max()) + 1,), m, dtype=torch.long)
    first.scatter_reduce_(0, cls.reshape(-1), torch.arange(m), reduce="amin")
    keep = nonzero.reshape(-1)[first]
    row_of_class = torch.full_like(first, -1)
    row_of_class[keep] = torch.arange(int(keep.sum()))
    reps = first[keep]
    size, rest = reps // (n * cc), reps % (n * cc)
    return RowPlan(size=size, sample=rest // cc, chan=rest % cc, slot=row_of_class[cls])


def _reference_output(runner: "SiteRunner", cap: Capture, x: torch.Tensor,
                      chan: int) -> torch.Tensor:
    """Clean output [n, D] computed like the perturbed rows (same runner, memory format and
    incremental update with a zero change), so that float rounding of the two paths does
    not enter the differences."""
    n = x.shape[0]
    delta = None
    if cap.leaf_out is not None:
        delta = ([chan] * n, torch.zeros_like(cap.site_out[:, 0]))
    return runner.run_rows(cap, x, range(n), cap.site_out.clone(), delta)


def _row_batch(cap: Capture, plan: RowPlan, pert: torch.Tensor, base: torch.Tensor,
               chans: list[int], idx: slice):
    """(sample rows, site activations [B, C, H, W], (channel per row, change [B, H, W]))
    for the plan's rows ``idx``: the clean activation with one channel replaced."""
    size, sample, chan = plan.size[idx], plan.sample[idx], plan.chan[idx]
    dev = pert.device
    size_d, sample_d, chan_d = size.to(dev), sample.to(dev), chan.to(dev)
    new = pert[size_d, sample_d, chan_d]                                 # [B, H, W]
    rows_c = [chans[c] for c in chan.tolist()]
    act = take_rows(cap.site_out, sample.tolist())
    act[torch.arange(len(rows_c), device=dev), torch.as_tensor(rows_c, device=dev)] = new
    return sample.tolist(), act, (rows_c, new - base[sample_d, chan_d])


def _fast_path(choice: bool | None, cap: Capture) -> bool:
    """Whether an optional speed-up (NHWC rows, BN folding) is used for this site: ``choice``,
    or for None a 4-D site with >= 16 channels (on a few channels neither gains anything,
    and both change the float rounding of the rest of the network)."""
    if cap.site_dim != 4:
        return False
    return bool(choice) if choice is not None else cap.site_out.shape[1] >= 16


def exact_site_sums(model: nn.Module, calls: list[_Call], site: ReluSite,
                    batches: Iterable[torch.Tensor], channels: Sequence[int],
                    sizes: np.ndarray, forward_batch: int = 64,
                    progress: Progress | None = None,
                    stats: dict | None = None, channels_last: bool | None = None,
                    fold_bn: bool | None = None, dedupe: bool = True) -> np.ndarray:
    """Sum over samples of the per-sample output MSE, [len(channels), K] float64 (exact).

    ``channels_last``: run the rest of the network on NHWC activations (faster convolutions
    on CPU). ``fold_bn``: run each eval-mode BatchNorm2d that only reads a Conv2d's output
    after the site as part of that conv (weights scaled once; one pass over the activations
    fewer). None for either: only at 4-D sites with >= 16 channels. ``dedupe``: run identical
    perturbations of a (sample, channel) once. ``stats`` (optional dict) is given
    ``rows_run`` (rows actually run), ``rows_nonzero`` (candidate×sample pairs with a
    non-zero perturbation) and ``rows_total`` (all candidate×sample pairs)."""
    runner = SiteRunner(model, calls, site)
    chan_list = [int(c) for c in channels]
    k = len(sizes)
    sums = torch.zeros(k, len(chan_list), dtype=torch.float64)
    for x in batches:
        cap = runner.capture(x)
        if not _fast_path(fold_bn, cap):
            cap.folds = {}
        if _fast_path(channels_last, cap):
            cap = cap.to_channels_last()
        n = x.shape[0]
        idx = torch.as_tensor(chan_list, dtype=torch.long, device=cap.site_in.device)
        base = cap.site_out[:, idx]
        # perturbed channel values for every size: [K, n, Cc, H, W]
        pert = torch.stack([block_relu_all(cap.site_in[:, idx], s, site.activation)
                            for s in sizes])
        plan = plan_rows(pert, base, dedupe)
        if stats is not None:
            stats["rows_run"] = stats.get("rows_run", 0) + plan.rows
            stats["rows_nonzero"] = stats.get("rows_nonzero", 0) + int((plan.slot >= 0).sum())
            stats["rows_total"] = stats.get("rows_total", 0) + plan.slot.numel()
        mse = torch.zeros(plan.rows + 1, dtype=torch.float64)  # last entry: zero rows
        if plan.rows:
            ref = _reference_output(runner, cap, x, chan_list[0]).double()
            check_finite(ref, "the clean model output")
        for start in range(0, plan.rows, forward_batch):
            part = slice(start, min(start + forward_batch, plan.rows))
            rows, act, delta = _row_batch(cap, plan, pert, base, chan_list, part)
            y = runner.run_rows(cap, x, rows, act, delta if cap.leaf_out is not None else None)
            check_finite(y, f"the output with site '{site.name}' perturbed")
            mse[part] = (y.double() - take_rows(ref, rows)).pow(2).mean(dim=1).cpu()
        sums += mse[plan.slot].sum(dim=1)          # slot -1 picks the zero entry
        if progress is not None:
            progress(n * len(chan_list) * k)
    return sums.T.contiguous().numpy()
