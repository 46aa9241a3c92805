"""Power cuts through the harness (tests/harness): nothing flushed is lost, nothing reads as garbage.

The engine's whole state directory (registry, write buffer, map, local backend) lives on the
power-cut filesystem; the engine runs in a subprocess (tests/engine/powercut_worker.py). A cut
drops everything not fsynced, SIGKILLs the engine, and a new engine opens on what survived.

What must hold after every cut, against a byte-array model:
- every write acknowledged before the last completed flush is there;
- every cluster reads as its value at the last completed flush or as a value written after it
  (an in-flight write counts as written): never garbage, never an error;
- snapshots taken before the last completed flush exist and read exactly; any other snapshot
  that survived reads exactly too (a snapshot is a point in time or nothing).
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from tests.engine.powercut_worker import payload
from tests.harness.control import PowerCutFS

ROOT = Path(__file__).resolve().parents[2]
CS = 4096
SIZE = 64 * CS          # 8 SCOs of 8 clusters: roll-overs, TLog seals and map commits all the time
# The local backend creates a namespace's sco/, tlog/ and checkpoint/ directories on first use and
# never fsyncs their names into the namespace directory: a cut loses every object in them
# (test_backend_objects_survive_a_power_cut_after_sync). The machine creates them durably up front
# so that it explores past that bug; set False once LocalStore makes new directories durable.
PRIME_BACKEND_DIRS = True


class Worker:
    """The engine process on the harness."""

    def __init__(self, state: Path, size: int = SIZE, **engine: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.engine.powercut_worker", str(state), str(size),
                                      json.dumps(engine)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        hello = self._line()
        if "ready" not in hello:
            raise AssertionError(f"engine did not open: {hello}")
        self.snapshots: list[str] = hello["snapshots"]

    def ready(self, timeout: float) -> bool:
        """Whether an answer is waiting (within timeout seconds)."""
        assert self.proc.stdout is not None
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"engine process exited {self.proc.returncode}:\n{err[-4000:]}")
        out: dict[str, Any] = json.loads(line)
        return out

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.answer(cmd["op"])

    def answer(self, op: str) -> dict[str, Any]:
        out = self._line()
        if "error" in out:
            raise AssertionError(f"{op} failed: {out['error']}")
        return out

    def read(self, snapshot: str | None = None) -> bytes:
        return base64.b64decode(self.call(op="read", snapshot=snapshot)["data"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


class Model:
    """What the volume may hold: the image at the last completed flush, and what came after."""

    def __init__(self, image: bytes) -> None:
        self.cur = bytearray(image)
        self.base = bytes(image)                    # at the last completed flush
        self.after: dict[int, list[bytes]] = {}     # cluster -> values written since
        self.snaps: dict[str, tuple[bytes, bool]] = {}   # name -> (image, taken before the last flush)
        self.tag = 0

    def write(self, writes: list[tuple[int, int, int]]) -> None:
        for off, n, tag in writes:
            self.cur[off:off + n] = payload(tag, n)
            for c in range(off // CS, (off + n - 1) // CS + 1):
                self.after.setdefault(c, []).append(bytes(self.cur[c * CS:(c + 1) * CS]))

    def flushed(self) -> None:
        self.base = bytes(self.cur)
        self.after.clear()
        self.snaps = {k: (img, True) for k, (img, _) in self.snaps.items()}

    def check(self, got: bytes, what: str) -> None:
        assert len(got) == len(self.base)
        for c in range(len(got) // CS):
            v = got[c * CS:(c + 1) * CS]
            if v != self.base[c * CS:(c + 1) * CS] and v not in self.after.get(c, []):
                flushed = self.base[c * CS:(c + 1) * CS]
                kind = "zeros" if v == bytes(CS) else "other data"
                raise AssertionError(f"{what}: cluster {c} (offset {c * CS}) reads as {kind}, neither its value at "
                                     f"the last flush ({'zeros' if flushed == bytes(CS) else 'data'}) "
                                     f"nor one of {len(self.after.get(c, []))} values written since")


def check_after_cut(worker: Worker, model: Model) -> None:
    got = worker.read()
    model.check(got, "after a power cut")
    survived = set(worker.snapshots)
    for name, (img, before_flush) in list(model.snaps.items()):
        if name not in survived:
            assert not before_flush, f"snapshot {name}, taken before the last completed flush, is gone"
            del model.snaps[name]
            continue
        assert worker.read(name) == img, f"snapshot {name} survived with other content"
    # What survived is now the durable state the next round starts from.
    model.cur = bytearray(got)
    model.flushed()


class PowerCut(RuleBasedStateMachine):
    base_dir: Path
    engine: dict[str, Any] = {}      # engine config overrides for the worker

    def __init__(self) -> None:
        super().__init__()
        self.fs: PowerCutFS | None = None
        self.worker: Worker | None = None
        self.cuts = 0
        self.stalled = False     # the backend is away (PowerCutBackendAway)

    @initialize()
    def start(self) -> None:
        d = PowerCut.base_dir / f"ex{time.monotonic_ns()}"
        d.mkdir()
        self.fs = PowerCutFS(d).start()
        self.state = self.fs.mnt / "var"
        self.state.mkdir()
        self.fs.sync()
        self.worker = Worker(self.state, **self.engine)
        # The volume's creation is not under test here (test_new_volume_survives_a_power_cut is).
        self.worker.call(op="flush")
        if PRIME_BACKEND_DIRS:
            for ns in (self.state / "backend").iterdir():
                for sub in ("sco", "tlog", "checkpoint"):
                    (ns / sub).mkdir(exist_ok=True)
        self.fs.sync()
        self.model = Model(bytes(SIZE))

    def w(self) -> Worker:
        assert self.worker is not None
        return self.worker

    def _writes(self, data: st.DataObject) -> list[tuple[int, int, int]]:
        out = []
        for _ in range(data.draw(st.integers(1, 3), label="batch")):
            off = data.draw(st.integers(0, SIZE - 1), label="offset")
            n = data.draw(st.integers(1, min(3 * CS, SIZE - off)), label="length")
            self.model.tag += 1
            out.append((off, n, self.model.tag))
        return out

    def _write(self, writes: list[tuple[int, int, int]]) -> None:
        w = self.w()
        w.send(op="write", writes=writes)
        if self.stalled and not w.ready(3.0):
            # Waiting for write-buffer room while the backend is away is right; it comes back.
            assert self.fs is not None
            self.fs.stall(None)
            self.stalled = False
        w.answer("write")
        self.model.write(writes)

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        self._write(self._writes(data))

    @rule(data=st.data())
    def write_aligned(self, data: st.DataObject) -> None:
        c = data.draw(st.integers(0, SIZE // CS - 4), label="cluster")
        n = data.draw(st.integers(1, 4), label="clusters")
        self.model.tag += 1
        self._write([(c * CS, n * CS, self.model.tag)])

    @rule(data=st.data())
    def burst(self, data: st.DataObject) -> None:
        """Many clusters in one batch: SCO and TLog roll-overs inside one write."""
        c = data.draw(st.integers(0, SIZE // CS - 24), label="cluster")
        self.model.tag += 1
        self._write([(c * CS, 24 * CS, self.model.tag)])

    @rule(ms=st.sampled_from([50, 250]))
    def pause(self, ms: int) -> None:
        """Let background work (uploads, periodic map commits) happen between writes."""
        time.sleep(ms / 1000)

    @rule()
    def flush(self) -> None:
        self.w().call(op="flush")
        self.model.flushed()

    @precondition(lambda self: len(self.model.snaps) < 3)
    @rule()
    def snapshot(self) -> None:
        name = f"s{self.model.tag}-{len(self.model.snaps)}"
        if name in self.model.snaps:
            return
        self.w().call(op="snapshot", name=name)
        self.model.snaps[name] = (bytes(self.model.cur), False)

    @precondition(lambda self: not self.stalled)
    @rule()
    def scrub(self) -> None:
        self.w().call(op="scrub")

    @rule(data=st.data(), during=st.sampled_from(["idle", "write", "flush"]), delay_ms=st.integers(0, 5))
    def power_cut(self, data: st.DataObject, during: str, delay_ms: int) -> None:
        """Pull the plug: between operations, or while a write batch or a flush is in flight."""
        assert self.fs is not None
        if during == "write":
            writes = self._writes(data)
            self.w().send(op="write", writes=writes)
            self.model.write(writes)        # in flight: may or may not have landed
        elif during == "flush":
            self.w().send(op="flush")       # not completed: the model's last flush stays where it was
        time.sleep(delay_ms / 1000)
        self.fs.power_cut(kill=[self.w().proc.pid])
        self.w().stop()
        self.cuts += 1
        self.stalled = False     # the backend is back after the restart
        self.fs.start()
        self.worker = Worker(self.state, **self.engine)
        check_after_cut(self.worker, self.model)

    def teardown(self) -> None:
        try:
            if self.fs is not None and self.worker is not None and self.cuts == 0:
                # Every example ends with at least one cut, at its very end.
                self.fs.power_cut(kill=[self.worker.proc.pid])
                self.worker.stop()
                self.fs.start()
                self.worker = Worker(self.state, **self.engine)
                check_after_cut(self.worker, self.model)
        finally:
            if self.worker is not None:
                self.worker.stop()
            if self.fs is not None:
                self.fs.kill()


@pytest.fixture
def powercut_dir(tmp_path: Path) -> Iterator[Path]:
    PowerCut.base_dir = tmp_path
    yield tmp_path


class PowerCutBackendAway(PowerCut):
    """The same, and the backend may go away (uploads hang) and come back at any point; the map
    is also committed every 0.2 s by the engine's commit thread, not only at TLog seals."""

    engine = {"checkpoint_seconds": 0.2}

    @rule()
    def backend_away(self) -> None:
        assert self.fs is not None
        self.fs.stall("var/backend")
        self.stalled = True

    @precondition(lambda self: self.stalled)
    @rule()
    def backend_back(self) -> None:
        assert self.fs is not None
        self.fs.stall(None)
        self.stalled = False


def _settings() -> settings:
    return settings(max_examples=int(os.environ.get("POWERCUT_EXAMPLES", "8")), stateful_step_count=12,
                    deadline=None, database=None, suppress_health_check=list(HealthCheck),
                    # Shrinking re-runs whole power-cut programs for minutes; a failing program of
                    # at most 12 steps is short enough to read.
                    phases=[Phase.explicit, Phase.generate])


def test_power_cut_state_machine_backend_away(powercut_dir: Path) -> None:
    PowerCutBackendAway.TestCase.settings = _settings()
    PowerCutBackendAway.TestCase().runTest()


def test_power_cut_state_machine(powercut_dir: Path) -> None:
    PowerCut.TestCase.settings = _settings()
    PowerCut.TestCase().runTest()


# ---- fixed scenarios: each one lost data on the engine as found ---------------------------------

def _cut_and_reopen(fs: PowerCutFS, worker: Worker, state: Path, **engine: Any) -> Worker:
    fs.power_cut(kill=[worker.proc.pid])
    worker.stop()
    fs.start()
    return Worker(state, **engine)


def _prime_backend(state: Path) -> None:
    for ns in (state / "backend").iterdir():
        for sub in ("sco", "tlog", "checkpoint"):
            (ns / sub).mkdir(exist_ok=True)


@pytest.fixture
def on_harness(tmp_path: Path) -> Iterator[tuple[PowerCutFS, Path]]:
    with PowerCutFS(tmp_path) as fs:
        state = fs.mnt / "var"
        state.mkdir()
        fs.sync()                                  # the state directory itself exists durably
        yield fs, state


def _cluster(data: bytes, c: int) -> bytes:
    return data[c * CS:(c + 1) * CS]


def test_backend_objects_survive_a_power_cut_after_sync(on_harness: tuple[PowerCutFS, Path]) -> None:
    """vol.sync() says "all of it on the backend": what was uploaded must survive a cut there.

    (Before the durable-order fixes the map then pointed into the backend only and the read was a
    DataError; with local SCOs kept durable the read survives, but the backend still loses
    everything: any SCO evicted locally would be gone.)
    """
    fs, state = on_harness
    w = Worker(state)
    try:
        w.call(op="flush")
        fs.sync()                                  # the volume exists durably; nothing else
        w.call(op="write", writes=[[0, CS, 1]])
        w.call(op="sync")                          # uploaded; the local SCO may be evicted
        w.call(op="write", writes=[[CS, CS, 2]])
        w.call(op="sync")
        backend = state / "backend"

        def objects() -> set[str]:
            return {str(p.relative_to(backend)) for p in backend.rglob("*") if p.is_file() and
                    not p.name.startswith(".")}
        uploaded = objects()
        w = _cut_and_reopen(fs, w, state)
        got = w.read()                             # was: DataError, sco/...02 does not exist
        assert _cluster(got, 0) == payload(1, CS) and _cluster(got, 1) == payload(2, CS)
        assert uploaded <= objects(), f"lost on the backend: {sorted(uploaded - objects())}"
    finally:
        w.stop()


def test_new_volume_survives_a_power_cut(on_harness: tuple[PowerCutFS, Path]) -> None:
    """Create a volume, write, flush: after a cut the volume and the flushed write are there."""
    fs, state = on_harness
    w = Worker(state)
    try:
        w.call(op="write", writes=[[0, CS, 7]])
        w.call(op="flush")
        w = _cut_and_reopen(fs, w, state)
        assert _cluster(w.read(), 0) == payload(7, CS)
    finally:
        w.stop()


def test_flushed_then_overwritten_cluster_survives_a_power_cut(on_harness: tuple[PowerCutFS, Path]) -> None:
    """Issue 9 case 3: a map commit made durable before the SCO/TLog data it points to.

    Cluster 0 is flushed, then overwritten; more writes seal TLogs, which commits the map,
    while the backend is away (uploads hang), so the only copy of the new data is the local,
    never fsynced SCO. After the cut cluster 0 must read as the old or the new data.
    """
    fs, state = on_harness
    w = Worker(state)
    try:
        w.call(op="flush")
        _prime_backend(state)
        fs.sync()
        w.call(op="write", writes=[[0, CS, 1]])
        w.call(op="flush")
        fs.stall("var/backend")
        w.call(op="write", writes=[[0, CS, 2]])
        for i in range(6):                         # 6 x 8 clusters: 3 TLogs sealed, map committed
            w.call(op="write", writes=[[(8 + 8 * i) * CS, 8 * CS, 100 + i]])
        time.sleep(1.2)                            # past the 1 s commit interval of a TLog seal
        w.call(op="write", writes=[[56 * CS, 8 * CS, 200]])
        w = _cut_and_reopen(fs, w, state)
        assert _cluster(w.read(), 0) in (payload(1, CS), payload(2, CS))
    finally:
        w.stop()


def test_periodic_map_commit_then_power_cut_reads_old_or_new(on_harness: tuple[PowerCutFS, Path]) -> None:
    """No flush at all: after a cut each cluster reads as zeros or as what was written, never an error."""
    fs, state = on_harness
    w = Worker(state, checkpoint_seconds=0.2)
    try:
        w.call(op="flush")
        _prime_backend(state)
        fs.sync()
        w.call(op="write", writes=[[0, 2 * CS, 1]])
        time.sleep(0.6)                            # the commit thread commits every 0.2 s here
        w = _cut_and_reopen(fs, w, state, checkpoint_seconds=0.2)
        got = w.read()                             # was: DataError, SCO 1 missing from the backend
        for c in (0, 1):
            assert _cluster(got, c) in (bytes(CS), payload(1, 2 * CS)[c * CS:(c + 1) * CS])
    finally:
        w.stop()
