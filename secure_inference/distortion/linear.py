"""The linear distortion estimate: vector-Jacobian products with Rademacher projections give
the first-order distortion of every site, channel and size at once (see :mod:`.engine`)."""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..sites import ReluSite, run_model
from .base import DistortionError, Progress
from .tensors import as_4d, block_relu_all, check_finite, output_matrix
from .calls import _Call, _CallCounter
from .site_runner import SiteRunner


def projection_seed(seed: int, first_sample: int) -> int:
    """Seed of the projections of the batch starting at ``first_sample`` (not secret)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(first_sample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def linear_sums(model: nn.Module, calls: list[_Call], sites: Sequence[ReluSite],
                batches: Iterable[torch.Tensor], sizes: dict[str, np.ndarray],
                num_projections: int = 8, seed: int = 0, first_sample: int = 0,
                progress: Progress | None = None) -> dict[str, np.ndarray]:
    """First-order estimate (sums over samples) of the distortion [C, K] of every site.

    The projections of the batch starting at sample ``first_sample + offset`` come from a
    generator seeded by :func:`projection_seed` (``seed``, that sample index), so results do
    not depend on how samples are split between workers with the same batch size.
    """
    runners = {s.name: SiteRunner(model, calls, s) for s in sites}
    by_call = {r.site_call: name for name, r in runners.items()}
    sums = {s.name: np.zeros((s.channels, len(sizes[s.name]))) for s in sites}
    r = int(num_projections)
    if r < 1:
        raise DistortionError("num_projections must be >= 1")
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    offset = int(first_sample)
    try:
        for x in batches:
            n = x.shape[0]
            generator = torch.Generator().manual_seed(projection_seed(seed, offset))
            offset += n
            counter = _CallCounter(model)
            ins: dict[str, torch.Tensor] = {}
            outs: dict[str, torch.Tensor] = {}
            zs: dict[str, torch.Tensor] = {}

            def pre(idx, module, args):
                name = by_call.get(idx)
                if name is not None:
                    ins[name] = as_4d(args[0])[:n].detach().clone()

            def post(idx, module, out):
                name = by_call.get(idx)
                if name is None:
                    return None
                outs[name] = as_4d(out)[:n].detach().clone()
                z = torch.zeros_like(out, requires_grad=True)
                zs[name] = z
                return out + z

            counter.on_pre, counter.on_post = pre, post
            xr = x.repeat(r, *([1] * (x.dim() - 1)))  # projection-major rows: j*n + i
            with torch.enable_grad(), counter:
                y = output_matrix(run_model(model, xr))
                check_finite(y.detach(), "the clean model output")
                u = torch.randint(0, 2, y.shape, generator=generator,
                                  device="cpu").to(y.device, y.dtype) * 2 - 1
                missing = [s.name for s in sites if s.name not in zs]
                if missing:
                    raise DistortionError(f"sites {missing} were not reached in the forward")
                names = [s.name for s in sites]
                grads = torch.autograd.grad((u * y).sum(), [zs[nm] for nm in names],
                                            allow_unused=True)
            d_out = y.shape[1]
            for site, g in zip(sites, grads):
                name = site.name
                if g is None:
                    continue
                g = as_4d(g.detach()).reshape(r, n, *outs[name].shape[1:]).double()
                for ki, size in enumerate(sizes[name]):
                    delta = (block_relu_all(ins[name], size, site.activation)
                             - outs[name]).double()
                    proj = (g * delta[None]).sum(dim=(3, 4))           # [R, n, C]
                    est = proj.pow(2).mean(dim=0) / d_out              # [n, C]
                    sums[name][:, ki] += est.sum(dim=0).cpu().numpy()
            if progress is not None:
                progress(n * sum(s.channels * len(sizes[s.name]) for s in sites))
    finally:
        for p in params:
            p.requires_grad_(True)
    return sums
