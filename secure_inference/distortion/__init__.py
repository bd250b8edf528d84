"""Distortion extraction: how much the output moves when one channel becomes a Block-ReLU."""
from .store import (DistortionFileError, SiteDistortion, load_results, load_site, save_meta,
                    save_site)

__all__ = ["DistortionFileError", "SiteDistortion", "load_results", "load_site", "save_meta",
           "save_site"]
