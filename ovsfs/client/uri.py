"""`openvstorage:` drive URIs (issue 12, item 4) and `open_volume`.

    openvstorage:VOL                     a volume of this node, over shared memory
    openvstorage:VOL@SNAP                a snapshot of it, read-only
    openvstorage+tcp:HOST[:PORT]/VOL     a volume of another node (NBD until the node-to-node
    openvstorage+tcp:HOST[:PORT]/VOL@SNAP   path exists); "//" after the colon is allowed,
                                         an IPv6 HOST goes in brackets: [::1]:10809

A local volume's vhost-user socket is `SOCKET_DIR/NAME.sock`, SOCKET_DIR being the node's
`[shm] socket_dir` (default STATE/run/vhost), NAME being VOL or VOL@SNAP.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ovsfs.errors import InvalidArgument

SCHEME = "openvstorage"
TCP_SCHEME = "openvstorage+tcp"
NBD_PORT = 10809
# Volume and snapshot names as the engine accepts them (ovsfs/engine/names.py).
_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}"
_NAME_RE = re.compile(rf"^(?P<vol>{_NAME})(?:@(?P<snap>{_NAME}))?$")
_HOST_RE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d{1,5}))?$")


@dataclass(frozen=True)
class VolumeURI:
    """A parsed `openvstorage:` URI. `host` None means this node (shared memory)."""

    volume: str
    snapshot: str | None = None
    host: str | None = None
    port: int = NBD_PORT

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def name(self) -> str:
        """The export / socket name: VOL or VOL@SNAP."""
        return f"{self.volume}@{self.snapshot}" if self.snapshot else self.volume

    @property
    def read_only(self) -> bool:
        return self.snapshot is not None

    def socket_path(self, socket_dir: str | os.PathLike[str]) -> Path:
        """Where this node's shm door listens for it."""
        return Path(socket_dir) / f"{self.name}.sock"

    def nbd_uri(self, nbd_socket: str | os.PathLike[str] | None = None) -> str:
        """The NBD URI QEMU and libnbd take: nbd://HOST:PORT/NAME for a remote volume,
        nbd+unix:///NAME?socket=NBD_SOCKET for a local one."""
        if self.host is not None:
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"nbd://{host}:{self.port}/{self.name}"
        if nbd_socket is None:
            raise InvalidArgument(f"{self}: a local volume's NBD URI needs the node's NBD socket")
        return f"nbd+unix:///{self.name}?socket={nbd_socket}"

    def __str__(self) -> str:
        if self.host is None:
            return f"{SCHEME}:{self.name}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == NBD_PORT else f":{self.port}"
        return f"{TCP_SCHEME}:{host}{port}/{self.name}"


def is_uri(text: str) -> bool:
    """Whether text claims to be an openvstorage URI (parse it to know if it is valid)."""
    return text.startswith((SCHEME + ":", TCP_SCHEME + ":"))


def parse_uri(text: str) -> VolumeURI:
    """The VolumeURI of `text`; InvalidArgument naming what is wrong."""
    scheme, colon, rest = text.partition(":")
    if not colon or scheme not in (SCHEME, TCP_SCHEME):
        raise InvalidArgument(f"{text!r} is no openvstorage URI (openvstorage:VOL[@SNAP] or "
                              "openvstorage+tcp:HOST[:PORT]/VOL[@SNAP])")
    host = None
    port = NBD_PORT
    if scheme == TCP_SCHEME:
        rest = rest[2:] if rest.startswith("//") else rest
        hostport, slash, rest = rest.partition("/")
        m = _HOST_RE.match(hostport)
        if not slash or not m:
            raise InvalidArgument(f"{text!r}: expected openvstorage+tcp:HOST[:PORT]/VOL[@SNAP]")
        host = m.group("v6") or m.group("host")
        if m.group("port"):
            port = int(m.group("port"))
            if not 0 < port < 65536:
                raise InvalidArgument(f"{text!r}: port {port} is out of range")
    n = _NAME_RE.match(rest)
    if not n:
        raise InvalidArgument(f"{text!r}: {rest!r} is not VOL or VOL@SNAP (names of letters, digits, . _ -)")
    return VolumeURI(n.group("vol"), n.group("snap"), host, port)


def socket_dir_of(state: str | os.PathLike[str]) -> Path:
    """The shm door's socket directory of the node whose state directory is `state`:
    `[shm] socket_dir` of STATE/ovsfs.toml (run/vhost by default), under `state` unless
    absolute. ConfigError when that file is not a valid node config."""
    from ovsfs import config

    state = Path(state)
    path = state / "ovsfs.toml"
    cfg = config.load(path if path.exists() else None, state)
    shm = getattr(cfg, "shm", None)
    return cfg.path(shm.socket_dir if shm is not None else "run/vhost")


def open_volume(uri: str | VolumeURI, socket_dir: str | os.PathLike[str] | None = None, *,
                state: str | os.PathLike[str] | None = None, **options: Any) -> Any:
    """Open a volume by URI: a VhostVolume for this node's volumes (the shm door's socket
    under `socket_dir`, or under the socket directory of the node whose state directory is
    `state`, default ./var), an NbdVolume for another node's. Both have read / write /
    flush / trim / write_zeroes / readv / writev, size, block_size, read_only, close.
    `options` go to the class (e.g. queue_depth, io_timeout, busy_wait). Raises
    InvalidArgument for a bad URI or a socket path too long, DaemonNotRunning when the
    daemon is not there, NotFound when it is but the volume's socket is not, Busy when
    another front end holds the volume, and what the classes raise."""
    u = parse_uri(uri) if isinstance(uri, str) else uri
    if u.remote:
        from ovsfs.client.nbd import NbdVolume

        assert u.host is not None
        return NbdVolume((u.host, u.port), u.name, **options)
    from ovsfs.client.volume import VhostVolume

    if socket_dir is None:
        socket_dir = socket_dir_of(state if state is not None else "var")
    return VhostVolume(u.socket_path(socket_dir), **options)
