"""Shared pytest fixtures. Plain helpers (configs, tokenizers, sweep plumbing) are in tests/support.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two spinning threads are ~10x slower.

    Not autouse: the data, training, generation, inference and quantization tests ask for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
