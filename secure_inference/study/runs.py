"""One study: build every method's spec at every budget, finetune each (method, budget, seed)
with the config's recipe from the baseline checkpoint, evaluate on the config's test split.

Runs go through the mmengine Runner (:mod:`secure_inference.mmlab.runner`): one after another
in this process (``jobs=1``), or ``jobs`` at a time in worker processes, in plan order as
their specs become ready, while this process builds the specs the later runs need (each once,
here, cheapest first: uniform, linear, exact, iterative). Each run lives in ``<work_dir>/runs/<method>/<budget>/seed<k>/``
and is recorded in ``<work_dir>/results.json`` by this process when it has finished (see
:mod:`.results`). A run folder without a record is an interrupted run and is cleared before
the run starts again.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..spec import count_drelus, extract_block_spec, load_spec, save_spec
from .budgets import Budget, label_slug, resolve_budgets
from .methods import METHODS, SpecBuilder
from .results import RESULTS_NAME, ResultsFile, RunKey, plan_runs

Event = Callable[[str, dict], None]


@dataclass
class Study:
    """Everything that defines a study (recorded in the results file)."""

    config: str                      # MMLab classification config: model, data, finetune recipe
    checkpoint: str                  # baseline checkpoint (all ReLUs)
    work_dir: str
    budgets: list[str]
    methods: list[str]
    seeds: list[int]
    max_seeds: dict[str, int] = field(default_factory=dict)
    num_samples: int = 256           # distortion samples (training images)
    distortion_seed: int = 0
    num_projections: int = 8         # linear estimate: random projections per sample
    iterative_rounds: int = 3
    iterative_samples: int | None = None  # images of the iterative re-measurements (None: all)
    distill_temperature: float = 4.0
    distill_weight: float = 1.0
    cfg_options: dict = field(default_factory=dict)
    bytes_width: int = 64            # comparison width (bits) of the bytes per image recorded
                                     # for every spec and run, and of knapsack_bytes' prices

    def check(self) -> None:
        """Raise ValueError for unknown methods or empty lists."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        if not self.methods or not self.budgets or not self.seeds:
            raise ValueError("a study needs at least one method, budget and seed")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"duplicate methods in {self.methods}")
        if not 3 <= int(self.bytes_width) <= 64:
            raise ValueError(f"bytes_width must lie in [3, 64] bits, got {self.bytes_width}")

    def settings(self) -> dict[str, Any]:
        """What a rerun must match (the work dir and the run lists may change). The config
        and checkpoint are recorded relative to the work dir (:func:`path_from_work`), so a
        results file names no path of the machine it was made on and the tree can move."""
        out = asdict(self)
        for k in ("work_dir", "budgets", "methods", "seeds", "max_seeds"):
            out.pop(k)
        work = Path(self.work_dir).resolve()
        for k in ("config", "checkpoint"):
            out[k] = os.path.relpath(Path(out[k]).resolve(), work)
        return out


SETTING_DEFAULTS = {"bytes_width": 64}
"""Settings added after the first studies: a results file that does not record them was made
with these values (so its work dir can still be resumed)."""


def path_from_work(work_dir: str | os.PathLike, recorded: str) -> Path:
    """A path recorded in a study's settings (relative to its work dir) as a usable path."""
    return Path(work_dir) / recorded


def spec_method(method: str) -> str:
    """The method whose spec a method finetunes (distillation reuses the knapsack spec)."""
    return "knapsack" if method == "knapsack_kd" else method


def eval_batches(cfg, model: nn.Module, batch_size: int = 256
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The config's ``test_dataloader`` dataset as model-ready (inputs, labels) batches, in
    order, through ``model``'s data preprocessor (the same for every run of a study)."""
    from ..mmlab.datasets import build_dataset, preprocessed_batches
    dataset = build_dataset(cfg, cfg["test_dataloader"]["dataset"])
    return [(x, torch.tensor([int(s.gt_label) for s in samples]))
            for x, samples in preprocessed_batches(dataset, model, range(len(dataset)),
                                                   batch_size)]


def top1_accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
                  ) -> float:
    """Top-1 accuracy of ``model`` over preprocessed (inputs, labels) batches."""
    from ..sites import run_model
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for x, y in batches:
            correct += int((run_model(model, x).argmax(1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


@contextmanager
def unformatted_config_text() -> Iterator[None]:
    """Let mmengine write configs without running yapf over them, for the duration.

    The Runner renders its config as text five or six times per run (log, dump, visualiser,
    every checkpoint's meta) and formats it with yapf each time: seconds per rendering on a
    loaded 2-core CPU, most of the time of a short finetune. The unformatted text is the same
    Python, only laid out differently.
    """
    import mmengine.config.config as config_module
    original = config_module.FormatCode
    config_module.FormatCode = lambda text, **kwargs: (text, False)
    try:
        yield
    finally:
        config_module.FormatCode = original


def finetune(config: str, baseline: str, spec, run_dir: Path, seed: int, *,
             distill: dict | None = None, cfg_options: dict | None = None) -> Path:
    """Finetune ``baseline`` with ``spec`` by the config's recipe; returns the final checkpoint
    (``run_dir/final.pth``, recording the spec). ``distill``: temperature and loss_weight of
    distillation from the baseline (None: off)."""
    from ..mmlab.runner import prepare_training
    opts = dict(cfg_options or {})
    opts["randomness"] = dict(seed=int(seed), deterministic=False)
    opts.setdefault("log_level", "WARNING")
    opts["experiment_name"] = f"{run_dir.name}_{time.time_ns()}"
    if distill is not None:
        opts["secure_inference.distill"] = dict(enabled=True, teacher_checkpoint=str(baseline),
                                                **distill)
    with unformatted_config_text():
        _, _, runner = prepare_training(config, spec=spec, work_dir=str(run_dir),
                                        load_from=str(baseline), cfg_options=opts)
        runner.train()
        runner.save_checkpoint(str(run_dir), "final.pth", save_optimizer=False,
                               save_param_scheduler=False)
    for old in run_dir.glob("epoch_*.pth"):
        old.unlink()
    for old in run_dir.glob("iter_*.pth"):
        old.unlink()
    return run_dir / "final.pth"


@dataclass
class EvalContext:
    """What every run of a study evaluates with: the config, the input shape, the ReLU sites
    and the preprocessed test batches (built once per process)."""

    cfg: Any
    shape: tuple
    sites: list
    batches: list


def eval_context(study: Study, baseline: nn.Module | None = None,
                 cfg: Any = None) -> EvalContext:
    """The study's :class:`EvalContext` (loads the config and the baseline if not given)."""
    from ..mmlab.config_utils import input_shape_from_cfg, load_task_config
    from ..mmlab.finetune import load_finetuned
    from ..sites import find_relu_sites
    if cfg is None:
        cfg = load_task_config(study.config, study.cfg_options or None)
    shape = input_shape_from_cfg(cfg)
    if baseline is None:
        baseline = load_finetuned(cfg, study.checkpoint)
    return EvalContext(cfg, shape, find_relu_sites(baseline, shape),
                       eval_batches(cfg, baseline))


def execute_run(study: Study, ctx: EvalContext, run: RunKey, spec, spec_drelus: int,
                budget_drelus: int) -> dict:
    """Finetune and evaluate one run (its folder cleared first); returns its results entry
    (with the finetuned model's exact bytes per image at ``study.bytes_width``)."""
    from ..mmlab.finetune import load_finetuned
    from .methods import spec_wire_bytes
    work = Path(study.work_dir)
    run_dir = run_folder(work, run)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    distill = (dict(temperature=study.distill_temperature, loss_weight=study.distill_weight)
               if METHODS[run.method].distill else None)
    ckpt = finetune(study.config, study.checkpoint, spec, run_dir, run.seed,
                    distill=distill, cfg_options=study.cfg_options)
    t1 = time.perf_counter()
    model = load_finetuned(ctx.cfg, ckpt)
    final_spec = extract_block_spec(model, ctx.shape)
    drelus = count_drelus(final_spec, ctx.sites)["total"]
    if drelus != spec_drelus:
        raise RuntimeError(f"{run.id}: the finetuned model has {drelus:,} DReLUs but its "
                           f"spec has {spec_drelus:,}")
    accuracy = top1_accuracy(model, ctx.batches)
    t2 = time.perf_counter()
    return {"drelus": drelus, "budget_drelus": budget_drelus,
            "bytes": spec_wire_bytes(final_spec, ctx.sites, study.bytes_width),
            "bytes_width": int(study.bytes_width), "accuracy": accuracy,
            "checkpoint": str(ckpt.relative_to(work)),
            "seconds_finetune": round(t1 - t0, 2), "seconds_eval": round(t2 - t1, 2)}


def run_folder(work: Path, run: RunKey) -> Path:
    """``<work>/runs/<method>/<budget slug>/seed<k>``."""
    return work / "runs" / run.method / label_slug(run.budget) / f"seed{run.seed}"


# --- worker processes (jobs > 1) ------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _worker_init(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _worker_run(study: Study, run: RunKey, spec_file: str, spec_drelus: int,
                budget_drelus: int) -> dict:
    """One run in a worker process (the evaluation context is built once per worker)."""
    if _WORKER.get("study") != study:
        _WORKER.update(study=study, ctx=eval_context(study))
    return execute_run(study, _WORKER["ctx"], run, load_spec(spec_file), spec_drelus,
                       budget_drelus)


SPEC_COST = {"uniform": 0, "knapsack_linear": 1, "iterative": 3}  # others: 2 (exact distortion)


def run_study(study: Study, on_event: Event | None = None, jobs: int = 1,
              worker_threads: int | None = None) -> ResultsFile:
    """Run every pending run of ``study``; returns the results file.

    ``jobs`` > 1 finetunes that many runs at a time in worker processes (``worker_threads``
    torch threads each), in plan order as their specs become ready, while this process builds
    the remaining specs (cheapest first). A failed run is
    reported and left unrecorded; the other runs go on, and the first failure is raised at
    the end.

    ``on_event(kind, info)`` reports progress: 'baseline', 'spec', 'skip', 'start', 'done',
    'failed' (with jobs > 1, 'done' and 'failed' come from a helper thread, one at a time).
    """
    from ..distortion.data import config_samples
    from ..mmlab.config_utils import load_task_config
    from ..mmlab.finetune import load_finetuned
    from ..sites import total_relus

    study.check()
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    emit = on_event or (lambda kind, info: None)
    work = Path(study.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(work / RESULTS_NAME)
    results.check_settings(study.settings(), SETTING_DEFAULTS)
    cfg = load_task_config(study.config, study.cfg_options or None)
    baseline = load_finetuned(cfg, study.checkpoint)
    ctx = eval_context(study, baseline, cfg)
    shape, sites = ctx.shape, ctx.sites
    budgets = resolve_budgets(study.budgets, sites)
    by_label = {b.label: b for b in budgets}
    if results.data.get("baseline") is None:
        t0 = time.perf_counter()
        results.data["baseline"] = {"accuracy": top1_accuracy(baseline, ctx.batches),
                                    "drelus": total_relus(sites),
                                    "test_images": sum(len(b[1]) for b in ctx.batches),
                                    "seconds_eval": round(time.perf_counter() - t0, 2)}
        results.save()
    if "bytes" not in results.data["baseline"]:
        from .methods import spec_wire_bytes
        results.data["baseline"].update(bytes=spec_wire_bytes({}, sites, study.bytes_width),
                                        bytes_width=int(study.bytes_width))
    results.data.setdefault("budgets", {}).update(
        {b.label: {"drelus": b.drelus, "share": b.drelus / total_relus(sites)}
         for b in budgets})
    for label, entry in results.data["specs"].items():   # specs recorded before bytes were
        if "bytes" not in entry and (work / entry["file"]).is_file():
            from .methods import spec_wire_bytes
            entry["bytes"] = spec_wire_bytes(load_spec(work / entry["file"]), sites,
                                             study.bytes_width)
    results.save()
    emit("baseline", dict(results.data["baseline"], sites=len(sites)))

    runs = plan_runs(study.methods, budgets, study.seeds, study.max_seeds)
    pending = [r for r in runs if not results.done(r)]
    for r in runs:
        if results.done(r):
            emit("skip", {"run": r.id})
    if not pending:
        return results

    builder: SpecBuilder | None = None
    lock = threading.Lock()  # results.json and events: this thread and the pool's callbacks

    def get_builder() -> SpecBuilder:
        nonlocal builder
        if builder is None:
            samples = config_samples(cfg, baseline, study.num_samples, study.distortion_seed,
                                     shape)
            builder = SpecBuilder(baseline, samples, work / "distortion",
                                  model_id=(f"{Path(study.config).resolve()} + "
                                            f"{Path(study.checkpoint).resolve()}"),
                                  seed=study.distortion_seed,
                                  num_projections=study.num_projections,
                                  iterative_rounds=study.iterative_rounds,
                                  remeasure_samples=study.iterative_samples,
                                  bytes_width=study.bytes_width)
        return builder

    def get_spec(method: str, budget: Budget) -> tuple[Any, dict, Path]:
        name = spec_method(method)
        key = f"{name}@{budget.label}"
        path = work / "specs" / f"{name}_{budget.slug}.pickle"
        with lock:
            entry = results.data["specs"].get(key)
        if entry is not None and path.is_file():
            return load_spec(path), entry, path
        t0 = time.perf_counter()
        built = get_builder().build(name, budget)
        save_spec(built.spec, path)
        entry = {"method": name, "budget": budget.label, "budget_drelus": budget.drelus,
                 "drelus": built.drelus, "bytes": built.bytes,
                 "bytes_width": int(study.bytes_width), "file": str(path.relative_to(work)),
                 "seconds": round(time.perf_counter() - t0, 2), **built.details}
        with lock:
            results.data["specs"][key] = entry
            results.save()
            emit("spec", dict(entry))
        return built.spec, entry, path

    if jobs == 1:
        for i, run in enumerate(pending):
            budget = by_label[run.budget]
            spec, spec_entry, _ = get_spec(run.method, budget)
            emit("start", {"run": run.id, "index": i, "pending": len(pending)})
            entry = execute_run(study, ctx, run, spec, spec_entry["drelus"], budget.drelus)
            results.record(run, entry)
            emit("done", {"run": run.id, "index": i, "pending": len(pending), **entry})
        return results

    # jobs > 1: runs go to the pool in plan order (seed-major, so a partial study covers every
    # method and budget at the first seed) as soon as their spec exists; while no run is
    # ready, this process builds the next missing spec, cheapest first; a small buffer of
    # queued runs keeps the workers busy while a spec is being built.
    failures: list[tuple[str, BaseException]] = []
    finished = [0]

    def on_finished(run: RunKey, index: int, future: Future) -> None:
        with lock:
            if future.cancelled():
                return
            error = future.exception()
            if error is not None:
                failures.append((run.id, error))
                emit("failed", {"run": run.id, "index": index, "pending": len(pending),
                                "error": f"{type(error).__name__}: {error}"})
                return
            entry = future.result()
            results.record(run, entry)
            finished[0] += 1
            emit("done", {"run": run.id, "index": index, "pending": len(pending),
                          "finished": finished[0], "jobs": jobs, **entry})

    def spec_ready(run: RunKey) -> bool:
        name = spec_method(run.method)
        budget = by_label[run.budget]
        with lock:
            known = f"{name}@{budget.label}" in results.data["specs"]
        return known and (work / "specs" / f"{name}_{budget.slug}.pickle").is_file()

    buffer = 3 * jobs
    waiting = list(range(len(pending)))          # plan order
    in_flight: set[Future] = set()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(worker_threads,))
    try:
        while waiting or in_flight:
            in_flight = {f for f in in_flight if not f.done()}
            ready = [i for i in waiting if spec_ready(pending[i])]
            if ready and len(in_flight) < buffer:
                i = ready[0]
                waiting.remove(i)
                run = pending[i]
                budget = by_label[run.budget]
                _, spec_entry, path = get_spec(run.method, budget)   # loads the built spec
                future = pool.submit(_worker_run, study, run, str(path), spec_entry["drelus"],
                                     budget.drelus)
                with lock:
                    emit("start", {"run": run.id, "index": i, "pending": len(pending),
                                   "queued": True})
                future.add_done_callback(lambda f, run=run, i=i: on_finished(run, i, f))
                in_flight.add(future)
            elif len(ready) < len(waiting):
                # build the cheapest missing spec (uniform, linear, exact, iterative)
                missing = [pending[i] for i in waiting if not spec_ready(pending[i])]
                run = min(missing, key=lambda r: SPEC_COST.get(r.method, 2))
                get_spec(run.method, by_label[run.budget])
            else:
                wait(in_flight, return_when=FIRST_COMPLETED)
        pool.shutdown(wait=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    if failures:
        run_id, error = failures[0]
        raise RuntimeError(f"{len(failures)} run(s) failed (recorded runs are kept; rerun to "
                           f"retry): first {run_id}: {type(error).__name__}: {error}") from error
    return results
