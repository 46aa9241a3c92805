"""A small HTTP/1.1 server on trio, for the management API on a unix socket.

Only what the API needs: a request line, headers, Content-Length bodies, keep-alive,
JSON replies and close-delimited streamed replies (NDJSON progress). Anything it
cannot parse gets a 400 and that connection is closed; other clients never notice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import trio

from ovsfs.errors import InvalidArgument, OvsfsError

log = logging.getLogger("ovsfs.mgmt")

MAX_HEAD = 64 * 1024
MAX_BODY = 1 << 20
IDLE_TIMEOUT = 300.0      # a keep-alive connection may sit idle this long
REQUEST_TIMEOUT = 30.0    # once a request has started, all of it must arrive this fast


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Send = Callable[[bytes], Awaitable[None]]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument("request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise InvalidArgument("request body must be a JSON object")
        return value


@dataclass
class Response:
    status: int = 200
    body: Any = None                       # JSON-encoded unless `stream` is set
    stream: Callable[[Send], Awaitable[None]] | None = None   # writes NDJSON lines until done
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


def error_response(exc: BaseException) -> Response:
    if isinstance(exc, HttpError):
        return Response(exc.status, {"error": exc.message})
    if isinstance(exc, OvsfsError):
        return Response(exc.http_status, {"error": exc.message})
    log.error("internal error: %r", exc, exc_info=exc)
    return Response(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})


class _Reader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def head(self) -> bytes | None:
        """The request head without its blank line; None on a clean close before a request."""
        start = 0
        while True:
            # Be lenient about bare LF line ends: curl and http.client send CRLF, humans with nc do not.
            for sep in (b"\r\n\r\n", b"\n\n"):
                i = self.buf.find(sep, max(0, start - 3))
                if i >= 0:
                    head = bytes(self.buf[:i])
                    del self.buf[:i + len(sep)]
                    return head
            if len(self.buf) > MAX_HEAD:
                raise HttpError(431, "request head is too large")
            start = len(self.buf)
            if not await self._more():
                if self.buf.strip():
                    raise HttpError(400, "connection closed in the middle of a request")
                return None

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._more():
                raise HttpError(400, "connection closed in the middle of a request body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data


def parse_head(head: bytes) -> tuple[Request, int]:
    """Parse a request head; returns the request (without body) and its Content-Length."""
    text = head.decode("latin-1").replace("\r\n", "\n")
    lines = text.lstrip("\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not method.isalpha() or not method.isupper():
        raise HttpError(400, "malformed request method")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(400 if not version.startswith("HTTP/") else 505, "unsupported HTTP version")
    url = urlsplit(target)
    if not url.path.startswith("/"):
        raise HttpError(400, "malformed request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked request bodies are not supported; send Content-Length")
    length = 0
    if "content-length" in headers:
        cl = headers["content-length"]
        if not cl.isdigit():
            raise HttpError(400, "malformed Content-Length")
        length = int(cl)
        if length > MAX_BODY:
            raise HttpError(413, f"request body is over {MAX_BODY} bytes")
    try:
        query = dict(parse_qsl(url.query, keep_blank_values=True, strict_parsing=False))
    except ValueError:
        raise HttpError(400, "malformed query string") from None
    return Request(method, unquote(url.path), query, version, headers), length


def _head_bytes(status: int, headers: dict[str, str]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _send_response(stream: trio.abc.Stream, resp: Response, keep_alive: bool, head_only: bool) -> bool:
    """Send a response; returns whether the connection may be kept open."""
    if resp.stream is not None:
        headers = {"Content-Type": "application/x-ndjson", "Connection": "close", **resp.headers}
        await stream.send_all(_head_bytes(resp.status, headers))

        async def send(data: bytes) -> None:
            await stream.send_all(data)

        await resp.stream(send)
        return False
    body = b"" if resp.body is None and resp.status == 204 else (json.dumps(resp.body) + "\n").encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
               "Connection": "keep-alive" if keep_alive else "close", **resp.headers}
    await stream.send_all(_head_bytes(resp.status, headers) + (b"" if head_only else body))
    return keep_alive


async def handle_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    reader = _Reader(stream)
    try:
        while True:
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    head = await reader.head()
                if head is None:
                    return
                with trio.fail_after(REQUEST_TIMEOUT):
                    req, length = parse_head(head)
                    req.body = await reader.exactly(length) if length else b""
            except HttpError as e:
                log.info("bad request on the management socket: %s", e.message)
                await _send_response(stream, error_response(e), False, False)
                return
            except trio.TooSlowError:
                return
            conn = req.headers.get("connection", "").lower()
            keep = conn != "close" if req.version == "HTTP/1.1" else conn == "keep-alive"
            try:
                resp = await handler(req)
            except Exception as e:  # the handler's errors become replies; the connection lives on
                resp = error_response(e)
            if not await _send_response(stream, resp, keep, req.method == "HEAD"):
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        log.exception("management connection failed")
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.aclose()


async def serve_unix(path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `handler` on a unix socket at `path` until cancelled, then remove the socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # stale: the caller holds the state lock, so no live daemon owns it
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise OvsfsError(f"cannot listen on {path}: {e.strerror or e}") from None
    try:
        # The API reads and writes files as the daemon's user: only that user may talk to it.
        os.chmod(path, 0o600)
        sock.listen(128)
        listener = trio.SocketListener(sock)

        async def conn(stream: trio.SocketStream) -> None:
            await handle_connection(stream, handler)

        task_status.started(path)
        await trio.serve_listeners(conn, [listener])
    finally:
        sock.close()
        path.unlink(missing_ok=True)


async def serve_tcp(host: str, port: int, handler: Handler, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `handler` on TCP host:port until cancelled (the API other nodes of a cluster
    call; bind it to an address only those nodes reach)."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise OvsfsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    async def conn(stream: trio.SocketStream) -> None:
        await handle_connection(stream, handler)

    task_status.started(listeners[0].socket.getsockname()[:2])
    await trio.serve_listeners(conn, listeners)


class ThreadPool:
    """A named set of worker threads for one kind of blocking call: each kind gets its own
    trio.CapacityLimiter (created once per trio run), so one kind that waits (a door's
    writers waiting for room, ASDs that are away) cannot take the threads of another."""

    def __init__(self, name: str, threads: int) -> None:
        self.threads = threads
        self._var: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar(name)

    def limiter(self) -> trio.CapacityLimiter:
        try:
            return self._var.get()
        except LookupError:
            lim = trio.CapacityLimiter(self.threads)
            self._var.set(lim)
            return lim

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter())
