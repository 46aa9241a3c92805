"""The engine against a plain byte-array model (hypothesis stateful testing).

Every rule runs against the real engine (real files, SQLite map, local backend);
the model is a bytearray per volume and a copy per snapshot. Restarts, crashes and
a rebuild from the backend alone must all keep the engine equal to the model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ovsfs.engine import trim as trim_module
from ovsfs.engine.engine import Engine
from ovsfs.errors import Busy

from .helpers import crash, small_config

CS = 4096
PAGE = 4096 * CS                  # one map page covers 16 MiB
SIZE = PAGE + 64 * CS              # two map pages, so copy-on-write crosses pages
REGIONS = [0, PAGE - 32 * CS]      # writes cluster around the start and the page boundary


@st.composite
def extents(draw: st.DrawFn, max_len: int = 5 * CS) -> tuple[int, int]:
    base = draw(st.sampled_from(REGIONS))
    off = base + draw(st.integers(0, 64 * CS))
    length = draw(st.integers(1, max_len))
    return off, min(length, SIZE - off)


class EngineModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ovsfs-model-"))
        self.cfg = small_config(self.dir)
        self.engine = Engine(self.cfg)
        self.engine.open()
        self.engine.create_vpool("default")
        self.engine.create_volume("v", SIZE)
        self.model: dict[str, bytearray] = {"v": bytearray(SIZE)}
        self.snaps: dict[str, dict[str, bytes]] = {"v": {}}
        self.clones = 0
        self.counter = 0
        self.backups: dict[str, bytes] = {}   # namespace -> a map.db copied after a clean stop
        # One map page per hold of the lock, so trims cross chunk boundaries here.
        self.chunk_pages = trim_module.CHUNK_PAGES
        trim_module.CHUNK_PAGES = 1

    def teardown(self) -> None:
        trim_module.CHUNK_PAGES = self.chunk_pages
        try:
            self.engine.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _reopen(self) -> None:
        self.engine = Engine(self.cfg)
        self.engine.open()

    vols = st.sampled_from(["v", "c1", "c2", "c3"])

    def _vol(self, name: str) -> str:
        return name if name in self.model else "v"

    @rule(name=vols, ext=extents(), fill=st.integers(0, 255))
    def write(self, name: str, ext: tuple[int, int], fill: int) -> None:
        name = self._vol(name)
        off, n = ext
        data = bytes([fill]) * n if fill % 3 else bytes((fill + i) % 256 for i in range(n))
        self.engine.volume(name).write(off, data)
        self.model[name][off:off + n] = data

    @rule(name=vols, exts=st.lists(extents(2 * CS), min_size=1, max_size=6), fill=st.integers(1, 255))
    def writev(self, name: str, exts: list[tuple[int, int]], fill: int) -> None:
        name = self._vol(name)
        reqs = [(off, bytes([(fill + i) % 256]) * n) for i, (off, n) in enumerate(exts)]
        self.engine.volume(name).writev(reqs)
        for off, data in reqs:
            self.model[name][off:off + len(data)] = data

    @rule(name=vols, ext=extents(8 * CS), zeroes=st.booleans())
    def trim(self, name: str, ext: tuple[int, int], zeroes: bool) -> None:
        name = self._vol(name)
        off, n = ext
        vol = self.engine.volume(name)
        (vol.write_zeroes if zeroes else vol.trim)(off, n)
        self.model[name][off:off + n] = bytes(n)

    @rule(name=vols, start=st.sampled_from([0, CS, 7 * CS + 5, PAGE - 3 * CS, PAGE + CS]),
          whole=st.booleans(), zeroes=st.booleans())
    def trim_big(self, name: str, start: int, whole: bool, zeroes: bool) -> None:
        """Trims across both map pages (and so across trim chunks), to the end or not."""
        name = self._vol(name)
        n = SIZE - start if whole else (SIZE - start) // 2
        vol = self.engine.volume(name)
        (vol.write_zeroes if zeroes else vol.trim)(start, n)
        self.model[name][start:start + n] = bytes(n)

    @rule(name=vols, ext=extents(8 * CS))
    def read(self, name: str, ext: tuple[int, int]) -> None:
        name = self._vol(name)
        off, n = ext
        assert self.engine.volume(name).read(off, n) == bytes(self.model[name][off:off + n])

    @rule(name=vols)
    def flush(self, name: str) -> None:
        self.engine.volume(self._vol(name)).flush()

    @rule(name=vols)
    def snapshot(self, name: str) -> None:
        name = self._vol(name)
        self.counter += 1
        snap = f"s{self.counter}"
        self.engine.volume(name).create_snapshot(snap)
        self.snaps[name][snap] = bytes(self.model[name])

    @rule(name=vols, data=st.data())
    def delete_snapshot(self, name: str, data: st.DataObject) -> None:
        name = self._vol(name)
        if not self.snaps[name]:
            return
        snap = data.draw(st.sampled_from(sorted(self.snaps[name])))
        try:
            self.engine.volume(name).delete_snapshot(snap)
        except Busy:
            return  # a clone reads from it
        del self.snaps[name][snap]

    @rule(name=vols, data=st.data())
    def rollback(self, name: str, data: st.DataObject) -> None:
        name = self._vol(name)
        if not self.snaps[name]:
            return
        snap = data.draw(st.sampled_from(sorted(self.snaps[name])))
        try:
            self.engine.volume(name).rollback(snap)
        except Busy:
            return
        self.model[name][:] = self.snaps[name][snap]
        order = list(self.snaps[name])
        for later in order[order.index(snap) + 1:]:
            del self.snaps[name][later]

    @precondition(lambda self: self.clones < 3)
    @rule(name=vols, data=st.data())
    def clone(self, name: str, data: st.DataObject) -> None:
        name = self._vol(name)
        if not self.snaps[name]:
            return
        snap = data.draw(st.sampled_from(sorted(self.snaps[name])))
        self.clones += 1
        new = f"c{self.clones}"
        self.engine.clone_volume(name, snap, new)
        self.model[new] = bytearray(self.snaps[name][snap])
        self.snaps[new] = {}

    @rule(name=vols, data=st.data())
    def read_snapshot(self, name: str, data: st.DataObject) -> None:
        name = self._vol(name)
        if not self.snaps[name]:
            return
        snap = data.draw(st.sampled_from(sorted(self.snaps[name])))
        off, n = data.draw(extents(8 * CS))
        assert self.engine.volume(name).read(off, n, snapshot=snap) == self.snaps[name][snap][off:off + n]

    @rule()
    def scrub(self) -> None:
        self.engine.scrub()

    @rule()
    def restart(self) -> None:
        self.engine.close()
        self._reopen()

    @rule(flushed=st.booleans())
    def crash_and_recover(self, flushed: bool) -> None:
        if flushed:
            for name in self.model:
                self.engine.volume(name).flush()
        crash(self.engine)
        self._reopen()

    def _map_paths(self) -> dict[str, Path]:
        return {v.ns: v.dir / "map.db" for v in self.engine.volumes.values()}

    @rule(how=st.sampled_from(["delete", "garbage", "truncate"]), clean=st.booleans())
    def lose_map(self, how: str, clean: bool) -> None:
        """map.db is a cache: lost or corrupt, the map comes back from backend + write buffer."""
        paths = self._map_paths()
        if clean:
            self.engine.close()
        else:
            crash(self.engine)
        for db in paths.values():
            if how == "delete":
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{db}{suffix}").unlink(missing_ok=True)
            elif how == "garbage":
                db.write_bytes(b"\xa5" * 8192)
            else:
                with open(db, "r+b") as f:
                    f.truncate(db.stat().st_size // 2)
        self._reopen()

    @rule()
    def backup_maps(self) -> None:
        paths = self._map_paths()
        self.engine.close()
        self.backups = {ns: p.read_bytes() for ns, p in paths.items()}
        self._reopen()

    @precondition(lambda self: bool(self.backups))
    @rule(clean=st.booleans())
    def restore_old_maps(self, clean: bool) -> None:
        """A map.db older than the TLogs (restored from a backup) is brought forward."""
        paths = self._map_paths()
        if clean:
            self.engine.close()
        else:
            crash(self.engine)
        for ns, data in self.backups.items():
            db = paths[ns]
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            db.write_bytes(data)
        self._reopen()

    @rule()
    def rebuild_from_backend(self) -> None:
        """Lose every bit of local metadata and the write buffer; only the backend is left."""
        for name in self.model:
            self.engine.volume(name).sync()
        self.engine.close()
        shutil.rmtree(self.cfg.path(self.cfg.engine.write_buffer))
        shutil.rmtree(self.cfg.state_dir / "cluster")
        self._reopen()

    @invariant()
    def sizes_and_full_compare_sometimes(self) -> None:
        for name, model in self.model.items():
            assert self.engine.volume(name).size == len(model)

    def check_all(self) -> None:
        for name, model in self.model.items():
            vol = self.engine.volume(name)
            for base in REGIONS:
                assert vol.read(base, 96 * CS) == bytes(model[base:base + 96 * CS])


EngineModel.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class FullCheckModel(EngineModel):
    @invariant()
    def everything_matches(self) -> None:
        self.check_all()


TestEngineModel = FullCheckModel.TestCase
