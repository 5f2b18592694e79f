"""Engine tests run torch single-threaded: the models here are tiny, and on a small shared CPU two OpenMP threads
spin-waiting for each other cost more than they gain (measured 5-10x slower under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
