"""Fixtures shared by several test folders (import them into a folder's conftest.py)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread_torch():
    """torch single-threaded for the test: tiny tensors on a shared 2-core machine are much
    faster without OpenMP threads competing with other processes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
