"""Resumable runs on disk: chunks, fingerprint, collect, workers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.data import random_images
from helpers.nets import tiny_resnet
from secure_inference.distortion import extract, load_results
from secure_inference.distortion.jobs import (CHUNKS, Job, ResultsExistError,
                                              collect, pending_chunks, prepare_folder,
                                              run_chunks, run_job)

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(max_rect=2, max_block_size=3)


def _samples(n=4, seed=1):
    return random_images(n, 8, seed)


def _job(method="exact", model=None, samples=None, **kw):
    return Job(model=model or tiny_resnet(0), model_id="tiny", seed=3,
               samples=_samples() if samples is None else samples, method=method,
               batch_size=kw.pop("batch_size", 3), chunk_channels=kw.pop("chunk_channels", 3),
               **SMALL, **kw)


def test_resume_after_interruption_equals_one_shot(tmp_path):
    job = _job()
    total = len(job.chunks())
    assert total > 5
    assert run_job(job, tmp_path / "run", max_chunks=2) is None       # "killed" after 2 chunks
    assert len(pending_chunks(job, tmp_path / "run")) == total - 2
    # a leftover temp file of the chunk in flight does not count as done
    (tmp_path / "run" / CHUNKS / ".stem.2__00003-00004.npz.x.tmp").write_bytes(b"partial")
    done = run_chunks(_job(), tmp_path / "run")                         # the rerun
    assert len(done) == total - 2                                       # finished ones skipped
    resumed = collect(job, tmp_path / "run")
    oneshot = extract(tiny_resnet(0), _samples(), batch_size=3, **SMALL)
    assert list(resumed) == list(oneshot)
    for name in oneshot:
        np.testing.assert_allclose(resumed[name].distortion, oneshot[name].distortion,
                                   rtol=1e-4, atol=1e-10)


def test_collect_format_readable_by_store(tmp_path):
    job = _job()
    results = run_job(job, tmp_path)
    meta, loaded = load_results(tmp_path)
    assert meta["model"] == "tiny" and meta["input_shape"] == [3, 8, 8]
    assert meta["num_samples"] == 4 and meta["seed"] == 3 and meta["method"] == "exact"
    assert meta["sites"] == [s.name for s in job.site_list]
    for name, res in loaded.items():
        assert res.distortion.shape == (res.channels, len(res.block_sizes))
        np.testing.assert_array_equal(res.distortion, results[name].distortion)
        assert res.num_samples == 4 and res.seed == 3
        assert res.costs[0] == res.height * res.width and res.costs[-1] == 0  # ReLU / identity
    # rerunning a complete folder reads it back and rewrites nothing
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = run_job(_job(), tmp_path)
    assert set(again) == set(results)
    assert stamp == {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}


def test_other_model_or_input_size_is_refused(tmp_path):
    run_job(_job(), tmp_path, max_chunks=1)
    before = sorted(p.name for p in (tmp_path / CHUNKS).iterdir())
    with pytest.raises(ResultsExistError, match="weights_sha256"):
        prepare_folder(tmp_path, _job(model=tiny_resnet(1)))
    with pytest.raises(ResultsExistError, match="input_shape"):
        prepare_folder(tmp_path, _job(samples=torch.randn(4, 3, 12, 12)))
    with pytest.raises(ResultsExistError, match="method"):
        prepare_folder(tmp_path, _job(method="linear"))
    assert sorted(p.name for p in (tmp_path / CHUNKS).iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ResultsExistError, match="not empty"):
        prepare_folder(other, _job())
    assert (other / "notes.txt").read_text() == "mine"


def test_linear_jobs_split_by_samples_match_library(tmp_path):
    job = _job(method="linear", num_projections=4)
    assert all(c.site is None for c in job.chunks())
    res = run_job(job, tmp_path)
    lib = extract(tiny_resnet(0), _samples(), method="linear", batch_size=3, num_projections=4,
                  seed=3, **SMALL)
    for name in lib:
        np.testing.assert_allclose(res[name].distortion, lib[name].distortion, rtol=1e-6)


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "research" / "extract_block_sizes.py"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.processes
def test_two_workers_equal_one_worker(tmp_path, image_folder):
    common = ["--model", "helpers.nets:factory", "--image-folder", str(image_folder),
              "--input-shape", "3", "8", "8", "--num_samples", "4", "--max-rect", "2",
              "--max-block-size", "3", "--chunk-channels", "3", "--no-progress",
              "--sites", "layer1.relu#1", "pre.act", "layer2.relu#0"]
    # one worker, in process (same library path the CLI uses)
    one = tmp_path / "one"
    from secure_inference.distortion.data import folder_samples, IMAGENET_MEAN, IMAGENET_STD
    samples = folder_samples(image_folder, (3, 8, 8), 4, 0, IMAGENET_MEAN, IMAGENET_STD)
    ref = run_job(Job(model=tiny_resnet(0), model_id="model:helpers.nets:factory",
                      samples=samples, seed=0, sites=["layer1.relu#1", "pre.act",
                                                      "layer2.relu#0"],
                      chunk_channels=3, **SMALL), one)
    # two workers (torchrun, gloo)
    two = tmp_path / "two"
    r = _cli(common + ["--output_path", str(two), "--num_gpus", "2", "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 worker(s)" in r.stderr
    meta, res = load_results(two)
    assert meta["sites"] == list(ref)
    for name in ref:
        np.testing.assert_allclose(res[name].distortion, ref[name].distortion,
                                   rtol=1e-4, atol=1e-10)


@pytest.mark.slow  # test_resume_after_interruption_equals_one_shot covers resuming (chunk limit)
@pytest.mark.processes
def test_killed_worker_loses_only_chunk_in_flight(tmp_path, image_folder):
    """A real kill: SIGKILL the CLI once chunks appear; the rerun completes the run."""
    import signal
    import time
    out = tmp_path / "run"
    args = ["--model", "helpers.nets:factory", "--image-folder", str(image_folder),
            "--input-shape", "3", "8", "8", "--num_samples", "4", "--max-rect", "2",
            "--max-block-size", "3", "--chunk-channels", "1", "--no-progress",
            "--output_path", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "research" / "extract_block_sizes.py"),
                             *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / CHUNKS).glob("*.npz"))) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_before = {p.name: p.read_bytes() for p in (out / CHUNKS).glob("*.npz")}
    assert done_before and not (out / "meta.json").exists()
    r = _cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, data in done_before.items():          # finished chunks were kept, not redone
        assert (out / CHUNKS / name).read_bytes() == data
    meta, res = load_results(out)
    assert len(res) == 7 and all(np.isfinite(v.distortion).all() for v in res.values())


@pytest.mark.parametrize("setting,flag", [("batch_size", "--batch_size"),
                                          ("forward_batch", "--forward-batch")])
def test_resume_with_other_batching_is_refused(tmp_path, setting, flag):
    # both change the float sums of an exact run in their last bits, so chunks of two runs
    # with different values are no uninterrupted run: the folder refuses the resume
    run_job(_job(forward_batch=5), tmp_path, max_chunks=1)
    other = {"batch_size": 2, "forward_batch": 5} if setting == "batch_size" else \
        {"batch_size": 3, "forward_batch": 7}
    before = sorted(p.name for p in (tmp_path / CHUNKS).iterdir())
    with pytest.raises(ResultsExistError) as err:
        prepare_folder(tmp_path, _job(**other))
    old_value = 3 if setting == "batch_size" else 5
    assert f"{setting}: folder has {old_value}, this run has {other[setting]}" in str(err.value)
    assert f"rerun with the folder's setting(s) {flag} {old_value}" in str(err.value)
    assert "another --output_path" in str(err.value)
    with pytest.raises(ResultsExistError):  # run_job (the library entry point) refuses too
        run_job(_job(**other), tmp_path)
    assert sorted(p.name for p in (tmp_path / CHUNKS).iterdir()) == before
    assert run_job(_job(forward_batch=5), tmp_path, max_chunks=1) is None  # same values resume


def test_forward_batch_is_not_recorded_where_it_is_unused(tmp_path):
    for method in ("naive", "linear"):
        run_job(_job(method=method, forward_batch=5), tmp_path / method, max_chunks=1)
        assert prepare_folder(tmp_path / method, _job(method=method, forward_batch=9)) is False
        with pytest.raises(ResultsExistError, match="batch_size: folder has 3, this run has 2"):
            prepare_folder(tmp_path / method, _job(method=method, batch_size=2))


def test_truncated_chunk_file_is_named_at_collect(tmp_path):
    job = _job()
    run_job(job, tmp_path, max_chunks=2)
    victim = sorted((tmp_path / CHUNKS).iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    run_chunks(_job(), tmp_path)
    from secure_inference.distortion.base import DistortionError
    with pytest.raises(DistortionError, match=f"{victim.name}: damaged chunk file.*BadZipFile"
                                              ".*delete it and rerun"):
        collect(job, tmp_path)
    victim.unlink()  # what the message says to do
    assert run_job(_job(), tmp_path) is not None


def test_truncated_site_file_is_named_when_read(tmp_path):
    run_job(_job(), tmp_path)
    victim = next(p for p in tmp_path.iterdir() if p.suffix == ".npz")
    victim.write_bytes(victim.read_bytes()[:100])
    from secure_inference.distortion.store import DistortionFileError
    with pytest.raises(DistortionFileError, match=f"{victim.name}: .*damaged.*delete it"):
        load_results(tmp_path)
    victim.unlink()
    (tmp_path / "meta.json").unlink()
    assert set(run_job(_job(), tmp_path)) == {s.name for s in _job().site_list}
