"""Faults of the local three-process harness: a party killed at every phase (the fault matrix),
a run_local caller stopped by SIGTERM or SIGKILL (no processes and no private files are left),
and a script that calls run_local without a main guard."""
from __future__ import annotations

import functools
import multiprocessing.forkserver
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from secure_inference.mpc.compile import compile_model
from secure_inference.mpc.errors import ProtocolError
from secure_inference.mpc.faults import FAULT_PHASES
from secure_inference.mpc.harness import run_local_processes

from helpers import mpc_process_fns as fns

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.processes,  # every test here starts Python processes
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def _ppid_state(pid: int) -> tuple[int, str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    st = _ppid_state(pid)
    return st is not None and st[1] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _ppid_state(int(entry))
            if st is not None and st[0] == pid and st[1] not in ("Z", "X"):
                out.append(int(entry))
    return out


def _descendants(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        for c in _children(todo.pop()):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _wait_gone(pids, seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = {p for p in pids if _alive(p)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5)).eval()


@pytest.fixture(scope="module")
def tiny():
    program, weights = compile_model(_tiny_net(), (1, 3, 8, 8))
    return program, weights, [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)]


# --- the fault matrix: party x phase x SIGKILL ---------------------------------------------

@pytest.mark.parametrize("phase", FAULT_PHASES)
@pytest.mark.parametrize("dead", [0, 1, 2])
def test_killed_party_at_every_phase(dead, phase, tiny):
    """The party ``dead`` is SIGKILLed at its first message of ``phase``: the run fails within
    seconds (not by timeout), every survivor that fails names the dead party (directly or as
    reported by the other survivor's abort goodbye), and no party process is left."""
    program, weights, batches = tiny
    fn = functools.partial(fns.run_and_report, program=program)
    start = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        run_local_processes(fn, tls=False, timeout=30, wall_timeout=60,
                            private={0: batches, 1: weights}, _fault=(dead, phase))
    assert time.monotonic() - start < 15   # the survivors noticed; nobody waited for a timeout
    errs = info.value.party_errors
    assert re.search(f"party {dead} was killed by signal {int(signal.SIGKILL)}", errs[dead])
    assert f"party {dead} was killed" in str(info.value)
    survivors = [r for r in (0, 1, 2) if r != dead]
    # after the report exchange started, a survivor whose part is done may finish normally;
    # before it, and for the client (which receives the reports), every survivor fails
    must_fail = survivors if phase != "report" else [r for r in survivors if r == 0]
    for r in must_fail:
        assert r in errs, f"party {r} did not notice that party {dead} died"
    for r in survivors:
        if r in errs:
            assert re.search(rf"party {dead} (closed the link|failed)|link to party {dead}:",
                             errs[r]), errs[r]
    forkserver = multiprocessing.forkserver._forkserver._forkserver_pid
    assert not _wait_gone(_children(forkserver), 3.0)


def test_abort_goodbye_names_the_party_that_failed_first(tiny):
    """Helper killed in preprocessing while the client waits on the server: the server's abort
    goodbye tells the client that party 2 failed (before: "party 1 closed the link")."""
    program, weights, batches = tiny
    fn = functools.partial(fns.run_and_report, program=program)
    with pytest.raises(ProtocolError) as info:
        run_local_processes(fn, tls=False, timeout=30, wall_timeout=60,
                            private={0: batches, 1: weights}, _fault=(2, "preprocess"))
    client = info.value.party_errors[0]
    assert "party 2" in client and "party 1 closed the link" not in client, client


def test_abort_goodbye_carries_no_private_message():
    """A server failing with its own error (here one that quotes a weight) tells the peers
    which party failed and the error's type, never its message: the goodbye reaches the
    client and the helper, and an error text may hold secrets."""
    with pytest.raises(ValueError, match="42.4242") as info:   # the failed party keeps it
        run_local_processes(fns.server_fails_with_a_private_message, tls=False, timeout=20,
                            wall_timeout=60)
    for role in (0, 2):
        seen = info.value.party_errors[role]
        assert "party 1 failed" in seen and "ValueError" in seen, seen
        assert "42.4242" not in seen, seen


# --- the run_local caller stopped from outside -----------------------------------------------

_CALLER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from secure_inference.mpc import run_local
    {guard}
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 8 * 8, 5)).eval()
        run_local(net, torch.randn({n}, 3, 8, 8), batch_size=1, tls=True, timeout=30)
        print("finished", flush=True)
""")


def _start_caller(tmp_path: Path, n: int, guard: bool) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "caller.py"
    body = _CALLER.format(n=n, guard='if __name__ == "__main__":' if guard else "if True:")
    script.write_text(body)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, tmp


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_caller_leaves_no_processes_and_no_private_files(sig, tmp_path):
    proc, tmp = _start_caller(tmp_path, n=20000, guard=True)   # a run of minutes
    try:
        deadline = time.monotonic() + 120
        while True:   # wait until the three parties run (children of the fork server)
            tree = _descendants(proc.pid)
            parties = [p for p in tree if _ppid_state(p) and _ppid_state(p)[0] != proc.pid]
            if len(parties) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the parties never started"
            time.sleep(0.1)
        time.sleep(1.0)   # mid-run
        tree = _descendants(proc.pid)
        assert len(tree) >= 5   # fork server, resource tracker, three parties
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        left = _wait_gone(tree, 5.0)   # before reading the pipes: orphans would hold them
    finally:
        for pid in [proc.pid] + sorted(_descendants(proc.pid) | set(locals().get("tree", ()))):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left after {sig.name}: {left}"
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -sig, err[-2000:]
    assert "finished" not in out
    # no si-run-*/si-certs-* folder and no file with content (images, weights, keys) is left;
    # multiprocessing's own pymp-* folder may keep its fork server's (empty) socket
    assert not [p for p in tmp.iterdir() if p.name.startswith("si-")]
    files = [p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()]
    assert not files, f"files left in TMPDIR: {files}"


def test_missing_main_guard_gets_a_clear_message(tmp_path):
    proc, _ = _start_caller(tmp_path, n=2, guard=False)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert 'if __name__ == "__main__":' in err, err[-3000:]
    assert "can only join a started process" not in err
    assert "RuntimeError: the party processes could not start" in err
