"""Shared fixtures: offline hub settings and the real data folder."""

import os
from pathlib import Path

import pytest

# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def data_dir() -> Path:
    """The real data folder named by RALD_DATA_DIR; tests that need it skip only when it is unset."""
    value = os.environ.get("RALD_DATA_DIR")
    if not value:
        pytest.skip("RALD_DATA_DIR is not set")
    path = Path(value)
    assert path.is_dir(), f"RALD_DATA_DIR={value} is not a folder"
    return path
