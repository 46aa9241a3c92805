"""Management API routes of the erasure-coded backend: presets, ASDs, status, repair, drain.

The proxy is synchronous and talks to ASDs over the network, so every call goes to a
worker thread. Repair and drain run for as long as the backend is big: they stream
NDJSON progress like import/export, and stop at the next object when the daemon shuts
down or the client goes away.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from ovsfs.backend.explain import explain
from ovsfs.backend.policy import Preset, parse_policy
from ovsfs.errors import InvalidArgument, OvsfsError
from ovsfs.mgmt.http import HttpError, Request, Response, Send, ThreadPool
from ovsfs.mgmt.units import parse_size
from ovsfs.backend.node import LOCAL_ONLY, NodeBackend

if TYPE_CHECKING:
    from ovsfs.backend.proxy import ProxyStore

log = logging.getLogger("ovsfs.mgmt")

PROGRESS_INTERVAL = 0.2   # seconds between progress lines of a streamed job

Route = Callable[..., Awaitable[Response]]
JobFn = Callable[[Callable[[dict[str, Any]], None]], dict[str, Any]]


# Backend calls (which may wait for ASDs that are away) get their own threads, so they
# cannot take those of the management API's engine calls or of the doors.
BACKEND_THREADS = ThreadPool("mgmt_backend_threads", 4)


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return await BACKEND_THREADS.run(fn, *args)


def _line(obj: Any) -> bytes:
    return (json.dumps(obj) + "\n").encode()


class JobStopped(Exception):
    """Raised in the worker thread (from the progress callback) to stop a job early."""


async def progress_job(what: str, fn: JobFn, cleanup: Callable[[bool], None] | None = None) -> Response:
    """Run fn(progress) in a worker thread; stream its progress dicts, then its result.

    cleanup(ok) runs in a worker thread once the job has ended, successfully or not."""

    async def run(send: Send) -> None:
        latest: dict[str, Any] = {}
        stop = threading.Event()
        done = trio.Event()
        box: dict[str, Any] = {}

        def progress(p: dict[str, Any]) -> None:
            if stop.is_set():
                raise JobStopped(f"{what}: stopped")
            latest.update(p)

        async def worker() -> None:
            try:
                box["result"] = await trio.to_thread.run_sync(fn, progress)
            except Exception as e:  # reported to the client below
                box["error"] = e
            finally:
                done.set()

        log.info("%s: started", what)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker)
                try:
                    sent: dict[str, Any] = {}
                    while not done.is_set():
                        with trio.move_on_after(PROGRESS_INTERVAL):
                            await done.wait()
                        snap = dict(latest)
                        if snap and snap != sent:
                            await send(_line(snap))
                            sent = snap
                except BaseException:
                    # Shutdown or the client went away: the thread stops at its next object
                    # (the nursery waits for it, so the proxy is never closed under it).
                    stop.set()
                    raise
        finally:
            ok = "result" in box
            if cleanup is not None:
                with trio.CancelScope(shield=True):
                    await _call(cleanup, ok)
        err = box.get("error")
        if isinstance(err, OvsfsError):
            log.warning("%s: failed: %s", what, err.message)
            await send(_line({"error": err.message}))
        elif err is not None:
            log.error("%s: failed", what, exc_info=err)
            await send(_line({"error": f"internal error: {type(err).__name__}: {err}"}))
        else:
            log.info("%s: done: %s", what, box["result"])
            await send(_line({"result": box["result"]}))

    return Response(200, stream=run)


def _addr(body: dict[str, Any]) -> str:
    addr = body.get("addr")
    host, sep, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument("field 'addr' must be HOST:PORT")
    return str(addr)


def _preset_from(body: dict[str, Any]) -> Preset:
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidArgument("missing field 'name'")
    pols = body.get("policies")
    if not isinstance(pols, list) or not pols:
        raise InvalidArgument("field 'policies' must be a list of k,m,c,x (at least one)")
    policies = [parse_policy(p if isinstance(p, str) else ",".join(map(str, p))) for p in pols]
    mfs = body.get("max_fragment_size", 4 << 20)
    if isinstance(mfs, bool) or not isinstance(mfs, (int, str)):
        raise InvalidArgument("field 'max_fragment_size' must be bytes or a size like '4M'")
    preset = Preset(name=name, policies=policies, max_fragment_size=parse_size(mfs),
                    compression=str(body.get("compression") or "none"),
                    encryption=str(body.get("encryption") or "none"))
    preset.validate()
    return preset


class BackendApi:
    def __init__(self, backend: NodeBackend | None) -> None:
        self.backend = backend

    def routes(self, seg: str) -> list[tuple[str, dict[str, Route]]]:
        return [
            (r"/presets", {"GET": self.list_presets, "POST": self.create_preset}),
            (rf"/presets/{seg}", {"GET": self.get_preset}),
            (rf"/presets/{seg}/explain", {"GET": self.explain_preset}),
            (r"/backend", {"GET": self.status}),
            (r"/backend/repair", {"POST": self.repair}),
            (r"/backend/gc", {"POST": self.gc}),
            (r"/backend/asds", {"POST": self.add_asd}),
            (rf"/backend/asds/{seg}", {"DELETE": self.remove_asd}),
        ]

    def _backend(self) -> NodeBackend:
        if self.backend is None or self.backend.kind != "asd":
            raise HttpError(409, LOCAL_ONLY)
        return self.backend

    def _proxy(self) -> "ProxyStore":
        proxy = self._backend().proxy
        if proxy is None:
            raise HttpError(503, "the backend is not open")
        return proxy

    # ---- presets -------------------------------------------------------------------------

    def _preset_dict(self, p: Preset) -> dict[str, Any]:
        d = p.to_dict()
        d["active"] = p.name == self._backend().cfg.backend.preset  # the one the proxy writes with
        return d

    async def list_presets(self, req: Request) -> Response:
        presets = await _call(self._backend().presets.list)
        return Response(200, [self._preset_dict(p) for p in presets])

    async def get_preset(self, req: Request, name: str) -> Response:
        return Response(200, self._preset_dict(await _call(self._backend().presets.get, name)))

    async def create_preset(self, req: Request) -> Response:
        store = self._backend().presets
        preset = _preset_from(req.json())
        await _call(store.create, preset)
        log.info("created preset %s: %s", preset.name, ", ".join(str(p) for p in preset.policies))
        return Response(201, self._preset_dict(preset))

    async def explain_preset(self, req: Request, name: str) -> Response:
        preset = await _call(self._backend().presets.get, name)
        text = req.query.get("object_size")
        if not text:
            raise InvalidArgument("query parameter object_size is missing (e.g. ?object_size=64M)")
        res = explain(preset, parse_size(text))
        proxy = self._proxy()
        live = await _call(lambda: preset.choose(proxy.asds.node_counts()))
        res["live_policy"] = str(live) if live else None  # what a put would use right now
        return Response(200, res)

    # ---- status, repair ------------------------------------------------------------------

    async def status(self, req: Request) -> Response:
        backend, proxy = self._backend(), self._proxy()
        st = await _call(proxy.status)
        # The ASD processes this daemon runs itself, with why one is not running.
        local = {a["addr"]: a for a in backend.local_status()}
        for row in st["asds"]:
            lp = local.get(row["addr"])
            if lp is not None:
                row["local"] = lp
        return Response(200, st)

    async def repair(self, req: Request) -> Response:
        proxy = self._proxy()
        return await progress_job("backend repair", lambda progress: proxy.maintenance.repair(progress=progress))

    async def gc(self, req: Request) -> Response:
        """Garbage collection now; body {"grace": seconds} overrides backend.gc_grace."""
        proxy = self._proxy()
        grace = req.json().get("grace")
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0):
            raise HttpError(400, "grace must be a number of seconds >= 0")
        return await progress_job("backend gc", lambda progress: proxy.maintenance.gc(progress=progress, grace=grace))

    # ---- ASDs ----------------------------------------------------------------------------

    async def add_asd(self, req: Request) -> Response:
        backend, proxy = self._backend(), self._proxy()
        addr = _addr(req.json())
        c = await _call(proxy.asds.add, addr)
        await _call(backend.set_removed, addr, False)
        log.info("added ASD %s (%s, node %s)", c.asd_id, addr, c.node)
        return Response(201, {"asd_id": c.asd_id, "addr": c.addr, "node": c.node})

    async def remove_asd(self, req: Request, key: str) -> Response:
        backend, proxy = self._backend(), self._proxy()
        c = await _call(proxy.asds.find, key)  # unknown: a 404 before streaming starts
        asd_id, addr = c.asd_id, c.addr

        def cleanup(ok: bool) -> None:
            if ok:
                backend.set_removed(addr, True)  # the config may name it: do not attach it again
            else:
                proxy.asds.draining.discard(asd_id)  # stopped or failed: it takes writes again

        return await progress_job(f"drain of ASD {asd_id} ({addr})",
                                  lambda progress: proxy.maintenance.drain(asd_id, progress=progress),
                                  cleanup)
