"""Shared fixtures for the kernel and model tests."""
import os
import sys

import pytest

# tests/reference.py is imported as a plain module by the test files.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import femtogpt  # noqa: E402


@pytest.fixture
def threads():
    """threads(n) sets the kernels' OpenMP thread count; the original count is
    restored after the test, so no test leaks a thread setting into the next."""
    saved = femtogpt.get_num_threads()
    yield femtogpt.set_num_threads
    femtogpt.set_num_threads(saved)
