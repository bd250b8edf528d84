"""Shared pytest set-up: the package (and its compatibility fixes) is imported first."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import secure_inference  # noqa: E402,F401  (applies the compat fixes before torchvision/MMLab)

import multiprocessing.process  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# --- the `processes` mark ---------------------------------------------------------------------
# A test that starts Python processes (party processes, CLIs in a subprocess, worker pools) is
# marked `processes`, so `make test-quick` (-m "not slow and not processes") can leave the
# process-heavy tests out of the inner loop. The mark is enforced: an unmarked test that
# starts a Python interpreter or a multiprocessing child fails and says to add the mark.
# (Non-Python children such as the compiler probes of mmengine's environment report are not
# counted.)

_VENV_BIN = Path(sys.executable).parent
_started: list[str] = []


def _is_python_command(args) -> bool:
    argv = [args] if isinstance(args, (str, bytes, Path)) else list(args or [])
    if not argv:
        return False
    first = str(argv[0]).split()[0] if isinstance(argv[0], str) else str(argv[0])
    path = Path(first)
    return (path.name.startswith("python") or first == sys.executable
            or _is_python_script(path)
            or path.name.endswith(".sh") or any(str(a).endswith(".sh") for a in argv[:2]))


def _is_python_script(path: Path) -> bool:
    """A console script of this environment (si-*, lint-imports, ...): a Python shebang."""
    if path.parent != _VENV_BIN or not path.is_file():
        return False
    with open(path, "rb") as f:
        return b"python" in f.readline()


_original_popen_init = subprocess.Popen.__init__
_original_process_start = multiprocessing.process.BaseProcess.start


def _recording_popen_init(self, args, *rest, **kwargs):
    if _is_python_command(args):
        _started.append(f"subprocess {str(args)[:120]}")
    _original_popen_init(self, args, *rest, **kwargs)


def _recording_process_start(self):
    _started.append(f"multiprocessing {type(self).__name__}")
    _original_process_start(self)


subprocess.Popen.__init__ = _recording_popen_init
multiprocessing.process.BaseProcess.start = _recording_process_start


@pytest.fixture(autouse=True)
def _processes_mark_is_honest(request):
    """Fail an unmarked test that started Python processes (see the comment above)."""
    _started.clear()
    yield
    if _started and request.node.get_closest_marker("processes") is None:
        what = "; ".join(dict.fromkeys(_started))
        _started.clear()
        pytest.fail(f"this test starts processes ({what}) but is not marked "
                    "@pytest.mark.processes (so `make test-quick` would not be quick)",
                    pytrace=False)
