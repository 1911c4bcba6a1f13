"""Make the flat top-level modules (model, loss, data, ...) importable from the tests; shared fixtures."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def one_thread():
    """Tiny models: threads only add overhead, and much of it on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def is_png():
    """A check that a file is a PNG, by its 8-byte signature: what the plotting commands write."""
    def check(path):
        with open(path, 'rb') as f:
            return f.read(8) == b'\x89PNG\r\n\x1a\n'
    return check
