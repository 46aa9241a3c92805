"""ASD: a storage daemon owning one disk (a directory) and serving fragments over TCP.

Each stored value is a file `<dir>/<kind>/<quoted rest of key>` holding a header
with the value's CRC32C and one CRC32C per 64 KiB block, then the bytes. Full reads
verify everything; partial reads verify just the blocks they touch, so a 4 KiB read
of a 1 MiB fragment costs one block, not the fragment. Any damage (wiped directory,
flipped bits, truncated file) is answered with an error reply; the daemon keeps
serving. One thread per connection: the work is disk I/O and CRCs, both of which
release the GIL.

Fencing (issue 11): the disk keeps a durable owner generation per namespace
(`fences.json`, replaced atomically and fsynced). An owner write (put or delete with
`ns` and `gen` in its header) is refused with the error code "fenced" when gen is
below the namespace's fence; the check and the rename (or unlink) happen under the
namespace's lock, which the `fence` op takes too, so a write either lands before a
fence is acknowledged or is refused after it. Writes without `gen` (maintenance,
repair, GC, namespace records) are not owner writes and are not checked. A put may
also carry `if_newer` (a record sequence number): it is refused with code "stale"
when the key already holds a manifest or tombstone with a higher sequence, so
a repair by one proxy never overwrites a newer record another proxy wrote.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import crc32c

from ovsfs.backend import wire

log = logging.getLogger("ovsfs.asd")

FENCES = "fences.json"
_STRIPES = 16
FILE_MAGIC = b"OVF1"
FILE_HEAD = struct.Struct(">4sIQII")  # magic, block size, length, whole crc, block count
BLOCK = 64 << 10
_KEY = re.compile(r"^([a-z])/([A-Za-z0-9._/%-]{1,400})$")


class AsdError(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


def _split(key: Any) -> tuple[str, str]:
    m = _KEY.match(key) if isinstance(key, str) else None
    if not m or ".." in key:
        raise AsdError("invalid", f"bad key {key!r}")
    fname = m.group(2).replace("%", "%25").replace("/", "%2F")
    if len(fname) > 250:
        raise AsdError("invalid", "key too long")
    return m.group(1), fname


def _unquote(fname: str) -> str:
    return fname.replace("%2F", "/").replace("%25", "%")


def encode_file(data: bytes | bytearray | memoryview, crc: int) -> tuple[bytes, memoryview]:
    """Header + block CRC table for `data` (the data itself is written separately)."""
    view = memoryview(data)
    n = (len(view) + BLOCK - 1) // BLOCK
    table = struct.pack(f">{n}I", *(crc32c.crc32c(view[i * BLOCK:(i + 1) * BLOCK]) for i in range(n)))
    return FILE_HEAD.pack(FILE_MAGIC, BLOCK, len(view), crc, n) + table, view


class Disk:
    """The on-disk side: atomic puts, verified reads."""

    def __init__(self, root: Path, node: str) -> None:
        self.root = Path(root)
        self.node = node
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "asd.json"
        try:
            info = json.loads(meta.read_text())
            self.asd_id = str(info["asd_id"])
        except (OSError, ValueError, KeyError):
            self.asd_id = uuid.uuid4().hex
        self._write_meta()
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._fence_file_lock = threading.Lock()
        self.fences: dict[str, int] = {}
        try:
            raw = json.loads((self.root / FENCES).read_text())
            self.fences = {str(k): int(v) for k, v in raw.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            # Refuse to start rather than forget fences: a stale owner would get through.
            raise SystemExit(f"ASD {self.root}: {FENCES} unreadable: {e}")

    # -- fencing ---------------------------------------------------------------------

    def ns_lock(self, ns: str) -> threading.Lock:
        return self._stripes[hash(ns) % _STRIPES]

    def check_gen(self, ns: str, gen: int) -> None:
        """Call with ns_lock(ns) held."""
        in_force = self.fences.get(ns, 0)
        if gen < in_force:
            raise AsdError("fenced", f"namespace {ns} is fenced: generation {gen} refused, "
                                     f"{in_force} in force")

    def fence(self, ns: str, gen: int) -> int:
        """Raise ns's fence to gen (never lower), durably; returns the one in force."""
        with self.ns_lock(ns):
            cur = self.fences.get(ns, 0)
            if gen <= cur:
                return cur
            with self._fence_file_lock:
                new = {**self.fences, ns: gen}
                tmp = self.root / f".{FENCES}.tmp"
                self.root.mkdir(parents=True, exist_ok=True)
                with open(tmp, "w") as f:
                    json.dump(new, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, self.root / FENCES)
                dfd = os.open(self.root, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
                self.fences = new
            return gen

    def _guarded(self, guard: tuple[str, int] | None, if_newer: int | None, path: Path,
                 key: str, action) -> None:  # type: ignore[no-untyped-def]
        """Run action (a rename or unlink) after the owner-generation and sequence checks,
        atomically with respect to a concurrent fence of the same namespace."""
        if guard is None and if_newer is None:
            action()
            return
        lock = self.ns_lock(guard[0] if guard else key)
        lock.acquire()
        try:
            if guard:
                self.check_gen(*guard)
            if if_newer is not None:
                cur = self._record_seq(key)
                if cur is not None and cur > if_newer:
                    raise AsdError("stale", f"{key} holds a record numbered {cur} > {if_newer}")
            action()
        finally:
            lock.release()

    def _record_seq(self, key: str) -> int | None:
        """Sequence number of the manifest or tombstone stored under key (None: none)."""
        try:
            data, _crc = self.read(key, 0, 11)
        except AsdError:
            return None   # absent, damaged or too short to be a record: nothing newer there
        if len(data) < 11 or data[:2] not in (b"OM", b"OT"):
            return None
        return int(struct.unpack_from(">Q", data, 3)[0])

    def _write_meta(self) -> None:
        # Re-written when missing so that a wiped disk keeps its identity while the
        # process lives (the proxy then refills it instead of treating it as new).
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "asd.json").write_text(json.dumps({"asd_id": self.asd_id, "node": self.node}))
        except OSError as e:
            log.warning("cannot write asd.json: %s", e)

    def _path(self, key: Any) -> Path:
        kind, fname = _split(key)
        return self.root / kind / fname

    def put(self, key: str, data: bytearray, crc: int, guard: tuple[str, int] | None = None,
            if_newer: int | None = None) -> None:
        if crc32c.crc32c(data) != crc:
            raise AsdError("corrupt", f"{key}: payload does not match its CRC32C")
        path = self._path(key)
        head, view = encode_file(data, crc)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        for attempt in (0, 1):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                break
            except FileNotFoundError:
                if attempt:
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)  # wiped directory: recreate
                if not (self.root / "asd.json").exists():
                    self._write_meta()
        try:
            try:
                os.write(fd, head)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # a put is acknowledged durable
            finally:
                os.close(fd)
            self._guarded(guard, if_newer, path, key, lambda: os.rename(tmp, path))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)   # ... and so is its name
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _open(self, key: str) -> tuple[int, int, int, int, bytes]:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise AsdError("notfound", f"{key} does not exist") from None
        try:
            head = os.pread(fd, FILE_HEAD.size, 0)
            if len(head) != FILE_HEAD.size:
                raise AsdError("corrupt", f"{key}: truncated header")
            magic, bs, length, crc, n = FILE_HEAD.unpack(head)
            if magic != FILE_MAGIC or bs <= 0 or n != (length + bs - 1) // bs:
                raise AsdError("corrupt", f"{key}: bad header")
            table = os.pread(fd, 4 * n, FILE_HEAD.size)
            if len(table) != 4 * n:
                raise AsdError("corrupt", f"{key}: truncated CRC table")
        except BaseException:
            os.close(fd)
            raise
        return fd, bs, length, crc, table

    def read(self, key: str, offset: int | None = None, length: int | None = None) -> tuple[bytes, int]:
        """The value (or a verified slice of it) and the whole value's CRC32C."""
        fd, bs, size, crc, table = self._open(key)
        try:
            if offset is None:
                offset, length = 0, size
            if length is None or offset < 0 or length < 0 or offset + length > size:
                raise AsdError("invalid", f"{key}: range {offset}+{length} outside {size} bytes")
            if length == 0:
                return b"", crc
            first, last = offset // bs, (offset + length - 1) // bs
            base = FILE_HEAD.size + len(table)
            want = min(size, (last + 1) * bs) - first * bs
            data = os.pread(fd, want, base + first * bs)
        finally:
            os.close(fd)
        if len(data) != want:
            raise AsdError("corrupt", f"{key}: truncated data")
        view = memoryview(data)
        for i in range(first, last + 1):
            stored = struct.unpack_from(">I", table, 4 * i)[0]
            if crc32c.crc32c(view[(i - first) * bs:(i - first + 1) * bs]) != stored:
                raise AsdError("corrupt", f"{key}: block {i} fails its CRC32C")
        if offset == 0 and length == size and crc32c.crc32c(data) != crc:
            raise AsdError("corrupt", f"{key}: fails its CRC32C")
        start = offset - first * bs
        return (data if start == 0 and length == len(data) else data[start:start + length]), crc

    def delete(self, key: str, guard: tuple[str, int] | None = None) -> None:
        path = self._path(key)

        def unlink() -> None:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._guarded(guard, None, path, key, unlink)

    def list(self, prefix: str) -> list[str]:
        kind = prefix[:1]
        if not re.match(r"^[a-z]$", kind):
            raise AsdError("invalid", f"bad prefix {prefix!r}")
        try:
            names = [e.name for e in os.scandir(self.root / kind) if not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        keys = (f"{kind}/{_unquote(n)}" for n in names)
        return sorted(k for k in keys if k.startswith(prefix))

    def ages(self, prefix: str) -> tuple[list[str], list[float]]:
        """Keys under a prefix with the seconds since each was written, by this disk's own
        clock (garbage collection spares young fragments: a put may still be under way)."""
        keys, ages = [], []
        now = time.time()
        for key in self.list(prefix):
            try:
                mtime = self._path(key).stat().st_mtime
            except FileNotFoundError:
                continue
            keys.append(key)
            ages.append(max(0.0, now - mtime))
        return keys, ages

    def usage(self) -> dict[str, Any]:
        try:
            st = os.statvfs(self.root)
        except FileNotFoundError:
            self._write_meta()
            st = os.statvfs(self.root)
        used = 0
        count = 0
        try:
            for e in os.scandir(self.root / "f"):
                try:
                    used += e.stat().st_size
                    count += 1
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass
        return {"capacity": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
                "used": used, "fragments": count}


class _Handler(socketserver.BaseRequestHandler):
    server: "AsdServer"

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                header, payload = wire.recv_frame(sock, wire.REQUEST_MAGIC)
            except wire.ProtocolError as e:
                # Tell the peer why, then drop it: the byte stream is out of step.
                self._reply({"ok": False, "error": "invalid", "msg": str(e)})
                return
            except OSError:
                return
            reply, data = self.server.dispatch(header, payload)
            if not self._reply(reply, data):
                return

    def _reply(self, header: dict[str, Any], data: bytes = b"") -> bool:
        try:
            wire.send_frame(self.request, wire.REPLY_MAGIC, header, data)
            return True
        except OSError:
            return False


class AsdServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], disk: Disk) -> None:
        super().__init__(addr, _Handler)
        self.disk = disk

    def dispatch(self, h: dict[str, Any], payload: bytearray) -> tuple[dict[str, Any], bytes]:
        d = self.disk
        try:
            op = h.get("op")
            guard = (str(h["ns"]), int(h["gen"])) if "gen" in h else None
            if op == "put":
                newer = h.get("if_newer")
                d.put(h["key"], payload, int(h["crc"]), guard, None if newer is None else int(newer))
                return {"ok": True}, b""
            if op == "fence":
                return {"ok": True, "gen": d.fence(str(h["ns"]), int(h["gen"]))}, b""
            if op == "fences":
                return {"ok": True, "fences": dict(d.fences)}, b""
            if op == "get":
                data, crc = d.read(h["key"])
                return {"ok": True, "crc": crc}, data
            if op == "get_range":
                data, crc = d.read(h["key"], int(h["offset"]), int(h["length"]))
                return {"ok": True, "crc": crc}, data
            if op == "verify":
                data, crc = d.read(h["key"])
                return {"ok": True, "crc": crc, "length": len(data)}, b""
            if op == "delete":
                d.delete(h["key"], guard)
                return {"ok": True}, b""
            if op == "list":
                return {"ok": True, "keys": d.list(str(h.get("prefix", "")))}, b""
            if op == "ages":
                keys, ages = d.ages(str(h.get("prefix", "")))
                return {"ok": True, "keys": keys, "ages": ages}, b""
            if op == "scan":
                return self._scan(str(h.get("prefix", "")))
            if op == "usage":
                return {"ok": True, **d.usage()}, b""
            if op == "info":
                return {"ok": True, "asd_id": d.asd_id, "node": d.node}, b""
            raise AsdError("invalid", f"unknown op {op!r}")
        except AsdError as e:
            return {"ok": False, "error": e.code, "msg": str(e)}, b""
        except (KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": "invalid", "msg": f"bad request: {e!r}"}, b""
        except OSError as e:
            log.warning("I/O error on %s: %s", h.get("op"), e)
            return {"ok": False, "error": "io", "msg": f"{e.strerror or e}"}, b""

    def _scan(self, prefix: str) -> tuple[dict[str, Any], bytes]:
        """Every small value under a prefix in one reply: a proxy's cold start reads all
        manifests of a disk with one round trip instead of one per object."""
        keys, sizes, parts, skipped = [], [], [], 0
        for key in self.disk.list(prefix):
            try:
                data, _crc = self.disk.read(key)
            except AsdError:
                skipped += 1  # damaged or deleted meanwhile: the other replicas answer
                continue
            keys.append(key)
            sizes.append(len(data))
            parts.append(data)
        return {"ok": True, "keys": keys, "sizes": sizes, "skipped": skipped}, b"".join(parts)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    """`ovsfs asd serve --path DIR --listen HOST:PORT --node NODE`."""
    p = argparse.ArgumentParser(prog="ovsfs asd serve", description="serve one disk as an ASD")
    p.add_argument("--path", required=True, help="directory holding this ASD's fragments")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    p.add_argument("--node", default=socket.gethostname(), help="storage node this disk belongs to")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        addr = parse_listen(args.listen)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    disk = Disk(Path(args.path), args.node)
    server = AsdServer(addr, disk)
    host, port = server.server_address[:2]
    # Tests and `ovsfs run` read this line to learn the port when 0 was asked for.
    print(f"ASD {disk.asd_id} node {args.node} listening on {host}:{port}", flush=True)
    try:
        import sdnotify
        sdnotify.SystemdNotifier().notify(f"READY=1\nSTATUS=serving {args.path} on {host}:{port}")
    except Exception:  # noqa: BLE001 - not under systemd, or sdnotify missing: nothing to tell
        pass
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
