"""The cluster configuration store on etcd (issue 11): the calls of the embedded `ConfigStore`
plus revisions, compare-and-swap and leases, through etcd's v3 JSON gateway.

Why the gateway over HTTP: the gRPC etcd clients for Python are asyncio-only or broken with
current protobuf (TESTBED.md "etcd"); the gateway is plain JSON over HTTP and a synchronous
`httpx.Client` is safe to share between threads (the engine calls the store from worker
threads, the daemon from `trio.to_thread`).

Keys are relative to `prefix` (one cluster = one prefix): `get("/volumes/v1")` reads the etcd
key `/ovsfs/volumes/v1`. Values are JSON, as in `ConfigStore`. Every failure (no member
answers, an error reply) raises `ClusterError` naming the URL(s) tried.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import httpx

from ovsfs.errors import ClusterError

log = logging.getLogger(__name__)

# gRPC status codes etcd's gateway returns in {"code": N}.
_GRPC_NOT_FOUND = 5          # e.g. "requested lease not found"
_GRPC_UNAVAILABLE = 14       # e.g. "no leader", "server stopped": another member may answer


def _b64(s: str | bytes) -> str:
    raw = s.encode() if isinstance(s, str) else s
    return base64.b64encode(raw).decode("ascii")


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def prefix_range_end(key: bytes) -> bytes:
    """etcd's prefix rule: the range [key, end) covers every key starting with `key`, where end
    is key with its last byte below 0xff incremented and what follows dropped."""
    for i in range(len(key) - 1, -1, -1):
        if key[i] < 0xFF:
            return key[:i] + bytes([key[i] + 1])
    return b"\0"   # every byte 0xff (or empty): the range runs to the end of the key space


class LeaseGone(ClusterError):
    """The lease named in a request does not exist (any more): it expired or was revoked,
    and the keys put under it are gone."""


class _Retryable(Exception):
    """One member could not be used; the next URL may answer."""


class EtcdStore:
    """Key -> JSON store on an etcd 3.4+ cluster. Thread-safe.

    `urls`: client URLs of the members (`http://host:port`); requests go to the last one that
    answered and fail over to the others. `prefix`: every key lives under it. `timeout`:
    seconds one request to one member may take (connect and reply).
    """

    def __init__(self, urls: list[str], prefix: str = "/ovsfs", timeout: float = 5.0) -> None:
        if not urls:
            raise ClusterError("no etcd URL given (cluster.etcd is empty)")
        if not prefix.startswith("/") or prefix.endswith("/"):
            raise ClusterError(f"etcd prefix {prefix!r} must start with / and not end with /")
        self.urls = [u.rstrip("/") for u in urls]
        self.prefix = prefix
        self.timeout = timeout
        # trust_env=False: no HTTP(S)_PROXY detour on the way to our own etcd.
        self._client = httpx.Client(timeout=httpx.Timeout(timeout), trust_env=False)
        self._lock = threading.Lock()     # guards _current only; httpx.Client is thread-safe
        self._current = 0

    # ---- the ConfigStore calls ------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """The JSON value at `key`, or None. ClusterError when etcd cannot answer."""
        return self.get_rev(key)[0]

    def get_rev(self, key: str) -> tuple[Any | None, int]:
        """(value, mod_revision) of `key`; (None, 0) when it does not exist. The revision is
        what `cas` compares against."""
        reply = self._call("/v3/kv/range", {"key": _b64(self._full(key))}, idempotent=True)
        kvs = reply.get("kvs") or []
        if not kvs:
            return None, 0
        return self._decode(kvs[0]), int(kvs[0].get("mod_revision", 0))

    def put(self, key: str, value: Any, lease: int | None = None) -> None:
        """Store `value` (JSON) at `key`; with `lease`, etcd deletes the key when that lease
        expires or is revoked. LeaseGone (a ClusterError) when the lease does not exist (any
        more)."""
        body: dict[str, Any] = {"key": _b64(self._full(key)), "value": _b64(json.dumps(value))}
        if lease:
            body["lease"] = str(lease)
        self._call("/v3/kv/put", body, idempotent=True)

    def delete(self, key: str) -> None:
        """Delete `key` (no error when it does not exist)."""
        self._call("/v3/kv/deleterange", {"key": _b64(self._full(key))}, idempotent=True)

    def list(self, prefix: str) -> dict[str, Any]:
        """Every key starting with `prefix` (relative to the store's prefix) -> its value, in
        key order. `list("")` lists the whole cluster."""
        start = self._full(prefix if prefix else "/").encode()
        reply = self._call("/v3/kv/range",
                           {"key": _b64(start), "range_end": _b64(prefix_range_end(start))},
                           idempotent=True)
        cut = len(self.prefix)
        out: dict[str, Any] = {}
        for kv in reply.get("kvs") or []:
            out[_unb64(kv["key"]).decode()[cut:]] = self._decode(kv)
        return out

    def close(self) -> None:
        self._client.close()

    # ---- compare-and-swap -------------------------------------------------------------------

    def cas(self, key: str, expected_rev: int, value: Any, lease: int | None = None) -> bool:
        """Put `value` at `key` only if its mod_revision is still `expected_rev` (from
        `get_rev`); `expected_rev` 0 means the key must not exist. True when written, False
        when the key changed meanwhile. ClusterError when etcd cannot answer: then whether
        the put happened is unknown to the caller (read again)."""
        full = _b64(self._full(key))
        if expected_rev == 0:
            cmp = {"target": "CREATE", "key": full, "create_revision": "0", "result": "EQUAL"}
        else:
            cmp = {"target": "MOD", "key": full, "mod_revision": str(expected_rev),
                   "result": "EQUAL"}
        put: dict[str, Any] = {"key": full, "value": _b64(json.dumps(value))}
        if lease:
            put["lease"] = str(lease)
        # Not idempotent: a retry after a reply was lost would fail its own compare.
        reply = self._call("/v3/kv/txn", {"compare": [cmp], "success": [{"request_put": put}]},
                           idempotent=False)
        return bool(reply.get("succeeded", False))

    # ---- leases -----------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; returns its id."""
        reply = self._call("/v3/lease/grant", {"TTL": int(ttl)}, idempotent=False)
        return int(reply["ID"])

    def keepalive(self, lease: int) -> bool:
        """Renew `lease` for its full TTL. False when it is gone (expired or revoked): the keys
        put under it are deleted already."""
        reply = self._call("/v3/lease/keepalive", {"ID": str(lease)}, idempotent=True)
        # The gateway streams one {"result": ...} per request; a gone lease has no TTL.
        result = reply.get("result", reply)
        return int(result.get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        """Revoke `lease` and delete its keys now; no error when it is gone already."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease)}, idempotent=True)
        except LeaseGone:
            pass

    # ---- plumbing ---------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def _decode(kv: dict[str, Any]) -> Any:
        return json.loads(_unb64(kv.get("value", "")) or b"null")

    def _call(self, path: str, body: dict[str, Any], idempotent: bool) -> dict[str, Any]:
        """POST `body` to the first member that answers, starting with the last good one.
        A connection that could not be made goes to the next member always; a request that may
        have reached a member (timeout, dropped reply) is retried elsewhere only when repeating
        it is harmless (`idempotent`)."""
        with self._lock:
            start = self._current
        errors: list[str] = []
        for step in range(len(self.urls)):
            i = (start + step) % len(self.urls)
            url = self.urls[i]
            try:
                reply = self._post(url, path, body, idempotent)
            except _Retryable as e:
                errors.append(f"{url}: {e}")
                continue
            with self._lock:
                self._current = i
            return reply
        raise ClusterError(f"etcd {path} failed on every member: " + "; ".join(errors))

    def _post(self, url: str, path: str, body: dict[str, Any], idempotent: bool) -> dict[str, Any]:
        try:
            resp = self._client.post(url + path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise _Retryable(f"cannot connect ({e})") from None
        except httpx.TransportError as e:
            if idempotent:
                raise _Retryable(f"{type(e).__name__} ({e})") from None
            raise ClusterError(f"etcd {url}{path}: {type(e).__name__} ({e}); "
                               "the request may or may not have been applied") from None
        try:
            # The keepalive stream ends its one message with a newline; take the first line.
            reply = json.loads(resp.text.strip().splitlines()[0] if resp.text.strip() else "{}")
        except ValueError:
            raise ClusterError(f"etcd {url}{path}: HTTP {resp.status_code}, not JSON: "
                               f"{resp.text[:200]!r}") from None
        if not isinstance(reply, dict):
            raise ClusterError(f"etcd {url}{path}: HTTP {resp.status_code}: {reply!r}")
        err = reply.get("error")
        if resp.status_code == 200 and err is None:
            return reply
        if isinstance(err, dict):        # a streamed reply: {"error": {"grpc_code", "message"}}
            msg, code = err.get("message"), err.get("grpc_code", err.get("code"))
        else:
            msg, code = reply.get("message") or err, reply.get("code")
        if code == _GRPC_NOT_FOUND and "lease" in str(msg):
            raise LeaseGone(f"etcd {url}{path}: {msg}")
        if code == _GRPC_UNAVAILABLE and idempotent:
            raise _Retryable(f"unavailable ({msg})")
        raise ClusterError(f"etcd {url}{path}: HTTP {resp.status_code}: {msg}")
