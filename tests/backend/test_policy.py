"""Presets, the chunk rule, explain and the manifest format."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ovsfs.backend.explain import explain
from ovsfs.backend.manifest import Manifest
from ovsfs.backend.policy import Policy, Preset, PresetStore, chunk_layout, parse_policy
from ovsfs.errors import AlreadyExists, InvalidArgument

MiB = 1 << 20


def test_seed_example_64mib_sco_k8_4mib_fragments() -> None:
    p = Preset(policies=[Policy(8, 2, 10, 1)], max_fragment_size=4 * MiB)
    e = explain(p, 64 * MiB)
    assert e["chunks"] == 2 == math.ceil(64 / min(8 * 4, 64))
    assert e["fragments_per_chunk"] == 10 and e["fragment_sizes"] == [4 * MiB]
    assert e["metadata_bytes"] <= 1024


@pytest.mark.parametrize("size,k,mfs", [(1, 4, MiB), (4 * MiB, 4, MiB), (4 * MiB + 1, 4, MiB),
                                        (64 * MiB, 4, 16 * MiB), (3 * MiB, 8, MiB)])
def test_chunk_rule(size: int, k: int, mfs: int) -> None:
    chunk, n = chunk_layout(size, k, mfs)
    assert n == math.ceil(size / min(k * mfs, size))
    assert chunk == min(k * mfs, size)
    assert math.ceil(chunk / k) <= mfs


def test_policies_tried_in_order() -> None:
    p = Preset(policies=[Policy(8, 3, 10, 2), Policy(4, 2, 5, 1), Policy(2, 1, 2, 1)])
    assert p.choose([2, 2, 2, 2, 2, 2]) == Policy(8, 3, 10, 2)
    assert p.choose([1] * 6) == Policy(4, 2, 5, 1)
    assert p.choose([3]) is None
    assert p.choose([1, 1, 1]) == Policy(2, 1, 2, 1)


def test_bad_presets_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        parse_policy("4,2,7,1")  # c > k+m
    with pytest.raises(InvalidArgument):
        parse_policy("4,2,3,1")  # c < k
    with pytest.raises(InvalidArgument):
        Preset(compression="gzip").validate()
    store = PresetStore(tmp_path / "presets.json")
    store.create(Preset(name="fast", policies=[parse_policy("(2,1,3,1)")], compression="lz4"))
    with pytest.raises(AlreadyExists):
        store.create(Preset(name="fast"))
    assert {p.name for p in store.list()} == {"default", "fast"}
    assert store.get("fast").compression == "lz4"


def test_manifest_roundtrip_and_size() -> None:
    p = Preset(policies=[Policy(8, 2, 10, 1)], max_fragment_size=4 * MiB, encryption="aes-256-gcm")
    man = Manifest.sample(p.policies[0], p, 64 * MiB)
    blob = man.encode()
    assert len(blob) <= 1024
    back = Manifest.decode(blob)
    assert back == man
    assert explain(Preset(policies=[Policy(4, 1, 5, 1)], max_fragment_size=16 * MiB), 64 * MiB)["chunks"] == 1
