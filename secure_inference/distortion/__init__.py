"""Distortion extraction: how much the output moves when one channel becomes a Block-ReLU.

``extract(model, samples, sites=None, method="exact")`` for plain torch models;
:mod:`.jobs` adds resumable, multi-worker runs on disk; :mod:`.store` is the results format
the knapsack step reads; :mod:`.data` draws the samples from MMLab configs or image folders.
"""
from .api import METHODS, extract, resolve_sites, site_candidates
from .engine import DistortionError
from .store import (DistortionFileError, SiteDistortion, load_results, load_site, save_meta,
                    save_site)

__all__ = ["METHODS", "DistortionError", "DistortionFileError", "SiteDistortion", "extract",
           "load_results", "load_site", "resolve_sites", "save_meta", "save_site",
           "site_candidates"]
