"""What storing one object costs under a preset: chunks, fragments, bytes stored and the
size of its manifest (built from a sample manifest, so it cannot drift from the format).

Its own module: it needs both the policy (policy.py) and the manifest format
(manifest.py), and manifest.py already imports policy.py.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ovsfs.backend.manifest import Manifest
from ovsfs.backend.policy import EC_HEADER, Preset, chunk_layout
from ovsfs.errors import InvalidArgument


def explain(preset: Preset, size: int, asds_per_node: Iterable[int] | None = None) -> dict[str, Any]:
    """What storing one object of `size` bytes costs under the preset."""
    counts = list(asds_per_node) if asds_per_node is not None else None
    policy = preset.choose(counts) if counts is not None else preset.policies[0]
    if policy is None:
        raise InvalidArgument(f"no policy of preset {preset.name} fits the live ASDs")
    chunk, n = chunk_layout(size, policy.k, preset.max_fragment_size)
    chunks = []
    for i in range(n):
        length = min(chunk, size - i * chunk)
        stored = length + (16 if preset.encryption != "none" else 0)  # GCM tag
        chunks.append({"bytes": length, "fragment_size": math.ceil(stored / policy.k)})
    frag_total = sum((policy.k + policy.m) * (c["fragment_size"] + EC_HEADER) for c in chunks)
    meta = Manifest.sample(policy, preset, size).encode()
    return {
        "preset": preset.name, "policy": str(policy), "object_size": size,
        "chunk_size": chunk, "chunks": n, "fragments_per_chunk": policy.k + policy.m,
        "data_fragments_per_chunk": policy.k, "fragment_sizes": sorted({c["fragment_size"] for c in chunks}),
        "fragments": n * (policy.k + policy.m), "stored_bytes": frag_total,
        "overhead": round(frag_total / size, 3) if size else 0.0,
        "metadata_bytes": len(meta), "manifest_replicas": policy.m + 1,
        "note": "sizes before compression" if preset.compression != "none" else "",
    }
