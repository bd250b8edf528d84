"""Distortion extraction: how much the output moves when one channel becomes a Block-ReLU.

``extract(model, samples, sites=None, method="exact")`` for plain torch models;
:mod:`.jobs` adds resumable, multi-worker runs on disk; :mod:`.store` is the results format
the knapsack step reads; :mod:`.data` draws the samples from MMLab configs or image folders.

The engines, one module each (:mod:`.naive`, :mod:`.exact`, :mod:`.linear`; shared pieces in
:mod:`.base`, :mod:`.tensors`, :mod:`.calls`, :mod:`.site_runner`), all compute, for one
activation site s, channel c and candidate block size b::

    D[s][c, b] = mean over samples of mean((f_{s,c,b}(x) - f(x))**2)

where ``f`` is the model output (``run_model``: logits, or decode-head logits) and
``f_{s,c,b}`` the same network with only channel c of site s replaced by Block-ReLU(b).
Their ``*_sums`` functions return *sums* over samples (float64); :func:`extract` divides by N.

* **naive**: one forward of the whole network per (channel, size), Block-ReLU modules swapped
  in; the reference the others are tested against.
* **exact**: the network is run once per sample batch to capture (a) the site's input and
  output and (b) the outputs of every module call that completed before the site's call
  started. The remainder of the network is then re-run on a batch of *rows*, one row per
  (sample, channel, size) whose perturbation is non-zero: module calls that completed before
  the site return their cached output (rows gathered from it only when later code reads it)
  instead of computing, the site returns the perturbed activation, everything after runs
  normally. Because only the site's *output* is substituted, skip connections that read the
  site's input, modules called at several sites and in-place operations behave exactly as
  in the clean network. Rows whose perturbation is zero (e.g. [1, 1] at a ReLU site)
  contribute exactly 0 and are not run. When the first module after the site is a plain
  Conv2d reading the site's output unchanged, it is updated incrementally: clean conv
  output + the convolution of the one changed channel (one batched matmul over all rows).
  Candidates of one (sample, channel) whose perturbed channels are equal share one row.
  At sites with >= 16 channels the rows run NHWC (faster CPU convolutions) and each
  eval-mode BatchNorm2d reading only a conv's output runs folded into that conv; the clean
  reference output is computed by the same runner, so both sides of every difference are
  rounded alike. The forward must be static (same module call order every run); this is
  checked.
* **linear**: ``f(a + d) - f(a) ≈ J d``, so ``mean((J d)**2) = E_u[(u·J d)**2] / D`` for a
  Rademacher vector u over the D outputs; ``u·J d = (Jᵀu)·d`` and ``Jᵀu`` at every site comes
  from one vector-Jacobian product. R projections per sample give an unbiased estimate of the
  first-order distortion for all sites, channels and sizes from R forward/backward passes.
"""
from .api import METHODS, extract, resolve_sites, site_candidates
from .base import DistortionError
from .store import (DistortionFileError, SiteDistortion, load_results, load_site, save_meta,
                    save_site)

__all__ = ["METHODS", "DistortionError", "DistortionFileError", "SiteDistortion", "extract",
           "load_results", "load_site", "resolve_sites", "save_meta", "save_site",
           "site_candidates"]
