"""On-disk distortion results: one ``.npz`` per site plus ``meta.json`` in one folder.

Layout of a collected results folder (what the knapsack step reads)::

    DIR/meta.json          {"format": FORMAT, "model": str, "input_shape": [C, H, W],
                            "num_samples": int, "seed": int, "method": str,
                            "sites": [site names in forward order]}
    DIR/<quoted name>.npz  site (str), distortion float64 [C, K], block_sizes int32 [K, 2],
                           costs int64 [K], channels, height, width, num_samples, seed,
                           activation (str: 'relu' or 'relu6'; files without it: 'relu')

File names are the site names percent-quoted (``#`` and ``:`` are not portable). Files are
written atomically and read with ``allow_pickle=False``.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from ..brelu import RELU, drelus_per_patch
from ..spec import atomic_write_bytes

FORMAT = "secure-inference-distortion/1"
META = "meta.json"


class DistortionFileError(ValueError):
    """A distortion folder or file that is missing, malformed or inconsistent."""


@dataclass
class SiteDistortion:
    """Distortion of one site: ``distortion[c, k]`` for channel c and candidate k.

    ``activation`` is the site's ('relu', or 'relu6': Block-ReLU6 options, two DReLUs per
    patch, which ``costs`` counts)."""

    site: str
    distortion: np.ndarray   # float64 [C, K]
    block_sizes: np.ndarray  # int32 [K, 2]
    costs: np.ndarray        # int64 [K] DReLUs per channel for the recorded input size
    channels: int
    height: int
    width: int
    num_samples: int
    seed: int
    activation: str = RELU

    @property
    def drelus_per_patch(self) -> int:
        """DReLUs per patch of this site's options (1 for ReLU, 2 for ReLU6)."""
        return drelus_per_patch(self.activation)

    def check(self) -> None:
        """Raise DistortionFileError when shapes or values are inconsistent."""
        c, k = self.channels, len(self.block_sizes)
        if self.distortion.shape != (c, k):
            raise DistortionFileError(f"site '{self.site}': distortion has shape "
                                      f"{list(self.distortion.shape)}, expected [{c}, {k}]")
        if self.block_sizes.shape != (k, 2) or self.costs.shape != (k,):
            raise DistortionFileError(f"site '{self.site}': block_sizes {self.block_sizes.shape} "
                                      f"and costs {self.costs.shape} disagree")
        if not np.all(np.isfinite(self.distortion)):
            bad = int((~np.isfinite(self.distortion)).sum())
            raise DistortionFileError(f"site '{self.site}': {bad} distortion values are NaN/inf")
        try:
            drelus_per_patch(self.activation)
        except ValueError as e:
            raise DistortionFileError(f"site '{self.site}': {e}") from None


def site_filename(site: str) -> str:
    return quote(site, safe="._-") + ".npz"


def site_from_filename(filename: str) -> str:
    return unquote(filename[:-len(".npz")])


def save_site(folder: str | os.PathLike, result: SiteDistortion) -> Path:
    """Write one site's result atomically; returns the file path."""
    result.check()
    buf = io.BytesIO()
    np.savez(buf, site=np.array(result.site), distortion=result.distortion.astype(np.float64),
             block_sizes=result.block_sizes.astype(np.int32), costs=result.costs.astype(np.int64),
             channels=result.channels, height=result.height, width=result.width,
             num_samples=result.num_samples, seed=result.seed,
             activation=np.array(result.activation))
    path = Path(folder) / site_filename(result.site)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_site(path: str | os.PathLike) -> SiteDistortion:
    """Read and check one site file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            result = SiteDistortion(
                site=str(z["site"]), distortion=z["distortion"].astype(np.float64),
                block_sizes=z["block_sizes"].astype(np.int32), costs=z["costs"].astype(np.int64),
                channels=int(z["channels"]), height=int(z["height"]), width=int(z["width"]),
                num_samples=int(z["num_samples"]), seed=int(z["seed"]),
                activation=str(z["activation"]) if "activation" in z.files else RELU)
    # a truncated or corrupted .npz is a BadZipFile (not an OSError) or an EOFError
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DistortionFileError(f"{path}: not a distortion site file or damaged "
                                  f"({type(e).__name__}: {e}); delete it and {META} next to it "
                                  "and rerun the extraction command: the collect step rewrites "
                                  "them from the chunks") from None
    result.check()
    return result


def save_meta(folder: str | os.PathLike, meta: dict) -> None:
    meta = dict(meta, format=FORMAT)
    atomic_write_bytes(Path(folder) / META, json.dumps(meta, indent=1).encode())


def load_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.is_file():
        raise DistortionFileError(f"{folder}: no {META}; is this a collected distortion folder?")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise DistortionFileError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_results(folder: str | os.PathLike) -> tuple[dict, dict[str, SiteDistortion]]:
    """The meta dict and every site's result (in the meta's forward order)."""
    meta = load_meta(folder)
    results = {}
    for site in meta["sites"]:
        path = Path(folder) / site_filename(site)
        if not path.is_file():
            raise DistortionFileError(f"{folder}: site '{site}' is listed in {META} but "
                                      f"{path.name} is missing; rerun the collect step")
        results[site] = load_site(path)
        if results[site].site != site:
            raise DistortionFileError(f"{path}: holds site '{results[site].site}', "
                                      f"expected '{site}'")
    return meta, results
