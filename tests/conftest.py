"""Shared pytest fixtures. Plain helpers (configs, tokenizers, sweep plumbing) are in tests/support.py."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# No test downloads anything: the Hugging Face hub is off for the test process and every process it starts
# (a hub id then fails at once, as it does on a machine without the hub).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# No test reads or writes this machine's calibrated hardware profile (`txlab calibrate`'s local.yaml): the local
# profile of the test session and every process it starts lives in a directory of its own, empty at the start.
os.environ["TXLAB_HARDWARE_DIR"] = tempfile.mkdtemp(prefix="txlab-hardware-")


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
