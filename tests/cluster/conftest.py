"""Fixtures of the cluster layer: a real etcd (Debian's 3.4) on free loopback ports, started
and stopped by PID, and the two stores ownership code must run on."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.etcd_launch import EtcdCluster
from ovsfs.cluster.store import ConfigStore


@pytest.fixture(scope="module")
def etcd1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member shared by a test module; each test gets its own key prefix."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), members=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd_store(etcd1: EtcdCluster) -> Iterator[EtcdStore]:
    store = EtcdStore(etcd1.urls, prefix=f"/t{uuid.uuid4().hex[:12]}", timeout=5.0)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "etcd"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """The embedded ConfigStore and an EtcdStore: the calls ownership code relies on."""
    if request.param == "sqlite":
        store: Any = ConfigStore(tmp_path / "cluster" / "config.db")
    else:
        store = EtcdStore(request.getfixturevalue("etcd1").urls,
                          prefix=f"/t{uuid.uuid4().hex[:12]}")
    try:
        yield store
    finally:
        store.close()
