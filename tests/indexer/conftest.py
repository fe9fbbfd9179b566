"""Indexer test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Encode with one intra-op thread, as builds of small models do: on a busy 2-core
    machine a second thread makes these tiny matmuls many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
