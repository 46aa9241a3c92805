"""Management API routes of a node in a cluster: nodes, ownership moves and restarts, DTL.

The work is done by the node's cluster member (ovsfs/member/), handed in as a
`ClusterOps`; this module only maps HTTP onto it. A node without `[cluster] etcd`
answers these routes with 400 and says so. Moves and restarts wait for uploads and for
another node: they run on worker threads of their own, never the event loop.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from ovsfs.errors import InvalidArgument
from ovsfs.mgmt.http import Request, Response, ThreadPool

Route = Callable[..., Awaitable[Response]]

CLUSTER_THREADS = ThreadPool("mgmt_cluster_threads", 4)

DTL_MODES = ("none", "async", "sync")


class ClusterOps(Protocol):
    def status(self) -> dict[str, Any]:
        """This node, the cluster store, every node with alive / failure domain."""
    def nodes(self) -> list[dict[str, Any]]: ...
    def remote_volumes(self, vpool: str | None) -> list[dict[str, Any]]:
        """Volumes this node does not serve: registry fields, `state` "remote", `owner`."""
    def volume_cluster(self, volume: str) -> dict[str, Any]:
        """Owner node, generation, DTL record (mode, peer, state, unsafe bytes) of a volume."""
    def move(self, volume: str, node: str) -> dict[str, Any]:
        """Hand a volume over to `node` (on its owner); NotOwner elsewhere."""
    def restart(self, volume: str, on: str, force: bool) -> dict[str, Any]:
        """Take a volume from a dead or unreachable owner onto node `on`."""
    def take(self, volume: str, gen: int, force: bool) -> dict[str, Any]:
        """Node-to-node: open a volume this node has just been given or is taking."""
    def set_dtl_mode(self, kind: str, name: str, mode: str | None) -> dict[str, Any]:
        """DTL mode of a vPool (its default) or a volume (override; None: the vPool's)."""


def _not_clustered() -> InvalidArgument:
    return InvalidArgument("this node is not in a cluster: set [cluster] etcd in its config")


class ClusterApi:
    def __init__(self, ops: ClusterOps | None) -> None:
        self.ops = ops

    def routes(self, seg: str) -> list[tuple[str, dict[str, Route]]]:
        return [
            (r"/cluster", {"GET": self.status}),
            (r"/nodes", {"GET": self.nodes}),
            (rf"/volumes/{seg}/cluster", {"GET": self.volume_cluster}),
            (rf"/volumes/{seg}/move", {"POST": self.move}),
            (rf"/volumes/{seg}/restart", {"POST": self.restart}),
            (rf"/volumes/{seg}/take", {"POST": self.take}),
            (rf"/volumes/{seg}/dtl", {"PUT": self.volume_dtl}),
            (rf"/vpools/{seg}/dtl", {"PUT": self.vpool_dtl}),
        ]

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.ops is None:
            raise _not_clustered()
        return await CLUSTER_THREADS.run(fn, *args)

    async def status(self, req: Request) -> Response:
        return Response(200, await self._run(lambda: self.ops.status()))  # type: ignore[union-attr]

    async def nodes(self, req: Request) -> Response:
        return Response(200, await self._run(lambda: self.ops.nodes()))  # type: ignore[union-attr]

    async def volume_cluster(self, req: Request, name: str) -> Response:
        return Response(200, await self._run(lambda: self.ops.volume_cluster(name)))  # type: ignore[union-attr]

    async def move(self, req: Request, name: str) -> Response:
        node = _text(req.json(), "node")
        return Response(200, await self._run(lambda: self.ops.move(name, node)))  # type: ignore[union-attr]

    async def restart(self, req: Request, name: str) -> Response:
        body = req.json()
        on, force = _text(body, "on"), _flag(body, "force")
        return Response(200, await self._run(lambda: self.ops.restart(name, on, force)))  # type: ignore[union-attr]

    async def take(self, req: Request, name: str) -> Response:
        body = req.json()
        gen = body.get("gen")
        if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
            raise InvalidArgument("field 'gen' must be a generation number >= 1")
        force = _flag(body, "force")
        return Response(200, await self._run(lambda: self.ops.take(name, gen, force)))  # type: ignore[union-attr]

    async def volume_dtl(self, req: Request, name: str) -> Response:
        mode = _mode(req.json(), allow_default=True)
        return Response(200, await self._run(lambda: self.ops.set_dtl_mode("volume", name, mode)))  # type: ignore[union-attr]

    async def vpool_dtl(self, req: Request, name: str) -> Response:
        mode = _mode(req.json(), allow_default=False)
        return Response(200, await self._run(lambda: self.ops.set_dtl_mode("vpool", name, mode)))  # type: ignore[union-attr]


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"field {key!r} must name a node")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"field {key!r} must be true or false")
    return value


def _mode(body: dict[str, Any], allow_default: bool) -> str | None:
    mode = body.get("mode")
    if mode == "default" and allow_default:
        return None
    if mode not in DTL_MODES:
        more = " or default (the vPool's)" if allow_default else ""
        raise InvalidArgument(f"field 'mode' must be none, async or sync{more}, not {mode!r}")
    return mode
