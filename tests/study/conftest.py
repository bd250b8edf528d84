"""Study tests run torch single-threaded (tiny tensors on a shared 2-core machine)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
