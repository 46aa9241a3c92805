"""The management API routes (documented in README.md).

Every engine call goes to a worker thread: the engine is synchronous and may wait on
disk, and the event loop also serves the doors. Volumes and snapshots are handled only
through the contract in ovsfs/engine/api.py: volumes, snapshots and vPools through the
catalog (the lifecycle rules live there, and import/export/clone jobs register as
holders), node-wide figures, scrub, caches and sync through NodeMaintenance.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from typing import Any, Awaitable, Callable

import trio

from ovsfs.config import Config
from ovsfs.engine.api import Holder, NodeMaintenance
from ovsfs.errors import InvalidArgument, OvsfsError
from ovsfs.mgmt.backend_api import BackendApi
from ovsfs.mgmt.cluster_api import CLUSTER_THREADS, ClusterApi, ClusterOps
from ovsfs.mgmt.http import HttpError, Request, Response, Send, ThreadPool
from ovsfs.mgmt.transfer import ExportJob, ImportJob
from ovsfs.mgmt.units import parse_size
from ovsfs.backend.node import NodeBackend

log = logging.getLogger("ovsfs.mgmt")

PROGRESS_INTERVAL = 0.2   # seconds between progress lines of a streamed job

Route = Callable[..., Awaitable[Response]]


# The management API's engine calls run on threads of their own: writers of the doors
# waiting for room, or a flood of door calls, cannot take those `ovsfs status` needs.
API_THREADS = ThreadPool("mgmt_api_threads", 8)


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=API_THREADS.limiter())


def _field(body: dict[str, Any], key: str, kind: type, required: bool = True) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidArgument(f"missing field {key!r}")
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidArgument(f"field {key!r} must be a {kind.__name__}")
    return value


def _size(body: dict[str, Any]) -> int:
    value = body.get("size")
    if value is None:
        raise InvalidArgument("missing field 'size'")
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise InvalidArgument("field 'size' must be a number of bytes or a string like '10G'")
    return parse_size(value)


def _line(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode()


class Api:
    def __init__(self, engine: NodeMaintenance, cfg: Config, doors: dict[str, str],
                 backend: NodeBackend | None = None, cluster: ClusterOps | None = None) -> None:
        self.engine = engine
        self.catalog = engine.catalog
        self.cfg = cfg
        self.backend = backend
        self.cluster = cluster
        self.doors = doors          # door name -> state, kept up to date by the daemon
        self.started = time.time()
        seg = r"([^/]+)"
        self.routes: list[tuple[re.Pattern[str], dict[str, Route]]] = [
            (r"/status", {"GET": self.status}),
            (r"/vpools", {"GET": self.list_vpools, "POST": self.create_vpool}),
            (rf"/vpools/{seg}", {"GET": self.get_vpool}),
            (r"/volumes", {"GET": self.list_volumes, "POST": self.create_volume}),
            (rf"/volumes/{seg}", {"GET": self.get_volume, "PATCH": self.patch_volume,
                                  "DELETE": self.delete_volume}),
            (rf"/volumes/{seg}/snapshots", {"GET": self.list_snapshots, "POST": self.create_snapshot}),
            (rf"/volumes/{seg}/snapshots/{seg}", {"GET": self.get_snapshot, "DELETE": self.delete_snapshot}),
            (rf"/volumes/{seg}/snapshots/{seg}/rollback", {"POST": self.rollback}),
            (rf"/volumes/{seg}/snapshots/{seg}/clone", {"POST": self.clone}),
            (rf"/volumes/{seg}/import", {"POST": self.import_file}),
            (rf"/volumes/{seg}/export", {"POST": self.export_file}),
            (rf"/volumes/{seg}/sync", {"POST": self.sync_volume}),
            (r"/scrub", {"POST": self.scrub}),
            (r"/cache/drop", {"POST": self.drop_cache}),
            *BackendApi(backend).routes(seg),
            *ClusterApi(cluster).routes(seg),
        ]
        self.routes = [(re.compile(p + "/?"), m) for p, m in self.routes]  # type: ignore[misc]

    async def __call__(self, req: Request) -> Response:
        for pattern, methods in self.routes:
            m = pattern.fullmatch(req.path)
            if m is None:
                continue
            method = "GET" if req.method == "HEAD" else req.method
            fn = methods.get(method)
            if fn is None:
                raise HttpError(405, f"{req.method} is not allowed on {req.path} (allowed: {', '.join(methods)})")
            return await fn(req, *m.groups())
        raise HttpError(404, f"no such API path {req.path}")

    # ---- node --------------------------------------------------------------------------

    async def status(self, req: Request) -> Response:
        stats = await _call(self.engine.stats)
        return Response(200, {
            "node": self.cfg.node.name, "pid": os.getpid(), "state_dir": str(self.cfg.state_dir),
            "mgmt_socket": str(self.cfg.path(self.cfg.mgmt.socket)),
            "uptime": round(time.time() - self.started, 3), "doors": dict(self.doors), "engine": stats,
            "backend": self.cfg.backend.kind,
        })

    async def scrub(self, req: Request) -> Response:
        name = _field(req.json(), "volume", str, required=False)
        results = await _call(self.engine.scrub, name)
        return Response(200, results)

    async def drop_cache(self, req: Request) -> Response:
        proxy = self.backend.proxy if self.backend is not None else None

        def drop() -> dict[str, int]:
            wb_freed = self.engine.drop_cache()  # uploaded SCOs kept locally as a read cache
            frag_freed = proxy.drop_caches() if proxy is not None else 0
            return {"write_buffer_bytes": wb_freed, "fragment_cache_bytes": frag_freed,
                    "freed_bytes": wb_freed + frag_freed}

        res = await _call(drop)
        log.info("dropped caches: %d bytes freed", res["freed_bytes"])
        return Response(200, res)

    # ---- vPools ------------------------------------------------------------------------

    async def list_vpools(self, req: Request) -> Response:
        return Response(200, await _call(self.catalog.list_vpools))

    async def get_vpool(self, req: Request, name: str) -> Response:
        for pool in await _call(self.catalog.list_vpools):
            if pool["name"] == name:
                return Response(200, pool)
        raise HttpError(404, f"vPool {name} does not exist")

    async def create_vpool(self, req: Request) -> Response:
        body = req.json()
        name = _field(body, "name", str)
        sco = _field(body, "sco_clusters", int, required=False)
        preset = _field(body, "preset", str, required=False)
        if preset is not None:
            if self.backend is None or self.backend.kind != "asd":
                raise HttpError(409, "the local backend has no presets")
            await _call(self.backend.presets.get, preset)  # 404 when it does not exist
        rec = await _call(self.catalog.create_vpool, name, sco, preset)
        log.info("created vPool %s", name)
        return Response(201, rec)

    # ---- volumes -----------------------------------------------------------------------

    async def list_volumes(self, req: Request) -> Response:
        vpool = req.query.get("vpool") or None
        vols = await _call(self.catalog.list_volumes, vpool)
        # Volumes that could not be opened are listed too, with state "failed" and the reason.
        failed = [f for f in self.catalog.failed_volumes() if vpool is None or f["vpool"] == vpool]
        here = {v["name"] for v in vols + failed}
        # With several nodes, the volumes other nodes serve too (state "remote", their owner).
        remote = [] if self.cluster is None else [
            v for v in await CLUSTER_THREADS.run(self.cluster.remote_volumes, vpool) if v["name"] not in here]
        return Response(200, sorted(vols + failed + remote, key=lambda v: v["name"]))

    async def _info(self, name: str) -> dict[str, Any]:
        return await _call(self.catalog.info, name)

    async def get_volume(self, req: Request, name: str) -> Response:
        return Response(200, await self._info(name))

    async def create_volume(self, req: Request) -> Response:
        body = req.json()
        name = _field(body, "name", str)
        size = _size(body)
        vpool = _field(body, "vpool", str, required=False) or "default"
        return Response(201, await _call(self.catalog.create_volume, name, size, vpool))

    async def patch_volume(self, req: Request, name: str) -> Response:
        body = req.json()
        unknown = set(body) - {"size", "name"}
        if unknown or not body:
            raise InvalidArgument("PATCH takes 'size' (resize) and/or 'name' (rename)")
        if "size" in body:
            size = _size(body)
            await _call(self.catalog.resize_volume, name, size)
            log.info("resized volume %s to %d bytes", name, size)
        if "name" in body:
            new = _field(body, "name", str)
            if new != name:
                await _call(self.catalog.rename_volume, name, new)
                log.info("renamed volume %s to %s", name, new)
                name = new
        return Response(200, await self._info(name))

    async def sync_volume(self, req: Request, name: str) -> Response:
        await _call(self.catalog.info, name)   # NotFound before the wait
        start = time.monotonic()
        # Abandoned on shutdown rather than holding it up: the sync only waits for uploads,
        # and closing the engine uploads everything anyway.
        await trio.to_thread.run_sync(self.engine.sync_volume, name, abandon_on_cancel=True)
        return Response(200, {"volume": name, "seconds": round(time.monotonic() - start, 3)})

    async def delete_volume(self, req: Request, name: str) -> Response:
        await _call(self.catalog.delete_volume, name)
        return Response(200, {"deleted": name})

    # ---- snapshots and clones ----------------------------------------------------------

    async def list_snapshots(self, req: Request, name: str) -> Response:
        return Response(200, await _call(self.catalog.list_snapshots, name))

    async def get_snapshot(self, req: Request, name: str, snap: str) -> Response:
        for s in await _call(self.catalog.list_snapshots, name):
            if s["name"] == snap:
                return Response(200, s)
        raise HttpError(404, f"snapshot {name}@{snap} does not exist")

    async def create_snapshot(self, req: Request, name: str) -> Response:
        snap = _field(req.json(), "name", str)
        rec = await _call(self.catalog.create_snapshot, name, snap)
        log.info("created snapshot %s@%s", name, snap)
        return Response(201, rec)

    async def delete_snapshot(self, req: Request, name: str, snap: str) -> Response:
        await _call(self.catalog.delete_snapshot, name, snap)
        log.info("deleted snapshot %s@%s", name, snap)
        return Response(200, {"deleted": f"{name}@{snap}"})

    async def rollback(self, req: Request, name: str, snap: str) -> Response:
        await _call(self.catalog.rollback, name, snap)
        log.info("rolled %s back to snapshot %s", name, snap)
        return Response(200, await self._info(name))

    async def clone(self, req: Request, name: str, snap: str) -> Response:
        body = req.json()
        new = _field(body, "name", str)
        vpool = _field(body, "vpool", str, required=False)

        def clone() -> dict[str, Any]:
            # Held as a job while it runs, like import and export (named in Busy messages).
            with self.catalog.hold(f"{name}@{snap}", Holder("job", f"clone of {name}@{snap} as {new}")):
                return self.catalog.clone_volume(name, snap, new, vpool)

        info = await _call(clone)
        log.info("cloned %s@%s as %s", name, snap, new)
        return Response(201, info)

    # ---- import / export ---------------------------------------------------------------

    async def import_file(self, req: Request, name: str) -> Response:
        body = req.json()
        job = ImportJob(self.catalog, name, body.get("path"), _field(body, "vpool", str, required=False))
        return await self._stream(job, f"import {job.path} -> {name}")

    async def export_file(self, req: Request, name: str) -> Response:
        body = req.json()
        job = ExportJob(self.catalog, name, body.get("path"), _field(body, "snapshot", str, required=False))
        return await self._stream(job, f"export {name} -> {job.path}")

    async def _stream(self, job: ImportJob | ExportJob, what: str) -> Response:
        # Errors before the first byte (unknown volume, unreadable file) get a real status code.
        total = await _call(job.prepare)
        log.info("%s: started (%d bytes)", what, total)

        async def run(send: Send) -> None:
            try:
                await send(_line({"done": 0, "total": total}))
                offset, last = 0, trio.current_time()
                while offset < total:
                    offset = await _call(job.step, offset)
                    if trio.current_time() - last >= PROGRESS_INTERVAL or offset >= total:
                        await send(_line({"done": offset, "total": total}))
                        last = trio.current_time()
                result = await _call(job.finish)
            except OvsfsError as e:
                log.warning("%s: failed: %s", what, e.message)
                await send(_line({"error": e.message}))
                return
            except OSError as e:
                log.warning("%s: failed: %s", what, e)
                await send(_line({"error": f"{what} failed: {e.strerror or e}"}))
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning("%s: the client went away; stopped", what)
                raise
            except Exception as e:
                log.exception("%s: failed", what)
                await send(_line({"error": f"internal error: {type(e).__name__}: {e}"}))
                return
            finally:
                job.abort()  # closes the file and lets go of the volume; quick, never blocks on I/O
            log.info("%s: done", what)
            await send(_line({"result": result}))

        return Response(200, stream=run)
