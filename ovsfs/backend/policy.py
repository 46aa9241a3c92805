"""Presets and policies: how an object is chunked, transformed and spread.

A policy (k, m, c, x): k data fragments, m parity fragments, a put is acknowledged
after c fragments are stored, at most x fragments of one chunk per storage node. A
preset is an ordered list of policies plus the max fragment size, compression and
encryption. Writes use the first policy the live ASDs can satisfy, so a preset like
[(8,3,10,2), (4,2,5,1)] keeps writing (with less spread) while a node is down.

The chunk rule is the one ALBA uses:
    chunks = ceil(size / min(k * max_fragment_size, size))
each chunk is min(k * max_fragment_size, size) bytes (the last one shorter) and is
erasure coded into k data fragments of ceil(chunk / k) bytes and m parity fragments.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ovsfs.errors import AlreadyExists, InvalidArgument, NotFound

COMPRESSIONS = ("none", "zstd", "lz4")
ENCRYPTIONS = ("none", "aes-256-gcm")
EC_HEADER = 80  # bytes liberasurecode puts in front of every fragment


@dataclass(frozen=True)
class Policy:
    k: int
    m: int
    c: int
    x: int

    def validate(self) -> None:
        if not 1 <= self.k <= 32 or not 0 <= self.m <= 16:
            raise InvalidArgument(f"policy {self}: need 1 <= k <= 32 and 0 <= m <= 16")
        if not self.k <= self.c <= self.k + self.m:
            raise InvalidArgument(f"policy {self}: c must be between k and k+m")
        if self.x < 1:
            raise InvalidArgument(f"policy {self}: x must be at least 1")

    def satisfiable(self, asds_per_node: Iterable[int]) -> bool:
        """Can k+m fragments be placed on distinct ASDs with at most x per node?"""
        return sum(min(n, self.x) for n in asds_per_node) >= self.k + self.m

    def __str__(self) -> str:
        return f"({self.k},{self.m},{self.c},{self.x})"


@dataclass
class Preset:
    name: str = "default"
    policies: list[Policy] = field(default_factory=lambda: [Policy(4, 2, 5, 1), Policy(2, 1, 2, 1)])
    max_fragment_size: int = 4 << 20
    compression: str = "none"
    encryption: str = "none"

    def validate(self) -> None:
        if not self.policies:
            raise InvalidArgument(f"preset {self.name}: needs at least one policy")
        for p in self.policies:
            p.validate()
        if not 4096 <= self.max_fragment_size <= 64 << 20:
            raise InvalidArgument("max fragment size must be between 4 KiB and 64 MiB")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {', '.join(COMPRESSIONS)}")
        if self.encryption not in ENCRYPTIONS:
            raise InvalidArgument(f"encryption must be one of {', '.join(ENCRYPTIONS)}")

    def choose(self, asds_per_node: Iterable[int]) -> Policy | None:
        counts = list(asds_per_node)
        for p in self.policies:
            if p.satisfiable(counts):
                return p
        return None

    def choose_degraded(self, asds_per_node: Iterable[int]) -> Policy | None:
        """When no policy gets all k+m fragments placed: the first one that still gets c
        (the rest are left to maintenance, as with a slow ASD)."""
        counts = list(asds_per_node)
        for p in self.policies:
            if sum(min(n, p.x) for n in counts) >= p.c:
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policies"] = [[p.k, p.m, p.c, p.x] for p in self.policies]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preset":
        try:
            pol = [Policy(*map(int, p)) for p in d.get("policies", [])]
            p = cls(name=str(d.get("name", "default")), policies=pol,
                    max_fragment_size=int(d.get("max_fragment_size", 4 << 20)),
                    compression=str(d.get("compression", "none")),
                    encryption=str(d.get("encryption", "none")))
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"bad preset: {e}") from None
        p.validate()
        return p


def parse_policy(text: str) -> Policy:
    """'8,3,10,2' or '(8,3,10,2)' -> Policy."""
    try:
        k, m, c, x = (int(v) for v in text.strip("() ").split(","))
    except ValueError:
        raise InvalidArgument(f"policy {text!r} must be k,m,c,x") from None
    p = Policy(k, m, c, x)
    p.validate()
    return p


def chunk_layout(size: int, k: int, max_fragment_size: int) -> tuple[int, int]:
    """(chunk size, number of chunks) for an object of `size` bytes."""
    if size == 0:
        return 0, 0
    chunk = min(k * max_fragment_size, size)
    return chunk, math.ceil(size / chunk)


class PresetStore:
    """Presets kept in one JSON file under the node's state directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"default": Preset().to_dict()}

    def _save(self, data: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)

    def list(self) -> list[Preset]:
        return [Preset.from_dict(d) for _, d in sorted(self._load().items())]

    def get(self, name: str) -> Preset:
        d = self._load().get(name)
        if d is None:
            raise NotFound(f"preset {name} does not exist")
        return Preset.from_dict(d)

    def create(self, preset: Preset) -> Preset:
        preset.validate()
        data = self._load()
        if preset.name in data:
            raise AlreadyExists(f"preset {preset.name} already exists")
        data[preset.name] = preset.to_dict()
        self._save(data)
        return preset

    def delete(self, name: str) -> None:
        data = self._load()
        if data.pop(name, None) is None:
            raise NotFound(f"preset {name} does not exist")
        self._save(data)
