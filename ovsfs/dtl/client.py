"""The DTL client of one volume: ships the owner's log batches to a peer (CONTRACT11.md 2).

The engine calls append() with the volume lock held, so append never touches the network: it
queues, and one sender thread ships what is queued in position order. Sync mode ships at
once whatever is queued (group commit: while one batch is on the wire the next gathers, so
32 writers in flight cost about one round trip per batch); async mode ships when the queue
reaches a batch size or its oldest entry is dtl.queue_age old, and throttles writers when
dtl.queue_bytes are queued.

Acknowledgement points: sync: the write is acknowledged once the peer has written it into its
file (the peer's page cache: a peer process crash loses nothing, a peer power loss loses what
it had not fsynced); async: at once (local only until shipped, at most dtl.queue_bytes);
both: FLUSH returns once the peer has fsynced everything appended before it.

Failures: a peer that does not answer within dtl.timeout, refuses, or breaks the connection
makes the client *degraded*: one event is logged, waiters are released (their writes are
acknowledged with the local copy only and counted in unsafe_bytes), and every
dtl.retry_seconds the client asks choose_peer for a peer, says hello, and catches it up in
full from the trim point (the engine's tail() reader, then the entries appended meanwhile):
state "catching up", then "ok". A *Fenced* reply is never a failure of the peer: the client
goes into state "fenced" and every later append / wait / flush raises Fenced.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator

from ovsfs.config import Config, DtlSection
from ovsfs.dtl import Peer, Pos
from ovsfs.dtl import wire
from ovsfs.errors import DtlError, Fenced, InvalidArgument

log = logging.getLogger("ovsfs.dtl")

Entry = tuple[Pos, bytes]


class Connection:
    """One blocking connection to a DTL server; requests one at a time. Every failure is
    DtlError (timeout, refused, reset, server error), except Fenced."""

    def __init__(self, peer: Peer, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.peer = peer
        self.rid = 0
        try:
            sock = socket.create_connection((peer.host, peer.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock)
        except OSError as e:   # ssl.SSLError is an OSError
            raise DtlError(f"dtl peer {peer}: {e}") from None
        self.sock = sock

    def call(self, op: int, volume: str, gen: int, payload: bytes = b"") -> bytes:
        self.rid += 1
        try:
            self.sock.sendall(wire.encode_frame(op, self.rid, volume, gen, payload))
            head = self._recv(wire.HEADER_SIZE)
            rop, status, vlen, rid, _gen, plen = wire.decode_header(head)
            self._recv(vlen)
            body = self._recv(plen) if plen else b""
        except (OSError, wire.Malformed) as e:
            raise DtlError(f"dtl peer {self.peer}: {wire.OPS[op]}: "
                           f"{e or type(e).__name__}") from None
        if rop != op | wire.REPLY or rid != self.rid:
            raise DtlError(f"dtl peer {self.peer}: reply {rop}/{rid} to request {op}/{self.rid}")
        if status == wire.FENCED:
            raise Fenced(body.decode(errors="replace"))
        if status != wire.OK:
            raise DtlError(f"dtl peer {self.peer} refused {wire.OPS[op]}: "
                           f"{body.decode(errors='replace')}")
        return body

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ConnectionResetError("connection closed by the peer")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def tls_from_config(cfg: Config) -> ssl.SSLContext | None:
    """The client TLS context for dtl.tls = required (None when off). ConfigError."""
    d = cfg.dtl
    if d.tls != "required":
        return None
    return wire.client_ssl_context(cfg.path(d.tls_cert), cfg.path(d.tls_key), cfg.path(d.tls_ca))


def _next(pos: Pos) -> Pos:
    return (pos[0], pos[1] + 1)


def fetch_tail(peer: Peer, volume: str, gen: int, tls: ssl.SSLContext | None = None,
               timeout: float = 30.0, incarnation: str | None = None) -> list[Entry]:
    """Every entry the peer holds for volume, in position order; raises the peer's gen_seen to
    gen, so the previous owner is fenced there. Fenced when gen is older than the peer has
    seen; DtlError when the peer cannot be reached or a record is damaged, and when it is not
    the `incarnation` the owner last caught up (it restarted since: its copy may lack part of
    the tail)."""
    conn = Connection(peer, timeout, tls)
    out: list[Entry] = []
    try:
        if incarnation is not None:
            info = wire.decode_json(conn.call(wire.HELLO, volume, gen))
            if str(info.get("incarnation")) != incarnation:
                raise DtlError(f"dtl peer {peer} restarted since the owner last caught it up "
                               f"(incarnation {info.get('incarnation')}, was {incarnation}): "
                               "its copy of the tail may be incomplete")
        start: Pos = (0, 0)
        while True:
            try:
                batch = wire.decode_entries(conn.call(wire.FETCH, volume, gen,
                                                      wire.encode_pos(start)))
            except wire.Malformed as e:
                raise DtlError(f"dtl peer {peer}: fetch {volume}: {e}") from None
            if not batch:
                return out
            out.extend(batch)
            start = _next(batch[-1][0])
    finally:
        conn.close()


class DtlClient:
    """One volume's DTL client (DtlSink). `choose_peer(exclude: set[str]) -> Peer | None`
    (node names to avoid); `tail(from_pos)` yields the local log's (pos, blob) from from_pos
    on, in order; `on_change(status)` is called from the sender thread when peer or state
    changes. `tls`: a client context (wire.client_ssl_context) when dtl.tls = required."""

    def __init__(self, volume: str, gen: int, mode: str, cfg: DtlSection,
                 choose_peer: Callable[[set[str]], Peer | None],
                 tail: Callable[[Pos], Iterable[Entry]],
                 on_change: Callable[[dict], None], tls: ssl.SSLContext | None = None) -> None:
        if mode not in ("async", "sync"):
            raise InvalidArgument(f"DtlClient mode must be async or sync, not {mode!r}")
        self.volume, self.gen, self.mode, self.cfg = volume, gen, mode, cfg
        self._choose_peer, self._tail, self._on_change, self._tls = choose_peer, tail, on_change, tls
        self._cv = threading.Condition()
        self._queue: deque[tuple[int, Pos, bytes]] = deque()   # (ticket, pos, blob)
        self._queued_bytes = 0        # queued + in flight, not yet at the peer
        self._inflight: list[tuple[int, Pos, bytes]] = []
        self._oldest = 0.0            # monotonic time the oldest queued entry was appended
        self._seq = 0                 # last ticket handed out
        self._acked = 0               # tickets <= this are at the peer
        self._shipped: Pos | None = None   # newest position the current peer has
        self._state = "catching up"
        self._peer: Peer | None = None
        self._conn: Connection | None = None
        self._incarnation: str | None = None
        self._seen_incarnations: dict[tuple[str, int], str] = {}
        self._unsafe: deque[tuple[Pos, int]] = deque()   # acknowledged, only local
        self._unsafe_bytes = 0
        self._overflow = False        # catching up: entries were not queued (re-read the tail)
        self._trim_pos: Pos = (0, 0)
        self._trim_sent: Pos = (0, 0)
        self._flush_want = 0          # ticket a flush waits for
        self._flush_done = 0
        self._failed: Peer | None = None
        self._fenced: str | None = None
        self._closed = False
        self._batch = max(4096, min(cfg.queue_bytes // 4, wire.MAX_BATCH_BYTES))
        self._thread = threading.Thread(target=self._run, name=f"dtl-{volume}", daemon=True)
        self._thread.start()

    # ---- the engine's side -----------------------------------------------------------------

    def append(self, pos: Pos, blob: bytes) -> int:
        n = len(blob)
        with self._cv:
            self._check_fenced()
            if self.mode == "async":
                # Throttle: a full queue makes writers wait until batches are shipped (or the
                # DTL degrades, which empties the queue); it never grows past queue_bytes.
                while (self._state == "ok" and self._queued_bytes > 0
                       and self._queued_bytes + n > self.cfg.queue_bytes and not self._fenced
                       and not self._closed):
                    self._cv.wait()
                self._check_fenced()
            self._seq += 1
            t = self._seq
            if self._closed or self._state in ("degraded", "standalone"):
                self._add_unsafe(pos, n)
            elif self._state == "catching up" and (
                    self._overflow or self._queued_bytes + n > self.cfg.queue_bytes):
                # The peer is still being caught up and the queue is full: these entries are
                # in the local log, the catch-up reads them from there in another pass.
                self._overflow = True
                for _t, p, b in self._queue:
                    self._add_unsafe(p, len(b))
                self._queue.clear()
                self._queued_bytes = 0
                self._add_unsafe(pos, n)
            else:
                if not self._queue:
                    self._oldest = time.monotonic()
                self._queue.append((t, pos, blob))
                self._queued_bytes += n
                self._cv.notify_all()
            return t

    def wait(self, ticket: object) -> None:
        t = int(ticket)  # type: ignore[call-overload]
        with self._cv:
            while True:
                self._check_fenced()
                # async: acknowledged with the local copy (shipped later, flush waits for it).
                if (self.mode == "async" or t <= self._acked or self._state != "ok"
                        or self._closed):
                    return
                self._cv.wait()

    def flush(self) -> None:
        with self._cv:
            self._check_fenced()
            if self._state != "ok":
                return
            target = self._seq
            self._flush_want = max(self._flush_want, target)
            self._cv.notify_all()
            while self._flush_done < target and self._state == "ok" and not self._closed:
                self._check_fenced()
                self._cv.wait()
            self._check_fenced()

    def trim(self, pos: Pos) -> None:
        with self._cv:
            if pos <= self._trim_pos:
                return
            self._trim_pos = pos
            while self._unsafe and self._unsafe[0][0] < pos:
                self._unsafe_bytes -= self._unsafe.popleft()[1]
            self._cv.notify_all()

    def status(self) -> dict:
        with self._cv:
            queued = self._queued_bytes
            unsafe = self._unsafe_bytes
            if self.mode == "async" or self._state != "ok":
                unsafe += queued
            return {"mode": self.mode, "volume": self.volume, "gen": self.gen,
                    "peer": self._peer.node if self._peer else None,
                    "peer_address": f"{self._peer.host}:{self._peer.port}" if self._peer else None,
                    "state": self._state, "unsafe_bytes": unsafe, "queued_bytes": queued,
                    "peer_incarnation": self._incarnation}

    def close(self, drop: bool = False) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=2 * self.cfg.timeout + 1)
        conn, self._conn = self._conn, None
        if conn is not None:
            if drop and not self._fenced:
                try:
                    conn.call(wire.DROP, self.volume, self.gen)
                except (DtlError, Fenced) as e:
                    log.warning("dtl %s: drop at %s failed: %s", self.volume, conn.peer, e)
            conn.close()

    # ---- helpers (lock held) ---------------------------------------------------------------

    def _check_fenced(self) -> None:
        if self._fenced is not None:
            raise Fenced(self._fenced)

    def _add_unsafe(self, pos: Pos, n: int) -> None:
        if pos >= self._trim_pos:
            self._unsafe.append((pos, n))
            self._unsafe_bytes += n

    # ---- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        retry_at = 0.0
        while True:
            with self._cv:
                if self._closed:
                    return
                if self._fenced is not None:
                    self._cv.wait()
                    continue
                connected = self._conn is not None
                if not connected and time.monotonic() < retry_at:
                    self._cv.wait(retry_at - time.monotonic())
                    continue
            try:
                if not connected:
                    if not self._connect():
                        retry_at = time.monotonic() + self.cfg.retry_seconds
                    continue
                self._work()
            except Fenced as e:
                self._fence(str(e))
            except DtlError as e:
                self._degrade(str(e))
                # A peer lost while in sync: look for another at once; a failed connect or
                # catch-up: again in retry_seconds.
                retry_at = time.monotonic() + (self.cfg.retry_seconds if not connected else 0)
            except Exception as e:   # the engine's tail reader, or a bug: never kill the sender
                log.exception("dtl %s: sender error", self.volume)
                self._degrade(f"{type(e).__name__}: {e}")
                retry_at = time.monotonic() + self.cfg.retry_seconds

    def _changed(self) -> None:
        try:
            self._on_change(self.status())
        except Exception:
            log.exception("dtl %s: on_change failed", self.volume)

    def _connect(self) -> bool:
        """Find a peer, hello, catch it up; True once in sync. DtlError, Fenced."""
        exclude = {self._failed.node} if self._failed else set()
        peer = self._choose_peer(exclude)
        if peer is None and exclude:
            peer = self._choose_peer(set())      # the old peer may be back
        if peer is None:
            with self._cv:
                was, self._state = self._state, "standalone"
                self._peer, self._incarnation = None, None
                self._release_to_unsafe()
            if was != "standalone":
                log.warning("dtl %s: no DTL peer available: standalone, writes are only local",
                            self.volume)
                self._changed()
            return False
        self._failed = peer                       # until the catch-up completes
        conn = Connection(peer, self.cfg.timeout, self._tls)
        try:
            info = wire.decode_json(conn.call(wire.HELLO, self.volume, self.gen))
        except wire.Malformed as e:
            conn.close()
            raise DtlError(f"dtl peer {peer}: hello: {e}") from None
        except BaseException:
            conn.close()
            raise
        inc = str(info.get("incarnation"))
        before = self._seen_incarnations.get((peer.host, peer.port))
        if before is not None and before != inc:
            log.warning("dtl %s: peer %s restarted (incarnation %s, was %s): full catch-up",
                        self.volume, peer, inc, before)
        with self._cv:
            self._peer, self._conn, self._incarnation = peer, conn, inc
            self._state = "catching up"
            self._shipped = None
            trim = self._trim_pos
        self._changed()
        sent = 0
        if trim > (0, 0):
            conn.call(wire.TRIM, self.volume, self.gen, wire.encode_pos(trim))
            self._trim_sent = trim
        start = trim
        while True:
            with self._cv:
                self._overflow = False
            sent += self._ship_iter(self._tail(start))
            with self._cv:
                if self._closed:
                    return False
                if self._overflow:
                    start = _next(self._shipped) if self._shipped else start
                    continue
                self._state = "ok"
                self._acked = self._queue[0][0] - 1 if self._queue else self._seq
                self._unsafe.clear()
                self._unsafe_bytes = 0
                self._seen_incarnations[(peer.host, peer.port)] = inc
                self._failed = None
                self._cv.notify_all()
            break
        log.info("dtl %s: peer %s in sync (incarnation %s, caught up %d bytes), mode %s",
                 self.volume, peer, inc, sent, self.mode)
        self._changed()
        return True

    def _ship_iter(self, entries: Iterator[Entry] | Iterable[Entry]) -> int:
        """Catch-up: ship entries above what the peer has, in batches. Bytes shipped."""
        batch: list[Entry] = []
        size = sent = 0
        for pos, blob in entries:
            if self._shipped is not None and pos <= self._shipped:
                continue
            batch.append((pos, blob))
            size += len(blob)
            if size >= wire.MAX_BATCH_BYTES:
                sent += self._send(batch)
                batch, size = [], 0
                if self._closed:
                    return sent
        if batch:
            sent += self._send(batch)
        return sent

    def _send(self, batch: list[Entry]) -> int:
        assert self._conn is not None
        self._conn.call(wire.APPEND, self.volume, self.gen, wire.encode_entries(batch))
        self._shipped = batch[-1][0]
        return sum(len(b) for _p, b in batch)

    def _work(self) -> None:
        """In sync: one step of shipping, trimming or syncing. DtlError, Fenced."""
        with self._cv:
            while True:
                if self._closed or self._fenced or self._conn is None:
                    return
                if self._trim_pos > self._trim_sent:
                    job, arg = "trim", self._trim_pos
                    break
                flushing = self._flush_want > self._flush_done
                if self._queue:
                    age = time.monotonic() - self._oldest
                    if (self.mode == "sync" or flushing or self._queued_bytes >= self._batch
                            or age >= self.cfg.queue_age):
                        job, arg = "append", self._take()
                        break
                    self._cv.wait(self.cfg.queue_age - age)
                    continue
                if flushing:
                    job, arg = "sync", self._flush_want
                    break
                # Idle: ask the peer now and then whether it is still the process we caught
                # up (a peer restarted without its state while the volume is idle must not be
                # taken for in sync until the next write).
                if not self._cv.wait(self.cfg.retry_seconds):
                    job, arg = "hello", None
                    break
        if job == "hello":
            info = wire.decode_json(self._conn.call(wire.HELLO, self.volume, self.gen))
            inc = str(info.get("incarnation"))
            if inc != self._incarnation:
                raise DtlError(f"dtl peer {self._peer} restarted (incarnation {inc}, was {self._incarnation})")
        elif job == "trim":
            self._conn.call(wire.TRIM, self.volume, self.gen, wire.encode_pos(arg))
            self._trim_sent = arg
        elif job == "append":
            batch = arg
            entries = [(p, b) for _t, p, b in batch if self._shipped is None or p > self._shipped]
            if entries:
                self._send(entries)
            with self._cv:
                self._inflight = []
                self._acked = max(self._acked, batch[-1][0])
                self._queued_bytes -= sum(len(b) for _t, _p, b in batch)
                self._cv.notify_all()
        else:
            self._conn.call(wire.SYNC, self.volume, self.gen)
            with self._cv:
                self._flush_done = max(self._flush_done, arg)
                self._cv.notify_all()

    def _take(self) -> list[tuple[int, Pos, bytes]]:
        """Lock held: pop up to a batch of queued entries (they count as queued until acked)."""
        out = []
        size = 0
        while self._queue and (not out or size + len(self._queue[0][2]) <= wire.MAX_BATCH_BYTES):
            e = self._queue.popleft()
            out.append(e)
            size += len(e[2])
        self._oldest = time.monotonic()
        self._inflight = out
        return out

    def _release_to_unsafe(self) -> None:
        """Lock held: queued entries become local-only; waiters are released."""
        for _t, p, b in [*self._inflight, *self._queue]:
            self._add_unsafe(p, len(b))
        self._inflight = []
        self._queue.clear()
        self._queued_bytes = 0
        self._cv.notify_all()

    def _degrade(self, reason: str) -> None:
        with self._cv:
            conn, self._conn = self._conn, None
            was = self._state
            if was in ("degraded", "standalone", "fenced"):
                changed = False
            else:
                self._state = "degraded"
                changed = True
            # In-flight entries may or may not have reached the peer: count them as local only.
            self._release_to_unsafe()
            peer = self._peer
        if conn is not None:
            conn.close()
        if changed:
            log.warning("dtl %s: DTL degraded (peer %s: %s); writes are acknowledged with the "
                        "local copy only until a new peer is caught up", self.volume, peer, reason)
            self._changed()

    def _fence(self, reason: str) -> None:
        with self._cv:
            conn, self._conn = self._conn, None
            self._fenced = reason
            self._state = "fenced"
            self._queue.clear()
            self._queued_bytes = 0
            self._cv.notify_all()
        if conn is not None:
            conn.close()
        log.error("dtl %s: fenced by DTL peer (generation %d): %s", self.volume, self.gen, reason)
        self._changed()
