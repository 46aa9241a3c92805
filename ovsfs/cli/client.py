"""The CLI's side of the management socket: http.client over AF_UNIX."""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote


class CliError(Exception):
    """One line for the user; the CLI prints it as `ovsfs: error: ...` and exits 1."""


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the management API's transport (tests and tools use it too)."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def state_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("OVSFS_STATE") or "var")


def socket_path(state: Path) -> Path:
    """Where the daemon of a state directory listens: its ovsfs.toml may move the socket."""
    sock = "run/ovsfs.sock"
    try:
        data = tomllib.loads((state / "ovsfs.toml").read_text())
        value = data.get("mgmt", {}).get("socket")
        if isinstance(value, str) and value:
            sock = value
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass  # no or broken config: the daemon will not be using it either; assume the default
    p = Path(sock)
    return p if p.is_absolute() else state / p


def q(name: str) -> str:
    return quote(name, safe="")


class Client:
    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self.timeout = timeout

    def _open(self, method: str, url: str, body: Any) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        if not self.path.exists():
            raise CliError(f"daemon is not running (no socket at {self.path})")
        conn = UnixConnection(str(self.path), self.timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, url, body=data, headers=headers)
            return conn, conn.getresponse()
        except (ConnectionRefusedError, FileNotFoundError):
            conn.close()
            raise CliError(f"daemon is not running (no socket at {self.path})") from None
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            if isinstance(e, OSError) and e.errno == errno.EACCES:
                raise CliError(f"no permission to use the daemon's socket {self.path}") from None
            raise CliError(f"lost the connection to the daemon at {self.path}: {e}") from None

    @staticmethod
    def _error(resp: http.client.HTTPResponse, data: bytes) -> CliError:
        try:
            msg = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            msg = data.decode(errors="replace").strip() or resp.reason
        return CliError(str(msg))

    def call(self, method: str, url: str, body: Any = None) -> Any:
        conn, resp = self._open(method, url, body)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise CliError(f"lost the connection to the daemon: {e}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise self._error(resp, data)
        try:
            return json.loads(data) if data.strip() else None
        except ValueError:
            raise CliError("the daemon sent a reply that is not JSON") from None

    def stream(self, method: str, url: str, body: Any,
               progress: Callable[[int, int], None]) -> Any:
        """A streamed job: call progress(done, total) per line; return the final result."""
        conn, resp = self._open(method, url, body)
        try:
            if resp.status >= 400:
                raise self._error(resp, resp.read())
            for line in self._lines(resp):
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise CliError("the daemon sent a progress line that is not JSON") from None
                if "error" in msg:
                    raise CliError(str(msg["error"]))
                if "result" in msg:
                    return msg["result"]
                if "done" in msg:
                    progress(int(msg["done"]), int(msg["total"]))
            raise CliError("the daemon closed the connection before the job finished")
        finally:
            conn.close()

    @staticmethod
    def _lines(resp: http.client.HTTPResponse) -> Iterator[bytes]:
        while True:
            try:
                line = resp.readline()
            except (OSError, http.client.HTTPException) as e:
                raise CliError(f"lost the connection to the daemon: {e}") from None
            if not line:
                return
            if line.strip():
                yield line
