"""Acknowledged-write bookkeeping for the lost-node tests: a writer that records what NBD
acknowledged, and the checks of what a volume must hold afterwards.

`AckedWriter` writes 4 KiB blocks at random block numbers through one NBD connection
(tests/nbd_pipe.Client) with `depth` requests in flight, in a thread, until stopped or until
the server goes away (its node killed). Every write carries content unique to (tag, block,
version), and two writes to the same block are never in flight together: so the version a
block reads back names exactly one write, and "which versions may this block hold" has a
precise answer (see `allowed`). With `flush_every`, an NBD FLUSH follows every that many
writes; `durable` counts the writes acknowledged before the last completed FLUSH was sent.
"""

from __future__ import annotations

import random
import selectors
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ovsfs.nbd import protocol as P
from tests.nbd_pipe import Client

BS = 4096
STAMP = struct.Struct("<QQQQ")          # magic, tag, block, version: repeated over the block
MAGIC = 0x0A5F5_7E57


def block_data(tag: int, block: int, version: int) -> bytes:
    return STAMP.pack(MAGIC, tag, block, version) * (BS // STAMP.size)


@dataclass
class Write:
    seq: int                # index in send order
    block: int
    data: bytes


@dataclass
class AckedWriter:
    socket: Path
    export: str
    blocks: int                         # writes land in blocks [0, blocks)
    tag: int                            # makes this writer's contents unique
    depth: int = 16
    flush_every: int = 0
    seed: int = 0
    writes: list[Write] = field(default_factory=list)       # in send order
    acked: list[int] = field(default_factory=list)          # write seqs, in acknowledgement order
    errors: dict[int, int] = field(default_factory=dict)    # write seq -> NBD error
    durable: int = 0        # acked[:durable] were acknowledged before a FLUSH that completed
    flushes: int = 0        # FLUSHes that completed
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"writer-{self.tag}", daemon=True)
        self._versions: dict[int, int] = {}      # block -> last version sent
        self._seq_of: dict[int, int] = {}        # cookie -> write seq, while in flight

    def start(self) -> "AckedWriter":
        self._client = Client(self.socket, self.export)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop sending; wait for the replies of what is in flight (or for the server to go)."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the writer did not stop"
        self._client.close()
        if self.failure is not None:
            raise self.failure

    def wait_acked(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} of {n} writes acknowledged"
            assert self._thread.is_alive(), f"the writer stopped: {self.failure!r}, eof={self._client.eof}"
            time.sleep(0.01)

    @property
    def gone(self) -> bool:
        """The server closed the connection."""
        return self._client.eof

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:   # reported by stop()
            self.failure = e

    def _loop(self) -> None:
        c, rnd = self._client, random.Random(self.seed)
        c.s.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(c.s, selectors.EVENT_READ)
        inflight: dict[int, int] = {}       # cookie -> block (-1: a FLUSH)
        flush_at: dict[int, int] = {}       # flush cookie -> len(acked) when it was sent
        busy: set[int] = set()              # blocks with a write in flight
        cookie, since_flush, seen = 0, 0, 0
        try:
            while not c.eof:
                stopping = self._stop.is_set()
                if stopping and not inflight:
                    break
                while not stopping and len(inflight) < self.depth:
                    cookie += 1
                    if self.flush_every and since_flush >= self.flush_every:
                        # One FLUSH at a time; writes wait for it (it says what is durable).
                        if -1 not in inflight.values():
                            c.queue_flush(cookie)
                            inflight[cookie], flush_at[cookie] = -1, len(self.acked)
                            since_flush = 0
                        break
                    block = rnd.randrange(self.blocks)
                    while block in busy:
                        block = rnd.randrange(self.blocks)
                    version = self._versions.get(block, 0) + 1
                    self._versions[block] = version
                    w = Write(len(self.writes), block, block_data(self.tag, block, version))
                    self.writes.append(w)
                    c.queue_write(cookie, block * BS, w.data)
                    inflight[cookie] = block
                    self._seq_of[cookie] = w.seq
                    busy.add(block)
                    since_flush += 1
                c.pump(bool(sel.select(0.02)))
                for ck in c.order[seen:]:
                    block = inflight.pop(ck)
                    err = c.acked[ck]
                    if block == -1:
                        if err == 0:
                            self.durable = max(self.durable, flush_at.pop(ck))
                            self.flushes += 1
                        continue
                    busy.discard(block)
                    seq = self._seq_of.pop(ck)
                    if err:
                        self.errors[seq] = err
                    else:
                        self.acked.append(seq)
                seen = len(c.order)
        finally:
            sel.close()


def read_blocks(socket: Path, export: str, blocks: int) -> list[bytes]:
    """Blocks [0, blocks) of the export, read in 256 KiB requests."""
    c = Client(socket, export)
    out: list[bytes] = []
    try:
        step = 64
        for first in range(0, blocks, step):
            n = min(step, blocks - first)
            err, data = c.call(P.CMD_READ, first * BS, n * BS)
            assert err == 0, f"read of blocks {first}..{first + n} failed: NBD error {err}"
            out += [data[i * BS:(i + 1) * BS] for i in range(n)]
    finally:
        c.close()
    return out


def allowed(w: AckedWriter, before: list[bytes]) -> dict[int, set[bytes]]:
    """Per block written: the contents it may hold when every acknowledged write must survive.

    The last acknowledged version, or a version sent after it (in flight when the node died:
    it may or may not have been applied); with no acknowledged version, what the block held
    before, or an in-flight version."""
    acked = set(w.acked)
    per: dict[int, list[Write]] = {}
    for x in w.writes:
        per.setdefault(x.block, []).append(x)
    out: dict[int, set[bytes]] = {}
    for block, ws in per.items():
        last = max((i for i, x in enumerate(ws) if x.seq in acked), default=-1)
        ok = {x.data for x in ws[last + 1:]}
        ok.add(ws[last].data if last >= 0 else before[block])
        out[block] = ok
    return out


def check_all_acked(w: AckedWriter, before: list[bytes], after: list[bytes]) -> list[str]:
    """Problems (empty: none): blocks that lost an acknowledged write, or changed unwritten."""
    bad = []
    ok = allowed(w, before)
    for block, (b, a) in enumerate(zip(before, after)):
        if a not in ok.get(block, {b}):
            bad.append(f"block {block}: holds {describe(a)}, may hold {sorted(describe(x) for x in ok.get(block, {b}))}")
    return bad


def describe(data: bytes) -> str:
    if data == bytes(len(data)):
        return "zeros"
    magic, tag, block, version = STAMP.unpack_from(data)
    if magic != MAGIC or data != STAMP.pack(magic, tag, block, version) * (BS // STAMP.size):
        return "garbage"
    return f"t{tag}/b{block}/v{version}"


def visible_prefix(w: AckedWriter, before: list[bytes], after: list[bytes]) -> tuple[int, list[str]]:
    """For a writer at depth 1 (send order = log order): (K, problems) where the volume holds
    exactly writes[:K] applied in order on top of `before` (problems lists the blocks that
    break that: not a prefix)."""
    index = {x.data: x.seq for x in w.writes}
    k = 1 + max((index.get(a, -1) for a in after), default=-1)
    want = list(before)
    for x in w.writes[:k]:
        want[x.block] = x.data
    bad = [f"block {i}: holds {describe(a)}, the prefix of {k} writes says {describe(e)}"
           for i, (a, e) in enumerate(zip(after, want)) if a != e]
    return k, bad
