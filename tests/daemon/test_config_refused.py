"""Configuration values that TOML accepts but that cannot work are refused at load, with one
line naming the key, before anything starts (fault review finding 2): nan / inf in any float
setting (a nan engine.disk_wait made writers wait for ever), ports outside 0..65535 (70000
listened on 4464), NBD limits, allow-list networks and the listen host, and a write buffer
that cannot be created (a 26-line traceback before).
"""

from __future__ import annotations

import dataclasses
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from ovsfs.config import Config, load
from ovsfs.errors import ConfigError
from tests.conftest import OVSFS, TEST_CONFIG, _merge, to_toml


def _float_keys() -> list[tuple[str, str]]:
    out = []
    for sec in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config).get(sec.name)
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            out += [(sec.name, f.name) for f in dataclasses.fields(cls) if hints[f.name] is float]
    return out


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("section,key", _float_keys())
def test_every_float_setting_refuses_nan_and_inf(tmp_path: Path, section: str, key: str, value: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        load(path, tmp_path)


BAD: list[tuple[dict[str, Any], str]] = [
    ({"engine": {"disk_wait": float("nan")}}, "engine.disk_wait"),
    ({"engine": {"stop_timeout": float("inf")}}, "engine.stop_timeout"),
    ({"nbd": {"tcp_port": 70000}}, "nbd.tcp_port"),
    ({"nbd": {"tcp_port": -1}}, "nbd.tcp_port"),
    ({"nbd": {"max_connections": 0}}, "nbd.max_connections"),
    ({"nbd": {"handshake_timeout": 0.0}}, "nbd.handshake_timeout"),
    ({"nbd": {"threads": 0}}, "nbd.threads"),
    ({"nbd": {"allow": ["10.0.0.300/8"]}}, "nbd.allow"),
    ({"nbd": {"allow": ["everyone"]}}, "nbd.allow"),
    ({"nbd": {"tcp_host": "not a host!"}}, "nbd.tcp_host"),
    ({"engine": {"write_buffer": "/proc/ovsfs-wb"}}, "engine.write_buffer"),
    ({"cluster": {"etcd": ["127.0.0.1:2379"]}}, "cluster.etcd"),
    ({"cluster": {"etcd": ["http://127.0.0.1:2379"]}}, "cluster.mgmt_port"),
    ({"cluster": {"lease_ttl": 1}}, "cluster.lease_ttl"),
    ({"dtl": {"mode": "fast"}}, "dtl.mode"),
    ({"dtl": {"port": 65536}}, "dtl.port"),
    ({"dtl": {"tls": "required"}}, "dtl.tls"),
    ({"dtl": {"queue_bytes": 1024}}, "dtl.queue_bytes"),
]


@pytest.mark.parametrize("over,key", BAD, ids=[f"{k}={list(list(o.values())[0].values())[0]}" for o, k in BAD])
def test_daemon_refuses_with_one_line(tmp_path: Path, over: dict[str, Any], key: str) -> None:
    state = tmp_path / "var"
    state.mkdir()
    (state / "ovsfs.toml").write_text(to_toml(_merge(TEST_CONFIG, over)))
    try:
        r = subprocess.run([OVSFS, "run", "--state", str(state)], capture_output=True, text=True,
                           timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:   # subprocess.run has killed it (by PID)
        pytest.fail(f"{key}: the daemon started instead of refusing the config")
    assert r.returncode != 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ovsfs: error:") and key in lines[0], r.stderr
    assert not (state / "run" / "ovsfs.sock").exists()
