"""Distortion tests run torch single-threaded (tiny tensors on a shared 2-core machine)."""
from helpers.fixtures import single_thread_torch  # noqa: F401  (autouse fixture)
