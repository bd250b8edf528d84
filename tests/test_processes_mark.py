"""The `processes` mark is enforced by tests/conftest.py: an unmarked test that starts a Python
process fails with a message naming the mark; a marked one, or one that starts only a
non-Python program, passes."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

INNER = '''
import subprocess, sys
import pytest

def test_unmarked_python_child():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.processes
def test_marked_python_child():
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_unmarked_non_python_child():
    subprocess.run(["true"], check=True)

def test_unmarked_multiprocessing_child():
    import multiprocessing
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join()

def test_no_child():
    assert True
'''


@pytest.mark.processes
def test_unmarked_process_tests_fail_and_say_which_mark(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    processes: starts Python processes\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=2)
    text = result.stdout.str()
    assert "test_unmarked_python_child" in text and "test_unmarked_multiprocessing_child" in text
    assert "not marked @pytest.mark.processes" in text
    assert "ERROR test_inner.py::test_marked_python_child" not in text
    assert "ERROR test_inner.py::test_unmarked_non_python_child" not in text
