"""A backend store on a local directory: one directory per namespace, one file per object.

The directory may be shared by several nodes (processes) on one machine. Fencing: the
owner generation of a namespace is kept in `<ns>/.fence` (a decimal number, replaced
atomically and fsynced); the namespace directory itself is locked with flock around
every owner write's check-and-publish (shared) and around a fence (exclusive). A put writes and fsyncs its
temporary file first, then, under the shared lock, checks the generation and renames:
so once `fence` returned, no write carrying a lower generation can still publish
anything, in this process or another. Dot files are invisible to `list`.
"""

from __future__ import annotations


import fcntl
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from ovsfs.backend.store import check_name, fenced
from ovsfs.errors import BackendError, InvalidArgument, NotFound
from ovsfs.fsutil import fsync_path, mkdir_durable

FENCE_FILE = ".fence"


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

    # -- fencing -------------------------------------------------------------------

    @contextmanager
    def _locked(self, ns: str, exclusive: bool) -> Iterator[Path]:
        base = self._ns(ns)
        try:
            fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise NotFound(f"backend namespace {ns} does not exist") from None
        except OSError as e:
            raise BackendError(f"backend namespace {ns}: cannot open its lock: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield base
        finally:
            os.close(fd)   # releases the lock

    @staticmethod
    def _read_gen(base: Path) -> int:
        try:
            return int((base / FENCE_FILE).read_text() or 0)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as e:
            # Never guess: a damaged fence must not let a stale owner through.
            raise BackendError(f"fence file {base / FENCE_FILE} unreadable: {e}") from e

    def _check(self, ns: str, base: Path, gen: int) -> None:
        in_force = self._read_gen(base)
        if gen < in_force:
            raise fenced(ns, gen, in_force)

    def fence(self, ns: str, gen: int) -> int:
        """Raise ns's generation to `gen` (never lower); returns the one in force. Durable
        (fsynced) before it returns. NotFound when ns does not exist."""
        if gen < 0:
            raise InvalidArgument(f"owner generation {gen} is negative")
        with self._locked(ns, exclusive=True) as base:
            cur = self._read_gen(base)
            if gen <= cur:
                return cur
            tmp = base / f"{FENCE_FILE}.tmp.{os.getpid()}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, str(gen).encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, base / FENCE_FILE)
                fsync_path(base)
            except OSError as e:
                with suppress(OSError):   # a read-only backend fails this too
                    tmp.unlink(missing_ok=True)
                raise BackendError(f"fence of {ns} failed: {e.strerror}") from e
            return gen

    def fence_gen(self, ns: str) -> int:
        """The generation in force in ns (0: never fenced)."""
        with self._locked(ns, exclusive=False) as base:
            return self._read_gen(base)

    def refresh(self, ns: str | None = None) -> None:
        """Nothing is cached: every call reads the directory."""

    def create_namespace(self, ns: str, preset: str | None = None) -> None:
        """A directory; the local store keeps every object as one plain file, so it has no
        presets and `preset` is ignored."""
        mkdir_durable(self._ns(ns))

    def delete_namespace(self, ns: str) -> None:
        shutil.rmtree(self._ns(ns), ignore_errors=True)
        fsync_path(self.root)

    def namespaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def put(self, ns: str, name: str, data: bytes | memoryview, gen: int = 0) -> None:
        """Atomic and durable; Fenced when gen is below ns's fence (nothing published)."""
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
            self._publish(ns, tmp, path, gen)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"backend put {ns}/{name} failed: {e.strerror}") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _publish(self, ns: str, tmp: Path, dest: Path, gen: int) -> None:
        """Check the generation and rename, as one step against a concurrent fence."""
        with self._locked(ns, exclusive=False) as base:
            self._check(ns, base, gen)
            os.rename(tmp, dest)
        fsync_path(dest.parent)

    def put_file(self, ns: str, name: str, path: Path, gen: int = 0) -> None:
        """Hard-link a sealed file in when it is on the same file system: no copy at all."""
        dest = self._target(ns, name)
        tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
        except OSError:
            data = Path(path).read_bytes()
            # (without gen= when 0: subclasses written before fencing override put(ns, name, data))
            self.put(ns, name, data, gen=gen) if gen else self.put(ns, name, data)
            return
        try:
            fsync_path(tmp)
            self._publish(ns, tmp, dest, gen)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise BackendError(f"backend put {ns}/{name} failed: {e.strerror}") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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

    def delete(self, ns: str, name: str, gen: int = 0) -> None:
        """Fenced when gen is below ns's fence; a missing object or namespace is no error."""
        path = self._obj(ns, name)
        if not self._ns(ns).is_dir():
            return
        try:
            with self._locked(ns, exclusive=False) as base:
                self._check(ns, base, gen)
                path.unlink()
        except (FileNotFoundError, NotFound):
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

