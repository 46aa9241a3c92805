"""Stacked backends: a proxy whose members are whole Stores instead of ASD processes.

A global backend spanning data centres is a ProxyStore over one local backend per
data centre (each a ProxyStore over that centre's ASDs). `StoreMember` makes a Store
look like an ASD to AsdSet, placement, the writer and maintenance: fragment,
manifest and namespace keys of the global proxy become objects in one namespace of
the member store. Each member is its own storage node, so the global policy's x
limits the fragments of a chunk per data centre; with (2,1,3,1) over three centres a
whole centre can be lost and every object still reads back.

Health: a member is up while its store answers and reports some capacity (a local
proxy whose ASDs are all gone reports none). A missing or undecodable object in the
member store counts as a missing fragment (NotFound / DataError), so global
maintenance rebuilds it, in place when the member is up again (a data centre that
came back empty) or on another member.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import crc32c

from ovsfs.backend.placement import AsdSet
from ovsfs.backend.policy import Preset
from ovsfs.backend.store import Store
from ovsfs.errors import BackendError, DataError, InvalidArgument, NotFound, OvsfsError

log = logging.getLogger("ovsfs.backend.stacked")

MEMBER_NS = "stacked"


def encode_key(key: str) -> str:
    """ASD key -> object name accepted by check_name. A prefix code ('_' -> '__',
    '%' -> '_p', anything else as is), so key prefixes map to name prefixes."""
    return key.replace("_", "__").replace("%", "_p")


def decode_key(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        ch = name[i]
        if ch == "_" and i + 1 < len(name):
            out.append("_" if name[i + 1] == "_" else "%")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class StoreMember:
    """One Store seen as an ASD by a stacked ProxyStore (the AsdClient interface)."""

    def __init__(self, store: Store, name: str, ns: str = MEMBER_NS, asd_id: str | None = None) -> None:
        self.store = store
        self.name = name
        self.ns = ns
        # Manifests name members by a 16-byte id: stable, derived from the member's name.
        self.asd_id = asd_id or hashlib.md5(f"ovsfs-stacked-member:{name}".encode()).hexdigest()
        self.node = name          # every member is its own node for the x rule
        self.down_since: float | None = None
        self._ns_ready = False
        self._lock = threading.Lock()

    @property
    def addr(self) -> str:
        return f"store:{self.name}"

    @property
    def up(self) -> bool:
        return self.down_since is None

    def __repr__(self) -> str:
        return f"StoreMember({self.name}, id={self.asd_id[:8]}, up={self.up})"

    def _mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.time()

    def _ensure_ns(self) -> None:
        if self._ns_ready:
            return
        with self._lock:
            if not self._ns_ready:
                self.store.create_namespace(self.ns)
                self._ns_ready = True

    # -- the AsdClient interface --------------------------------------------------

    def info(self) -> dict[str, Any]:
        self._ensure_ns()
        return {"asd_id": self.asd_id, "node": self.node, **self.usage()}

    def ping(self) -> bool:
        try:
            refresh = getattr(self.store, "refresh", None)
            if callable(refresh):
                refresh()  # a member proxy re-pings its own ASDs first
            self._ensure_ns()
            u = self.store.usage()
            ok = u.get("capacity", 0) > 0
        except OvsfsError as e:
            log.info("member %s does not answer: %s", self.name, e)
            ok = False
        if ok:
            self.down_since = None
        else:
            self._mark_down()
        return ok

    def put(self, key: str, data: bytes | memoryview, crc: int | None = None,
            guard: tuple[str, int] | None = None, if_newer: int | None = None) -> None:
        # A member keeps every global namespace in one of its own: owner generations of
        # global namespaces cannot be checked here (fence() refuses, see below).
        if crc is not None and crc32c.crc32c(data) != crc:
            raise DataError(f"member {self.name}: {key} does not match its CRC32C")
        try:
            self._ensure_ns()
            self.store.put(self.ns, encode_key(key), data)
        except (NotFound, InvalidArgument, DataError):
            raise
        except OvsfsError:
            self._mark_down()  # the member could not store it at all (no space, no ASDs)
            raise

    def get(self, key: str, crc: int | None = None) -> bytes:
        data = self.store.get(self.ns, encode_key(key))
        if crc is not None and crc32c.crc32c(data) != crc:
            raise DataError(f"member {self.name}: {key} does not match its expected CRC32C")
        return data

    def get_range(self, key: str, offset: int, length: int, crc: int | None = None) -> bytes:
        # Keys carry the object version, and the member store checks its own data: the
        # whole-fragment CRC (an ASD's version check) is not needed for a range.
        data = self.store.get_range(self.ns, encode_key(key), offset, length)
        if len(data) != length:
            raise DataError(f"member {self.name}: short read of {key}")
        return data

    def verify(self, key: str) -> int:
        return crc32c.crc32c(self.store.get(self.ns, encode_key(key)))

    def delete(self, key: str, guard: tuple[str, int] | None = None) -> None:
        self.store.delete(self.ns, encode_key(key))

    def fence(self, ns: str, gen: int) -> int:
        raise BackendError(f"member {self.name}: a stacked backend does not support fencing")

    def fences(self) -> dict[str, int]:
        return {}

    def list(self, prefix: str) -> list[str]:
        self._ensure_ns()
        names = self.store.list(self.ns, encode_key(prefix))
        return [k for k in map(decode_key, names) if k.startswith(prefix)]

    def scan(self, prefix: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key in self.list(prefix):
            try:
                out[key] = self.store.get(self.ns, encode_key(key))
            except (NotFound, DataError):
                continue  # unreadable copy: another replica answers
        return out

    def usage(self) -> dict[str, Any]:
        u = self.store.usage()
        return {"capacity": int(u.get("capacity", 0)), "free": int(u.get("free", 0))}

    def close(self) -> None:
        pass  # the member store belongs to whoever built it


def member_set(members: Mapping[str, Store] | Iterable[StoreMember], ns: str = MEMBER_NS) -> AsdSet:
    """An AsdSet of Store members (name -> store, or ready StoreMembers)."""
    asds = AsdSet(None)
    items = ([StoreMember(s, n, ns) for n, s in members.items()] if isinstance(members, Mapping)
             else list(members))
    if len({m.asd_id for m in items}) != len(items):
        raise BackendError("stacked members need distinct names")
    for m in items:
        asds.attach(m)  # type: ignore[arg-type]
    return asds


def stacked_proxy(members: Mapping[str, Store] | Iterable[StoreMember], preset: Preset | None = None,
                  state_dir: Path | None = None, ns: str = MEMBER_NS, **kw: Any):  # type: ignore[no-untyped-def]
    """A ProxyStore (the global backend) whose members are the given stores."""
    from ovsfs.backend.proxy import ProxyStore

    return ProxyStore(member_set(members, ns), preset, state_dir=state_dir, **kw)
