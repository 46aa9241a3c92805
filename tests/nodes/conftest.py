"""Fixtures of the cluster tests: a whole cluster (tests/nodes/cluster.py) per test."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import Daemon

from .cluster import Cluster


def make_cluster(tmp_path: Path, daemon_factory: Callable[..., Daemon], **kw: Any) -> Iterator[Cluster]:
    """Start a Cluster(**kw), yield it, stop everything it started (by PID)."""
    c = Cluster(tmp_path, daemon_factory, **kw)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path,
            daemon_factory: Callable[..., Daemon]) -> Iterator[Cluster]:
    """Three nodes, three etcd members, six ASDs, sync DTL, a 3 s node lease. A test may ask
    for a longer lease: @pytest.mark.parametrize("cluster", [10], indirect=True)."""
    yield from make_cluster(tmp_path, daemon_factory, lease_ttl=getattr(request, "param", 3))
