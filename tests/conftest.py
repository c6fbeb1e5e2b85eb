import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture
def shared_data():
    """../shared/data: reference files written by llama2.c (skips where it is absent)."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"reference files not found at {SHARED_DATA} (../shared beside the project)")
    return SHARED_DATA
