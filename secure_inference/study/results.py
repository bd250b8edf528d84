"""The study's results file and run plan: one JSON, one entry per finished run, atomic writes.

A run is one (method, budget, seed). It is recorded only when it has finished (finetuned and
evaluated), by rewriting the whole file atomically, so an interruption loses at most the run in
progress; a rerun skips every recorded run. Deleting a run's entry (or the whole ``runs``
dict) makes the next invocation redo it. The file also keeps the study's settings, which a
rerun must match (other settings would mix incomparable numbers).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..spec import atomic_write_bytes
from .budgets import Budget

RESULTS_NAME = "results.json"
FORMAT = 1


@dataclass(frozen=True)
class RunKey:
    """One run of the study."""

    method: str
    budget: str   # the budget label
    seed: int

    @property
    def id(self) -> str:
        return f"{self.method}@{self.budget}#seed{self.seed}"


def plan_runs(methods: Sequence[str], budgets: Sequence[Budget], seeds: Sequence[int],
              max_seeds: Mapping[str, int] | None = None) -> list[RunKey]:
    """Every run: seed by seed, then budget (largest DReLU count first), then method.

    ``max_seeds[method] = k`` runs that method with the first k seeds only. The uniform method
    is skipped at budgets that are not patch sizes. Seed-major order makes a partial study
    cover every method and budget at one seed before the next seed starts.
    """
    max_seeds = dict(max_seeds or {})
    unknown = set(max_seeds) - set(methods)
    if unknown:
        raise ValueError(f"seed limits for methods that are not run: {sorted(unknown)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds in {list(seeds)}")
    runs = []
    for i, seed in enumerate(seeds):
        for b in sorted(budgets, key=lambda b: -b.drelus):
            for m in methods:
                if m == "uniform" and b.uniform_size is None:
                    continue
                if i < max_seeds.get(m, len(seeds)):
                    runs.append(RunKey(m, b.label, int(seed)))
    return runs


class ResultsFile:
    """``<work_dir>/results.json``: settings, baseline, specs and finished runs."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"format": FORMAT, "settings": {}, "baseline": None,
                                     "specs": {}, "runs": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path} is not valid JSON ({e}); restore it or use "
                                 "another work dir") from None
            if loaded.get("format") != FORMAT:
                raise ValueError(f"{self.path} has format {loaded.get('format')!r}, expected "
                                 f"{FORMAT}; use another work dir")
            self.data.update(loaded)

    def save(self) -> None:
        """Write the whole file atomically (readers see the old or the new file)."""
        atomic_write_bytes(self.path, (json.dumps(self.data, indent=1) + "\n").encode())

    def check_settings(self, settings: Mapping[str, Any],
                       defaults: Mapping[str, Any] | None = None) -> None:
        """Adopt ``settings`` for a new file; refuse a rerun whose settings differ. A setting
        the file does not record counts as recorded with its value in ``defaults`` (settings
        added after the file was made)."""
        old = self.data.get("settings") or {}
        if old:
            old = {**{k: v for k, v in (defaults or {}).items() if k not in old}, **old}
            diffs = [f"{k}: recorded {old.get(k)!r}, now {settings.get(k)!r}"
                     for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if diffs:
                raise ValueError(f"{self.path} was made with other settings:\n  "
                                 + "\n  ".join(diffs) + "\nrerun with the recorded settings "
                                 "or use another --work-dir")
        self.data["settings"] = dict(settings)

    def done(self, key: RunKey) -> bool:
        return key.id in self.data["runs"]

    def record(self, key: RunKey, entry: Mapping[str, Any]) -> None:
        """Record a finished run and save."""
        self.data["runs"][key.id] = {"method": key.method, "budget": key.budget,
                                     "seed": key.seed, **entry}
        self.save()

    def forget(self, key: RunKey) -> None:
        """Drop a run (it is redone by the next invocation) and save."""
        self.data["runs"].pop(key.id, None)
        self.save()

    @property
    def runs(self) -> list[dict]:
        return list(self.data["runs"].values())
