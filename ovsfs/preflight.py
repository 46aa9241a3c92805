"""Can every configured door listen? Checked once at daemon start, before anything runs.

A node that reports ready without a door its config asks for is worse than one that does
not start: a client (or systemd, or an orchestrator) is told the node serves when it does
not. So each address a door will take (the NBD unix socket and TCP port, the FUSE mount
point, the management socket) is tried here, and the first that cannot be used stops
the daemon with one line that names the door, the address and the config key to change.
The doors still fail at start for anything this misses (a port taken in between): the
daemon turns that into the same kind of line (daemon.py).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from ovsfs.config import Config
from ovsfs.errors import ConfigError

# The longest path a unix socket address takes (sun_path is 108 bytes, NUL-terminated).
MAX_UNIX_PATH = 107


class DoorUnavailable(ConfigError):
    """A door cannot take its address; the message is the one line the operator sees."""

    def __init__(self, door: str, address: str, reason: str, key: str, fix: str) -> None:
        super().__init__(f"{door} door cannot start: {address}: {reason}; change {key} in {fix}")
        self.door, self.address, self.key = door, address, key


def check_doors(cfg: Config, source: str) -> None:
    """Raise DoorUnavailable for the first configured door address that cannot be used.

    `source` names where the operator changes the key (the config file, and how).
    Creates the socket directories (as the doors would); binds nothing it keeps."""
    check_unix_socket("management API", cfg.path(cfg.mgmt.socket), "mgmt.socket", source)
    if cfg.nbd.enabled:
        check_unix_socket("nbd", cfg.path(cfg.nbd.socket), "nbd.socket", source)
        if cfg.nbd.tcp_port:
            check_tcp("nbd", cfg.nbd.tcp_host, cfg.nbd.tcp_port, source)
    if cfg.fuse.enabled:
        check_mountpoint("fuse", cfg.path(cfg.fuse.mountpoint), "fuse.mountpoint", source)


def check_write_buffer(cfg: Config, source: str) -> None:
    """Raise ConfigError (one line) when the write-buffer directory cannot be created: the
    engine could not open any volume there."""
    wb = cfg.path(cfg.engine.write_buffer)
    try:
        wb.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"the write buffer {wb} cannot be created: {e.strerror or e}; "
                          f"change engine.write_buffer in {source}") from None
    if not os.access(wb, os.W_OK | os.X_OK):
        raise ConfigError(f"the write buffer {wb} is not writable; change engine.write_buffer in {source}")


def check_unix_socket(door: str, path: Path, key: str, source: str) -> None:
    address = f"unix socket {path}"
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise DoorUnavailable(door, address, f"the path is longer than {MAX_UNIX_PATH} bytes",
                              key, f"{source} (a shorter path)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoorUnavailable(door, address, f"cannot create {path.parent}: {e.strerror or e}",
                              key, source) from None
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise DoorUnavailable(door, address, "a file that is not a socket is in the way", key, source)
    # A socket file: stale (left by a killed daemon; the door replaces it) or live.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return   # nobody answers: stale
    finally:
        probe.close()
    raise DoorUnavailable(door, address, "another process is listening on it (another ovsfs node?)",
                          key, f"{source} (a path of this node's own)")


def check_tcp(door: str, host: str, port: int, source: str) -> None:
    """Bind (without listening) every address trio.open_tcp_listeners would bind."""
    address = f"TCP {host or '*'}:{port}"
    fix = f"{source}: [{door}] tcp_port = a free port, or 0 to disable {door.upper()} over TCP"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise DoorUnavailable(door, address, f"cannot resolve {host!r}: {e.strerror}",
                              f"{door}.tcp_host", source) from None
    for family, type_, proto, _name, sockaddr in infos:
        try:
            s = socket.socket(family, type_, proto)
        except OSError:
            continue   # an address family this host does not have (trio skips it too)
        try:
            # As the listener will: SO_REUSEADDR (a port in TIME_WAIT is free), v6 only on v6.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DoorUnavailable(door, address, "the port is in use (another ovsfs node or NBD server?)",
                                      f"{door}.tcp_port", fix) from None
            if e.errno == errno.EACCES:
                raise DoorUnavailable(door, address, "a port below 1024 needs root",
                                      f"{door}.tcp_port", fix) from None
            raise DoorUnavailable(door, address, e.strerror or str(e), f"{door}.tcp_host / {door}.tcp_port",
                                  source) from None
        finally:
            s.close()


def check_mountpoint(door: str, path: Path, key: str, source: str) -> None:
    """The mount point must be a directory (or creatable as one), not someone else's mount.

    A stale FUSE mount (ENOTCONN: its daemon died) passes: the FUSE door clears it."""
    address = f"mount point {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DoorUnavailable(door, address, f"cannot create it: {e.strerror or e}", key, source) from None
        return
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return
        raise DoorUnavailable(door, address, e.strerror or str(e), key, source) from None
    if not stat.S_ISDIR(st.st_mode):
        raise DoorUnavailable(door, address, "not a directory", key, source)
    if os.path.ismount(path):
        raise DoorUnavailable(door, address, "something is already mounted there (another ovsfs node?)",
                              key, f"{source} (a directory of this node's own)")
