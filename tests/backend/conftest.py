"""Fixtures of the backend tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from .asd_helpers import AsdCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[AsdCluster]:
    """Six real ASD processes (stopped by PID at the end)."""
    cl = AsdCluster(tmp_path / "asds")
    cl.start_many(6)
    yield cl
    cl.stop_all()
