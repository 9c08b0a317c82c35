"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models only pay for thread synchronisation, and on a busy 2-core machine two threads
    contend (~10x slower): run such modules single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
