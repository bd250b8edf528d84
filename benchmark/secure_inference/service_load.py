#!/usr/bin/env python
"""Service-mode load benchmark (issue 24): a real si-server --serve and si-crypto-provider
--serve on loopback (TLS with make_certificates.py's certificates on 127.0.0.1/.2/.3, as in
tests/mpc/test_service.py), driven by real clients.

It measures
  * throughput at 1, 2 and 4 concurrent clients (--clients): every client runs
    --sessions-per-client sessions back to back, each of --images images; sessions per minute
    and seconds per image (wall time of the level over its images), and the mean session
    latency; --repeats runs of each level, interleaved, medians reported;
  * the server's and the helper's service parent processes (not the per-session processes):
    resident memory (VmRSS of /proc/PID/status) and open file descriptors
    (len(os.listdir('/proc/PID/fd'))) after 2, 20 and 100 sequential sessions
    (--memory-after) and again after the load levels. Each snapshot waits until both parents
    have logged (reaped) every session so far.

Clients are warm worker processes (spawned once, torch imported) that call the client CLI's
``run()`` with the same flags as ``si-client``, so the figures measure the service, not Python
start-up; worker 0 runs the memory sessions first and every other worker one untimed session
before the levels (a process's first session imports and compiles more). Every output is checked against the plaintext model, every session must be logged
"ok" by both services, and both must exit 0 on SIGTERM.

The model (``service_load:small_cnn``, defined here, random weights with seed 0): 3x32x32 input,
conv 3->16 (3x3) + ReLU, conv 16->32 (3x3, stride 2) + ReLU, 2x2 average pool, conv 32->32 (3x3)
+ ReLU, 8x8 average pool, linear 32->10: 26,624 ReLUs per image.

    .venv/bin/python benchmark/secure_inference/service_load.py \\
        --out benchmark/secure_inference/results_service_load.json

Results: benchmark/secure_inference/README_service.md.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CLI = ROOT / "research" / "secure_inference"
INPUT_SHAPE = (3, 32, 32)


def small_cnn():
    """The benchmark's model (``--model service_load:small_cnn``): 26,624 ReLUs at 32x32."""
    import torch
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(8), nn.Flatten(), nn.Linear(32, 10))


def _register_this_module() -> None:
    """Make ``import service_load`` (the client's ``--model service_load:small_cnn``) find
    this file without editing sys.path; the server and the helper get it via PYTHONPATH."""
    import importlib.util
    if "service_load" not in sys.modules:
        spec = importlib.util.spec_from_file_location("service_load", HERE / "service_load.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["service_load"] = module
        spec.loader.exec_module(module)


# --- the client workers ------------------------------------------------------------------------

def _worker(tasks: mp.Queue, results: mp.Queue, threads: int) -> None:
    """A warm client process: runs the sessions it is sent (argv, output prefix, count) and
    answers each task with one record per session."""
    _register_this_module()   # --model service_load:small_cnn resolves to this file
    import torch
    torch.set_num_threads(threads)
    from secure_inference.cli.client import run
    results.put("ready")
    while True:
        task = tasks.get()
        if task is None:
            return
        argv, prefix, count = task
        records = []
        for k in range(count):
            output = f"{prefix}_{k}.npz"
            busy = 0
            while True:
                err, out = io.StringIO(), io.StringIO()
                start = time.monotonic()
                try:
                    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                        code = run([*argv, "--output", output])
                    failure = None if code == 0 else f"exit {code}: {err.getvalue()[-500:]}"
                except Exception as exc:  # noqa: BLE001 - recorded, the run fails below
                    code, failure = 1, f"{type(exc).__name__}: {exc}"
                end = time.monotonic()
                if failure and "is busy" in failure and busy < 50:
                    busy += 1
                    time.sleep(0.1)
                    continue
                break
            try:
                summary = json.loads(out.getvalue())     # the client's cost per image
            except ValueError:
                summary = {}
            records.append({"start": start, "end": end, "seconds": end - start,
                            "output": output, "failure": failure, "busy_retries": busy,
                            "summary": summary})
        results.put(records)


class Clients:
    """``n`` warm client worker processes (spawned, torch imported before timing starts)."""

    def __init__(self, n: int, threads: int):
        ctx = mp.get_context("spawn")
        self.results: mp.Queue = ctx.Queue()
        self.queues = [ctx.Queue() for _ in range(n)]
        self.procs = [ctx.Process(target=_worker, args=(q, self.results, threads), daemon=True)
                      for q in self.queues]
        for p in self.procs:
            p.start()
        for _ in self.procs:
            assert self.results.get(timeout=300) == "ready"

    def run(self, concurrent: int, argv: list[str], prefix: str, count: int) -> list[dict]:
        """``concurrent`` clients at once, each ``count`` sessions back to back."""
        for i in range(concurrent):
            self.queues[i].put((argv, f"{prefix}_c{i}", count))
        records: list[dict] = []
        for _ in range(concurrent):
            records += self.results.get(timeout=1800)
        return records

    def run_one(self, i: int, argv: list[str], prefix: str) -> list[dict]:
        """One session on worker ``i`` (its first call of the client imports and compiles)."""
        self.queues[i].put((argv, prefix, 1))
        return self.results.get(timeout=1800)

    def close(self) -> None:
        """End the workers."""
        for q in self.queues:
            q.put(None)
        for p in self.procs:
            p.join(30)


# --- the services --------------------------------------------------------------------------------

class Service:
    """One ``--serve`` party as a subprocess, its stderr collected by a thread."""

    def __init__(self, script: str, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, str(CLI / script), *argv], env=env,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "ready: serving at" in line:
                self.ready.set()

    def wait_ready(self, timeout: float = 180) -> None:
        """Until the ready line (the model is compiled and the port is listening)."""
        if not self.ready.wait(timeout):
            raise RuntimeError("service not ready:\n" + "".join(self.lines))

    def sessions(self) -> list[dict]:
        """The session events logged so far (--log-json)."""
        out = []
        for line in list(self.lines):
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "session":
                    out.append(event)
        return out

    def usage(self) -> dict[str, int]:
        """The parent's resident memory (kB) and open file descriptors now."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = next(int(line.split()[1]) for line in status.splitlines()
                   if line.startswith("VmRSS:"))
        return {"rss_kb": rss, "fds": len(os.listdir(f"/proc/{self.proc.pid}/fd"))}

    def stop(self) -> int:
        """SIGTERM (drain) and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(120)
        self.thread.join(10)
        return code


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _snapshot(services: dict[str, Service], sessions: int) -> dict[str, Any]:
    """Memory and descriptors of both parents once each has logged ``sessions`` sessions."""
    deadline = time.monotonic() + 120
    while any(len(s.sessions()) < sessions for s in services.values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the services did not log {sessions} sessions")
        time.sleep(0.05)
    time.sleep(0.2)
    return {"sessions": sessions, **{name: s.usage() for name, s in services.items()}}


def _level_run(recs: list[dict], images_per_session: int) -> dict[str, Any]:
    """One run of a load level: its wall time (first start to last end), throughput, latency,
    busy answers and the 1-minute load average at its end."""
    wall = max(r["end"] for r in recs) - min(r["start"] for r in recs)
    images = len(recs) * images_per_session
    lat = [r["seconds"] for r in recs]
    return {"sessions": len(recs), "images": images, "wall_s": round(wall, 3),
            "sessions_per_min": round(len(recs) / wall * 60, 2),
            "s_per_image": round(wall / images, 4),
            "session_latency_mean_s": round(statistics.mean(lat), 3),
            "busy_retries": sum(r["busy_retries"] for r in recs),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def _level(clients: int, runs: list[dict]) -> dict[str, Any]:
    """A level's runs and their medians (and ranges of sessions per minute)."""
    spm = [r["sessions_per_min"] for r in runs]
    return {"clients": clients, "runs": runs,
            "sessions_per_min": round(statistics.median(spm), 2),
            "sessions_per_min_range": [min(spm), max(spm)],
            "s_per_image": round(statistics.median(r["s_per_image"] for r in runs), 4),
            "session_latency_s": round(statistics.median(r["session_latency_mean_s"]
                                                         for r in runs), 3),
            "busy_retries": sum(r["busy_retries"] for r in runs)}


def _memory_growth(memory: list[dict], names, first: int, twenty: int) -> dict[str, Any]:
    """Per party: RSS after ``twenty`` over after ``first`` sessions, kB and descriptors gained
    from ``first`` to every later snapshot, and bytes per session between snapshots."""
    at = {m["sessions"]: m for m in memory}
    out: dict[str, Any] = {}
    for name in names:
        a, b = at[first][name], at[twenty][name]
        later = [m for m in memory if m["sessions"] > first]
        out[name] = {
            f"rss_after_{twenty}_over_after_{first}": round(b["rss_kb"] / a["rss_kb"], 5),
            "rss_kb_gained_since_first": {m["sessions"]: m[name]["rss_kb"] - a["rss_kb"]
                                          for m in later},
            "fds_gained_since_first": {m["sessions"]: m[name]["fds"] - a["fds"]
                                       for m in later},
            "rss_bytes_per_session": {
                f"{p['sessions']}-{m['sessions']}":
                    round((m[name]["rss_kb"] - p[name]["rss_kb"]) * 1024
                          / (m["sessions"] - p["sessions"]))
                for p, m in zip([at[first]] + later, later)}}
    return out


def _machine() -> dict[str, Any]:
    import torch
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"cpus": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "commit": commit}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results_service_load.json",
                        help="JSON results (default %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4],
                        help="concurrent clients per load level (default 1 2 4)")
    parser.add_argument("--sessions-per-client", type=int, default=10,
                        help="sessions each client runs back to back per level (default 10)")
    parser.add_argument("--images", type=int, default=4,
                        help="images per session, one batch (default 4)")
    parser.add_argument("--memory-after", type=int, nargs="+", default=[2, 20, 100],
                        help="memory/descriptor snapshots after this many sequential sessions "
                        "(default 2 20 100)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every load level, interleaved (1 2 4 1 2 4 ...); the "
                        "medians are reported (default 3: the machine may be shared)")
    parser.add_argument("--max-sessions", type=int, default=8,
                        help="the services' --max-sessions (default 8: above the largest "
                        "level, so that a client whose previous session is still being "
                        "reaped is not told busy; busy answers are retried and counted)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per party process (default 1)")
    parser.add_argument("--plaintext", action="store_true",
                        help="plaintext links on 127.0.0.1 instead of TLS")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix="service_load_") as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        model = small_cnn().eval()
        torch.save(model.state_dict(), tmp / "ck.pth")
        x = torch.randn(args.images, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
        np.save(tmp / "x.npy", x.numpy())
        with torch.no_grad():
            ref = model(x).numpy()
        if args.plaintext:
            hosts = {"client": "127.0.0.1", "server": "127.0.0.1", "helper": "127.0.0.1"}
            links = ["--plaintext"]
        else:
            hosts = {"client": "127.0.0.1", "server": "127.0.0.2", "helper": "127.0.0.3"}
            subprocess.run([sys.executable, str(CLI / "make_certificates.py"), str(tmp / "certs"),
                            "--client-host", hosts["client"], "--server-host", hosts["server"],
                            "--helper-host", hosts["helper"]], check=True, capture_output=True,
                           env=env)
            links = ["--certs", str(tmp / "certs"), "--client", hosts["client"]]
        common = ["--model", "service_load:small_cnn", "--input-shape",
                  *map(str, INPUT_SHAPE), *links,
                  "--server", f"{hosts['server']}:{_free_port(hosts['server'])}",
                  "--helper", f"{hosts['helper']}:{_free_port(hosts['helper'])}",
                  "--threads", str(args.threads), "--timeout", "60"]
        serve = ["--serve", "--log-json", "--max-sessions", str(args.max_sessions),
                 "--max-batch", str(max(64, args.images))]
        clients = Clients(max(args.clients), args.threads)
        services = {"helper": Service("crypto_provider.py", [*common, *serve], env)}
        services["helper"].wait_ready()
        services["server"] = Service("server.py", [*common, "--checkpoint", str(tmp / "ck.pth"),
                                                   *serve], env)
        services["server"].wait_ready()
        client_argv = [*common, "--images", str(tmp / "x.npy"), "--batch-size",
                       str(args.images)]
        records: list[dict] = []
        try:
            memory = [_snapshot(services, 0)]
            done = 0
            for target in sorted(args.memory_after):
                records += clients.run(1, client_argv, str(tmp / f"m{target}"), target - done)
                done = target
                memory.append(_snapshot(services, done))
            for i in range(1, max(args.clients)):   # warm the other workers (untimed)
                records += clients.run_one(i, client_argv, str(tmp / f"w{i}"))
                done += 1
            runs: dict[int, list[dict]] = {n: [] for n in args.clients}
            for rep in range(args.repeats):          # levels interleaved: 1 2 4 1 2 4 ...
                for n in args.clients:
                    recs = clients.run(n, client_argv, str(tmp / f"l{n}_{rep}"),
                                       args.sessions_per_client)
                    records += recs
                    done += len(recs)
                    runs[n].append(_level_run(recs, args.images))
            memory.append(_snapshot(services, done))
            levels = [_level(n, runs[n]) for n in args.clients]
        finally:
            clients.close()
            codes = {name: s.stop() for name, s in services.items()}
        failures = [r["failure"] for r in records if r["failure"]]
        if failures:
            raise SystemExit(f"{len(failures)} sessions failed, the first: {failures[0]}")
        errors = [float(np.abs(np.load(r["output"])["logits"] - ref).max()) for r in records]
        logged = {name: [e["outcome"] for e in s.sessions()] for name, s in services.items()}
    for name, outcomes in logged.items():
        if len(outcomes) != len(records) or set(outcomes) != {"ok"}:
            raise SystemExit(f"{name} logged {len(outcomes)} sessions, not {len(records)} ok")
    if set(codes.values()) != {0}:
        raise SystemExit(f"the services exited with {codes} on SIGTERM")
    if max(errors) > 1e-2:
        raise SystemExit(f"an output differs from the plaintext model by {max(errors)}")

    first = min(args.memory_after)
    twenty = 20 if 20 in args.memory_after else max(args.memory_after)
    one = levels[0]["sessions_per_min"]
    result = {
        "what": "service mode load (issue 24): sessions per minute and seconds per image at "
                "several concurrent clients; the service parents' resident memory and open "
                "descriptors after n sessions",
        "command": " ".join([".venv/bin/python", "benchmark/secure_inference/service_load.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": _machine(),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "model": "service_load:small_cnn (3x32x32, 3 convs, 26,624 ReLUs per image)",
        "links": "plaintext loopback" if args.plaintext else "TLS, 127.0.0.1/.2/.3",
        "images_per_session": args.images, "threads_per_party": args.threads,
        "max_sessions": args.max_sessions,
        "levels": levels,
        "sessions_per_min_relative_to_1_client": {str(lv["clients"]):
                                                  round(lv["sessions_per_min"] / one, 3)
                                                  for lv in levels},
        "memory": memory,
        "memory_growth": _memory_growth(memory, list(services), first, twenty),
        "max_abs_error_vs_plaintext": max(errors),
        "client_summary_of_the_last_session": records[-1]["summary"],
        "sessions_total": len(records),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for lv in levels:
        print(f"{lv['clients']} clients: {lv['sessions_per_min']:.1f} sessions/min "
              f"(range {lv['sessions_per_min_range']}), {lv['s_per_image']:.4f} s/image, "
              f"latency {lv['session_latency_s']:.3f} s, busy {lv['busy_retries']}")
    for m in memory:
        print(f"after {m['sessions']:4d} sessions: " + ", ".join(
            f"{name} {m[name]['rss_kb']} kB {m[name]['fds']} fds" for name in services))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
