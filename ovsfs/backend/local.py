"""A backend store on a local directory: one directory per namespace, one file per object."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ovsfs.backend.store import check_name
from ovsfs.errors import BackendError, NotFound
from ovsfs.fsutil import fsync_path, mkdir_durable


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        mkdir_durable(self.root)

    def _ns(self, ns: str) -> Path:
        check_name("namespace", ns)
        return self.root / ns

    def _obj(self, ns: str, name: str) -> Path:
        check_name("object", name)
        return self._ns(ns) / name

    def _target(self, ns: str, name: str) -> Path:
        """Where a new object goes; its namespace must exist."""
        path = self._obj(ns, name)
        if not path.parent.is_dir():
            if not self._ns(ns).is_dir():
                raise NotFound(f"backend namespace {ns} does not exist")
            mkdir_durable(path.parent)   # sco/, tlog/, checkpoint/: their names must survive a power cut
        return path

    def create_namespace(self, ns: str, preset: str | None = None) -> None:
        """A directory; the local store keeps every object as one plain file, so it has no
        presets and `preset` is ignored."""
        mkdir_durable(self._ns(ns))

    def delete_namespace(self, ns: str) -> None:
        shutil.rmtree(self._ns(ns), ignore_errors=True)
        fsync_path(self.root)

    def namespaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def put(self, ns: str, name: str, data: bytes | memoryview) -> None:
        path = self._target(ns, name)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        try:
            # Write-then-rename keeps put atomic; fsync so the object survives a power loss
            # before the engine forgets its local copy.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            fsync_path(path.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"backend put {ns}/{name} failed: {e.strerror}") from e

    def put_file(self, ns: str, name: str, path: Path) -> None:
        """Hard-link a sealed file in when it is on the same file system: no copy at all."""
        dest = self._target(ns, name)
        tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
        except OSError:
            self.put(ns, name, Path(path).read_bytes())
            return
        try:
            fsync_path(tmp)
            os.rename(tmp, dest)
            fsync_path(dest.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"backend put {ns}/{name} failed: {e.strerror}") from e

    def get(self, ns: str, name: str) -> bytes:
        try:
            return self._obj(ns, name).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"backend object {ns}/{name} does not exist") from None
        except OSError as e:
            raise BackendError(f"backend get {ns}/{name} failed: {e.strerror}") from e

    def get_range(self, ns: str, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self._obj(ns, name), "rb", buffering=0) as f:
                data = os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise NotFound(f"backend object {ns}/{name} does not exist") from None
        except OSError as e:
            raise BackendError(f"backend read {ns}/{name} failed: {e.strerror}") from e
        if len(data) != length:
            raise BackendError(f"backend object {ns}/{name} is shorter than {offset + length} bytes")
        return data

    def delete(self, ns: str, name: str) -> None:
        path = self._obj(ns, name)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_path(path.parent)   # a deleted volume.json must not come back after a power cut

    def list(self, ns: str, prefix: str = "") -> list[str]:
        base = self._ns(ns)
        if not base.is_dir():
            raise NotFound(f"backend namespace {ns} does not exist")
        out = []
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            for f in files:
                if f.startswith("."):
                    continue
                name = f if rel == "." else f"{rel}/{f}"
                if name.startswith(prefix):
                    out.append(name)
        return sorted(out)

    def usage(self) -> dict[str, int]:
        st = os.statvfs(self.root)
        return {"capacity": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}

