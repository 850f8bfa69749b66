"""Shared fixtures: the real data kit (required: tests fail, never skip, without it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.runtime.datakit import data_dir


@pytest.fixture(scope="session")
def kit() -> Path:
    return data_dir()
