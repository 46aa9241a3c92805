"""The local-directory backend store."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovsfs.backend.local import LocalStore
from ovsfs.errors import BackendError, InvalidArgument, NotFound


def test_objects_round_trip(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    s.create_namespace("ns1")
    s.put("ns1", "sco/0001", b"abcdef")
    s.put("ns1", "tlog/0001", b"x")
    assert s.get("ns1", "sco/0001") == b"abcdef"
    assert s.get_range("ns1", "sco/0001", 2, 3) == b"cde"
    assert s.list("ns1") == ["sco/0001", "tlog/0001"]
    assert s.list("ns1", "sco/") == ["sco/0001"]
    s.put("ns1", "sco/0001", b"new")
    assert s.get("ns1", "sco/0001") == b"new"
    assert not [p for p in (tmp_path / "ns1").rglob(".*")], "no temporary files left behind"
    s.delete("ns1", "sco/0001")
    s.delete("ns1", "sco/0001")  # deleting twice is fine
    with pytest.raises(NotFound):
        s.get("ns1", "sco/0001")
    assert s.namespaces() == ["ns1"]
    s.delete_namespace("ns1")
    assert s.namespaces() == []


def test_bad_input(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    s.create_namespace("ns")
    s.put("ns", "obj", b"1234")
    with pytest.raises(BackendError):
        s.get_range("ns", "obj", 2, 10)
    for bad in ["../escape", "/abs", "", "a/../../b"]:
        with pytest.raises(InvalidArgument):
            s.put("ns", bad, b"x")
    with pytest.raises(NotFound):
        s.put("missing-ns", "obj", b"x")
    with pytest.raises(NotFound):
        s.list("missing-ns")
