"""The set of ASDs a proxy knows, their health, and where new fragments go.

The registry (addresses) is a JSON file under the node's state directory; ids and
node names come from the ASDs themselves. Placement picks the least loaded live
ASDs (fragments already placed, tracked by the manifest index) with at most x
fragments of a chunk per node and a random tie-break, so writes spread evenly and
a newly added ASD fills up first.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections import Counter
from pathlib import Path
from typing import Iterable

from ovsfs.backend.asd_client import AsdClient
from ovsfs.errors import BackendError, NoSpace, NotFound, OvsfsError


class AsdSet:
    def __init__(self, registry: Path | None, addrs: Iterable[str] = (), timeout: float = 10.0) -> None:
        self.registry = Path(registry) if registry else None
        self.timeout = timeout
        self.lock = threading.Lock()
        self.by_id: dict[str, AsdClient] = {}
        self.pending: list[AsdClient] = []      # registered but never reached: id unknown yet
        self.draining: set[str] = set()         # no new fragments go there
        self.load: Counter[str] = Counter()     # fragments placed per ASD (from the index)
        wanted = list(addrs)
        if self.registry and self.registry.exists():
            wanted += json.loads(self.registry.read_text()).get("asds", [])
        for a in dict.fromkeys(wanted):
            self._attach(a)

    def _attach(self, addr: str) -> AsdClient:
        host, _, port = addr.rpartition(":")
        c = AsdClient(host, int(port), timeout=self.timeout)
        try:
            c.info()
            self.by_id[c.asd_id] = c
        except OvsfsError:
            self.pending.append(c)
        return c

    def attach(self, member: "AsdClient") -> None:
        """Register a ready-made member that behaves like an AsdClient (asd_id, node,
        up, put/get/...): e.g. a whole Store under a stacked proxy (ovsfs.backend.stacked).
        Such members are not written to the registry file: their owner attaches them."""
        member.ping()  # its id is known up front: registered even while down
        with self.lock:
            self.by_id[member.asd_id] = member

    def _save(self) -> None:
        if not self.registry:
            return
        clients = [c for c in [*self.by_id.values(), *self.pending] if isinstance(c, AsdClient)]
        addrs = [c.addr for c in clients]
        self.registry.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.registry.with_suffix(".tmp")
        tmp.write_text(json.dumps({"asds": addrs}, indent=1))
        os.replace(tmp, self.registry)

    def add(self, addr: str) -> AsdClient:
        with self.lock:
            for c in [*self.by_id.values(), *self.pending]:
                if c.addr == addr:
                    return c
            c = self._attach(addr)
            if not c.asd_id:
                self.pending.remove(c)
                raise BackendError(f"ASD {addr} does not answer")
            if c.asd_id in self.by_id and self.by_id[c.asd_id] is not c:
                pass  # same disk under a new address: the newest address wins
            self._save()
            return c

    def forget(self, asd_id: str) -> None:
        with self.lock:
            c = self.by_id.pop(asd_id, None)
            self.draining.discard(asd_id)
            if c is None:
                raise NotFound(f"ASD {asd_id} is not known")
            c.close()
            self._save()

    def find(self, key: str) -> AsdClient:
        """By id, id prefix or address."""
        for c in self.by_id.values():
            if c.asd_id == key or c.addr == key or (len(key) >= 6 and c.asd_id.startswith(key)):
                return c
        raise NotFound(f"ASD {key} is not known")

    def get(self, asd_id: str | None) -> AsdClient | None:
        return self.by_id.get(asd_id) if asd_id else None

    def all(self) -> list[AsdClient]:
        return list(self.by_id.values())

    def refresh(self) -> None:
        """Ping everything: marks ASDs up/down and attaches ASDs that were unreachable."""
        for c in list(self.pending):
            if c.ping():
                with self.lock:
                    # Maintenance and a caller may refresh at once: attach once.
                    if c in self.pending:
                        self.pending.remove(c)
                        self.by_id[c.asd_id] = c
        for c in self.all():
            c.ping()

    def live(self, writable: bool = True) -> list[AsdClient]:
        return [c for c in self.by_id.values()
                if c.up and not (writable and c.asd_id in self.draining)]

    def node_counts(self) -> list[int]:
        return list(Counter(c.node for c in self.live()).values())

    def choose(self, n: int, x: int, exclude: Iterable[str] = (), node_use: Counter[str] | None = None,
               prefer: Iterable[str] = (), at_least: int | None = None) -> list[str]:
        """n distinct live ASD ids (or as few as `at_least`), at most x per node counting
        `node_use` already placed."""
        excluded = set(exclude)
        per_node = Counter(node_use or {})
        preferred = [p for p in prefer if p in self.by_id]
        cands = [c for c in self.live() if c.asd_id not in excluded]
        random.shuffle(cands)
        cands.sort(key=lambda c: (c.asd_id not in preferred, self.load[c.asd_id]))
        out: list[str] = []
        for c in cands:
            if len(out) == n:
                break
            if per_node[c.node] < x:
                out.append(c.asd_id)
                per_node[c.node] += 1
        if len(out) < (n if at_least is None else at_least):
            raise NoSpace(f"need {n} ASDs (at most {x} per node), only {len(out)} usable")
        return out

    def node_of(self, asd_id: str | None) -> str:
        c = self.by_id.get(asd_id) if asd_id else None
        return c.node if c else ""

    def close(self) -> None:
        for c in [*self.by_id.values(), *self.pending]:
            c.close()
