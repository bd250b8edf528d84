"""Resumable, splittable distortion runs: chunks on disk, a folder fingerprint, the collect step.

A run folder holds::

    DIR/fingerprint.json        what is being computed (model weights hash, input shape, sites,
                                samples hash, seed, method, candidate rule, chunk layout)
    DIR/chunks/<chunk>.npz      one finished unit of work (sums over all samples), atomic
    DIR/meta.json + DIR/*.npz   the collected results (store.py format), written last

Work units: 'exact'/'naive' split by (site, channel range), every unit over all samples;
'linear' costs the same for all channels, so its units are sample ranges over all sites.
Workers (ranks) take the units whose index is congruent to their rank; finished units are
skipped on a rerun, so a killed run loses at most the units in flight.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..brelu import RELU
from ..sites import ReluSite
from ..spec import atomic_write_bytes
from .api import METHODS, resolve_sites, site_candidates
from .base import DistortionError
from .calls import trace_calls
from .exact import exact_site_sums
from .linear import linear_sums
from .naive import naive_site_sums
from .store import META, SiteDistortion, load_results, save_meta, save_site, site_filename

FINGERPRINT = "fingerprint.json"
CHUNKS = "chunks"


class ResultsExistError(DistortionError):
    """The output folder already holds results this run must not overwrite."""


def weights_sha256(model: nn.Module) -> str:
    """Hash of the model's parameters and buffers (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}:{list(t.shape)};".encode()
                          + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class Chunk:
    """One unit of work: a site's channel range (exact/naive) or a sample range (linear)."""

    index: int
    site: str | None
    start: int
    stop: int

    @property
    def name(self) -> str:
        if self.site is None:
            return f"samples_{self.start:07d}-{self.stop:07d}"
        return f"{site_filename(self.site)[:-4]}__{self.start:05d}-{self.stop:05d}"


@dataclass
class Job:
    """Everything a distortion run needs; the same on every worker."""

    model: nn.Module
    model_id: str
    samples: torch.Tensor            # [N, C, H, W], the model's real inputs (CPU)
    seed: int
    method: str = "exact"
    sites: Sequence[str] | None = None
    batch_size: int = 16
    forward_batch: int = 64
    chunk_channels: int = 16
    num_projections: int = 8
    max_rect: int = 4
    max_block_size: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DistortionError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.samples.dim() != 4 or self.samples.shape[0] == 0:
            raise DistortionError(f"samples must be a non-empty [N, C, H, W] tensor, got "
                                  f"{list(self.samples.shape)}")
        for name in ("batch_size", "forward_batch", "chunk_channels", "num_projections"):
            if int(getattr(self, name)) < 1:
                raise DistortionError(f"{name} must be >= 1")
        self.model = self.model.to(self.device).eval()
        self.input_shape = tuple(int(s) for s in self.samples.shape[1:])
        self.site_list: list[ReluSite] = resolve_sites(self.model, self.input_shape, self.sites)
        self.candidates = {s.name: site_candidates(s, self.max_rect, self.max_block_size)
                           for s in self.site_list}
        self._fingerprint: dict | None = None

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    def fingerprint(self) -> dict:
        """What this run computes; a folder holding another fingerprint is refused."""
        if self._fingerprint is None:
            fp = {
                "model": self.model_id,
                "weights_sha256": weights_sha256(self.model),
                "input_shape": list(self.input_shape),
                # ReLU6 sites name their activation (ReLU sites as before: old folders resume)
                "sites": [[s.name, s.channels, s.height, s.width]
                          + ([s.activation] if s.activation != RELU else [])
                          for s in self.site_list],
                "num_samples": self.num_samples,
                "seed": int(self.seed),
                "samples_sha256": tensor_sha256(self.samples),
                "method": self.method,
                "max_rect": self.max_rect,
                "max_block_size": self.max_block_size,
            }
            # batching changes the float sums in their last bits (which samples share a
            # batched forward, how many perturbed rows share one): a resumed run must use the
            # same values to be bit-identical, so every setting a method reads is recorded
            if self.method == "linear":
                fp.update(num_projections=self.num_projections, batch_size=self.batch_size)
            else:
                fp.update(chunk_channels=self.chunk_channels, batch_size=int(self.batch_size))
                if self.method == "exact":
                    fp.update(forward_batch=int(self.forward_batch))
            self._fingerprint = fp
        return self._fingerprint

    def chunks(self) -> list[Chunk]:
        """All units of work, in a fixed order."""
        out: list[Chunk] = []
        if self.method == "linear":
            for start in range(0, self.num_samples, self.batch_size):
                out.append(Chunk(len(out), None, start,
                                 min(start + self.batch_size, self.num_samples)))
            return out
        for s in self.site_list:
            for start in range(0, s.channels, self.chunk_channels):
                out.append(Chunk(len(out), s.name, start,
                                 min(start + self.chunk_channels, s.channels)))
        return out

    def evaluations(self, chunk: Chunk) -> int:
        """Candidate×sample evaluations of a chunk (for progress bars)."""
        if chunk.site is None:
            n = chunk.stop - chunk.start
            return n * sum(s.channels * len(self.candidates[s.name][0]) for s in self.site_list)
        return ((chunk.stop - chunk.start) * len(self.candidates[chunk.site][0])
                * self.num_samples)

    def batches(self, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        data = self.samples[start:stop]
        return [b.to(self.device) for b in data.split(self.batch_size)]

    def compute(self, chunk: Chunk, progress: Callable[[int], None] | None = None
                ) -> dict[str, np.ndarray]:
        """The sums over samples for one chunk: {site: [channels, K]}."""
        if not hasattr(self, "_calls"):
            self._calls = trace_calls(self.model, self.samples[:1].to(self.device))
        if chunk.site is None:
            sizes = {k: v[0] for k, v in self.candidates.items()}
            return linear_sums(self.model, self._calls, self.site_list,
                               self.batches(chunk.start, chunk.stop), sizes,
                               self.num_projections, self.seed, chunk.start, progress)
        site = next(s for s in self.site_list if s.name == chunk.site)
        sizes = self.candidates[site.name][0]
        channels = range(chunk.start, chunk.stop)
        if self.method == "exact":
            sums = exact_site_sums(self.model, self._calls, site, self.batches(), channels,
                                   sizes, self.forward_batch, progress)
        else:
            sums = naive_site_sums(self.model, site, self.batches(), channels, sizes,
                                   self.input_shape, progress)
        return {site.name: sums}


# --------------------------------------------------------------------------- the run folder

def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        if old.get(k) != new.get(k):
            a, b = json.dumps(old.get(k)), json.dumps(new.get(k))
            out.append(f"{k}: folder has {a[:80]}, this run has {b[:80]}")
    return out


# fingerprint entries a user sets on the extraction command line (named in refusals)
_OPTIONS = {"batch_size": "--batch_size", "forward_batch": "--forward-batch",
            "chunk_channels": "--chunk-channels", "num_projections": "--num-projections",
            "max_rect": "--max-rect", "max_block_size": "--max-block-size", "seed": "--seed",
            "method": "--method", "num_samples": "--num_samples"}


def prepare_folder(folder: str | os.PathLike, job: Job, create: bool = True) -> bool:
    """Check (and with ``create``, initialise) a run folder; True when results are complete.

    Raises when the folder holds another run's results or unrelated files: nothing existing
    is ever overwritten.
    """
    folder = Path(folder)
    fp = job.fingerprint()
    fp_path = folder / FINGERPRINT
    if fp_path.is_file():
        try:
            old = json.loads(fp_path.read_text())
        except json.JSONDecodeError as e:
            raise DistortionError(f"{fp_path} is not valid JSON ({e}); the folder is damaged: "
                                  "use another --output_path") from None
        diffs = _diff(old, fp)
        if diffs:
            rerun = [f"{_OPTIONS[k]} {json.dumps(old[k])}" for k in sorted(set(old) | set(fp))
                     if k in _OPTIONS and k in old and old.get(k) != fp.get(k)]
            hint = (f"To resume that run, rerun with the folder's setting(s) {' '.join(rerun)}; "
                    "for a new run use another --output_path" if rerun else
                    "Use another --output_path")
            raise ResultsExistError(
                f"output folder {folder} holds distortion results of a different run "
                f"(model, input size, samples or settings differ):\n  " + "\n  ".join(diffs)
                + f"\n{hint} (existing results are never overwritten).")
        return (folder / META).is_file()
    if folder.exists() and any(folder.iterdir()):
        raise ResultsExistError(f"output folder {folder} is not empty and holds no "
                                f"{FINGERPRINT}: it is not a distortion run folder. Use an "
                                "empty or new folder (existing files are never overwritten).")
    if create:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(fp_path, json.dumps(fp, indent=1).encode())
    return False


def chunk_path(folder: str | os.PathLike, chunk: Chunk) -> Path:
    return Path(folder) / CHUNKS / f"{chunk.name}.npz"


def _save_chunk(folder, job: Job, chunk: Chunk, sums: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    arrays = {f"site_{i}": np.asarray(sums[s.name], dtype=np.float64)
              for i, s in enumerate(job.site_list) if s.name in sums}
    np.savez(buf, chunk=np.array(chunk.name), fingerprint=np.array(_fp_hash(job)), **arrays)
    atomic_write_bytes(chunk_path(folder, chunk), buf.getvalue())


def _fp_hash(job: Job) -> str:
    return hashlib.sha256(json.dumps(job.fingerprint(), sort_keys=True).encode()).hexdigest()


def _load_chunk(folder, job: Job, chunk: Chunk) -> dict[str, np.ndarray]:
    path = chunk_path(folder, chunk)
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = str(z["chunk"]), str(z["fingerprint"])
            out = {s.name: z[f"site_{i}"] for i, s in enumerate(job.site_list)
                   if f"site_{i}" in z.files}
    # a truncated or corrupted .npz is a BadZipFile (not an OSError) or an EOFError
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DistortionError(f"{path}: damaged chunk file ({type(e).__name__}: {e}); delete "
                              "it and rerun") from None
    if ids != (chunk.name, _fp_hash(job)):
        raise DistortionError(f"{path} belongs to another run or chunk; delete it and rerun")
    return out


def chunk_done(folder, chunk: Chunk) -> bool:
    return chunk_path(folder, chunk).is_file()


def run_chunks(job: Job, folder: str | os.PathLike, rank: int = 0, world_size: int = 1,
               max_chunks: int | None = None,
               progress: Callable[[int], None] | None = None) -> list[str]:
    """Compute this worker's pending chunks (index % world_size == rank), each saved atomically
    when done; returns the names of the chunks computed. ``max_chunks`` stops early (for tests
    and for splitting a run into sessions)."""
    done: list[str] = []
    for chunk in job.chunks():
        if chunk.index % world_size != rank or chunk_done(folder, chunk):
            continue
        if max_chunks is not None and len(done) >= max_chunks:
            break
        sums = job.compute(chunk, progress)
        for name, arr in sums.items():
            if not np.all(np.isfinite(arr)):
                raise DistortionError(f"site '{name}': non-finite distortion in chunk "
                                      f"{chunk.name}")
        _save_chunk(folder, job, chunk, sums)
        done.append(chunk.name)
    return done


def pending_chunks(job: Job, folder: str | os.PathLike) -> list[Chunk]:
    return [c for c in job.chunks() if not chunk_done(folder, c)]


def collect(job: Job, folder: str | os.PathLike) -> dict[str, SiteDistortion]:
    """Join the chunk files into the store.py format (one file per site + meta.json)."""
    folder = Path(folder)
    missing = pending_chunks(job, folder)
    if missing:
        raise DistortionError(f"{len(missing)} chunk(s) are not finished (e.g. "
                              f"{missing[0].name}); rerun the extraction to complete them")
    totals = {s.name: np.zeros((s.channels, len(job.candidates[s.name][0])))
              for s in job.site_list}
    for chunk in job.chunks():
        part = _load_chunk(folder, job, chunk)
        if chunk.site is None:
            for name, arr in part.items():
                totals[name] += arr
        else:
            totals[chunk.site][chunk.start:chunk.stop] = part[chunk.site]
    results: dict[str, SiteDistortion] = {}
    for s in job.site_list:
        sizes, costs = job.candidates[s.name]
        res = SiteDistortion(site=s.name, distortion=totals[s.name] / job.num_samples,
                             block_sizes=sizes, costs=costs, channels=s.channels,
                             height=s.height, width=s.width, num_samples=job.num_samples,
                             seed=int(job.seed), activation=s.activation)
        res.check()
        results[s.name] = res
    for res in results.values():
        save_site(folder, res)
    fp = job.fingerprint()
    save_meta(folder, {"model": job.model_id, "input_shape": list(job.input_shape),
                       "num_samples": job.num_samples, "seed": int(job.seed),
                       "method": job.method, "sites": [s.name for s in job.site_list],
                       "weights_sha256": fp["weights_sha256"],
                       "samples_sha256": fp["samples_sha256"], "max_rect": job.max_rect,
                       "max_block_size": job.max_block_size})
    return results


def run_job(job: Job, folder: str | os.PathLike, max_chunks: int | None = None,
            progress: Callable[[int], None] | None = None) -> dict[str, SiteDistortion] | None:
    """Single-process run: prepare the folder, compute pending chunks, collect.

    Returns the results, or None when ``max_chunks`` stopped the run before the end. A folder
    whose results are already complete is read back, not recomputed.
    """
    if prepare_folder(folder, job):
        return load_results(folder)[1]
    run_chunks(job, folder, max_chunks=max_chunks, progress=progress)
    if pending_chunks(job, folder):
        return None
    return collect(job, folder)


def run_worker(job: Job, folder: str | os.PathLike, rank: int = 0, world_size: int = 1, *,
               barrier: Callable[[], None] | None = None, max_chunks: int | None = None,
               make_progress: Callable[[int], Callable[[int], None]] | None = None,
               log: Callable[[str], None] | None = None) -> str:
    """One worker's share of a (possibly multi-process) run; rank 0 prepares and collects.

    ``barrier`` synchronises the workers (``torch.distributed.barrier`` under torchrun; None
    for one process); ``make_progress(total)`` returns a progress callback for this worker's
    evaluations; ``log`` receives rank 0's messages. Returns ``'complete'`` (the folder already
    held the results), ``'pending'`` (chunks remain: rerun to resume), ``'collected'``
    (rank 0 wrote the results) or ``'done'`` (another rank's share finished).
    """
    say = log if (log is not None and rank == 0) else (lambda *_: None)
    folder = Path(folder)
    complete = prepare_folder(folder, job, create=True) if rank == 0 else None
    if barrier is not None:
        barrier()
        if rank != 0:
            complete = prepare_folder(folder, job, create=False)
    if complete:
        say(f"{folder} already holds the complete results of this run; nothing to do")
        return "complete"
    mine = [c for c in pending_chunks(job, folder) if c.index % world_size == rank]
    if max_chunks is not None:
        mine = mine[:max_chunks]
    total = sum(job.evaluations(c) for c in mine)
    say(f"{len(job.site_list)} sites, {len(job.chunks())} chunks "
        f"({len(pending_chunks(job, folder))} pending), {world_size} worker(s), "
        f"method {job.method}, {job.num_samples} samples")
    progress = make_progress(total) if make_progress is not None else None
    run_chunks(job, folder, rank=rank, world_size=world_size, max_chunks=max_chunks,
               progress=progress)
    if barrier is not None:
        barrier()
    if rank != 0:
        return "done"
    left = len(pending_chunks(job, folder))
    if left:
        say(f"stopped with {left} chunk(s) pending; rerun the same command to resume")
        return "pending"
    collect(job, folder)
    say(f"wrote {len(job.site_list)} site files and meta.json to {folder}")
    return "collected"
