"""A member's DTL wiring: each volume's mode (its own, its vPool's, `dtl.mode`), its client and
peer choice, the record in the cluster store of where its DTL lives, and dropping a tail."""

from __future__ import annotations

import logging
import time
from typing import Any

from ovsfs.dtl import DtlSink, NoDtl, Peer
from ovsfs.dtl import wire as dtl_wire
from ovsfs.dtl.client import Connection, DtlClient
from ovsfs.engine import tail
from ovsfs.errors import ClusterError, OvsfsError

log = logging.getLogger("ovsfs.member")

MODES = "/dtl_mode/"            # /dtl_mode/vpool/<vpool>, /dtl_mode/volume/<ns>: DTL mode settings


def _hostport(addr: str) -> tuple[str, int]:
    host, _sep, port = addr.rpartition(":")
    return host, int(port)


def released(dtl: dict[str, Any] | None, gen: int) -> bool:
    """The DTL record says the volume was handed over cleanly at owner generation `gen`:
    everything is on the backend and no tail is needed."""
    return bool(dtl) and dtl.get("state") == "released" and int(dtl.get("gen", -1)) == gen  # type: ignore[union-attr]


class DtlWiring:
    """Mixed into Member (ovsfs/member/core.py), whose attributes it uses: cfg, kv, owners,
    node_registry, name, tls, and the locks and caches made in Member.__init__."""

    def _cluster_gen(self, ns: str) -> int:
        rec = self.owners.owner(ns)
        return int(rec["gen"]) if rec else 0

    def dtl_mode(self, meta: dict[str, Any], modes: dict[str, Any] | None = None) -> str:
        """A volume's DTL mode: its own setting, else its vPool's, else `dtl.mode`. `modes`:
        the /dtl_mode/ records, when the caller has read them already (one read for all)."""
        modes = self.kv.list(MODES) if modes is None else modes
        for key in (f"{MODES}volume/{meta['ns']}", f"{MODES}vpool/{meta['vpool']}"):
            mode = modes.get(key)
            if mode in ("none", "async", "sync"):
                return mode
        return self.cfg.dtl.mode

    def choose_peer(self, exclude: set[str]) -> Peer | None:
        rec = self.owners.choose_dtl_peer(self.name, self.node_registry.list_nodes(), exclude)
        if rec is None:
            return None
        host, port = _hostport(rec.dtl)
        return Peer(rec.name, host, port)

    def dtl_sink(self, vol: Any) -> DtlSink:
        mode = self.dtl_mode(vol.meta)
        ns, gen = vol.ns, vol.gen
        if mode == "none":
            self._record_dtl(ns, gen, {"mode": "none", "state": "standalone", "peer": None,
                                       "unsafe_bytes": None})
            return NoDtl()
        # Recorded before the first write is acknowledged: a restart elsewhere must never
        # take an older record (the previous owner's peer) for this owner's DTL.
        self._record_dtl(ns, gen, {"mode": mode, "state": "catching up"})
        client = DtlClient(ns, gen, mode, self.cfg.dtl, self.choose_peer,
                           lambda start: tail.read_tail(vol, start),
                           lambda status: self._record_dtl(ns, gen, status), tls=self.tls)
        client.trim(tail.backend_pos(vol))   # what is on the backend already is not shipped
        return client

    def _record_dtl(self, ns: str, gen: int, status: dict[str, Any]) -> None:
        """Where a volume's DTL lives and whether it is in sync: what a restart elsewhere reads."""
        rec = {"owner": self.name, "gen": gen, "mode": status.get("mode"), "state": status.get("state"),
               "node": status.get("peer"), "peer": status.get("peer_address"),
               "incarnation": status.get("peer_incarnation"),
               "unsafe_bytes": status.get("unsafe_bytes"), "time": time.time()}
        try:
            with self._dtl_rec_lock:
                if not rec["peer"] and rec["mode"] != "none":
                    # The peer is lost: the record keeps naming the last one of this owner
                    # generation, which still holds the tail up to when it was lost. A forced
                    # restart reads that prefix from it instead of nothing.
                    prev = self.owners.dtl_record(ns) or {}
                    if prev.get("gen") == gen and prev.get("peer"):
                        rec.update(node=prev.get("node"), peer=prev["peer"], incarnation=prev.get("incarnation"))
                written = self.owners.set_dtl_record(ns, rec)
            if not written:
                log.warning("DTL record of %s not written: generation %d is not the newest any more", ns, gen)
        except ClusterError as e:
            log.warning("DTL record of %s not written: %s", ns, e.message)

    def _refresh_dtl_record(self, vol: Any) -> None:
        """While a volume's DTL is not in sync, every write it acknowledges is only here: keep
        the recorded unsafe_bytes current (the DTL client reports state changes only), since
        a forced restart elsewhere reports that figure as what may be lost. ClusterError."""
        with self._dtl_rec_lock:
            # Read under the lock: a state change the sender records meanwhile lands after.
            sink = getattr(vol.state, "dtl", None)
            if sink is None:
                return
            st = sink.status()
            if st.get("mode") == "none" or st.get("state") not in ("degraded", "standalone"):
                self._unsafe_recorded.pop(vol.ns, None)
                return
            if self._unsafe_recorded.get(vol.ns) == st.get("unsafe_bytes"):
                return
            rec = dict(self.owners.dtl_record(vol.ns) or {})
            if rec.get("gen") != vol.gen or rec.get("state") != st["state"]:
                return        # the sender's own record of this state is not written yet
            rec.update(unsafe_bytes=st.get("unsafe_bytes"), time=time.time())
            self.owners.set_dtl_record(vol.ns, rec)
            self._unsafe_recorded[vol.ns] = st.get("unsafe_bytes")

    def _drop_tail(self, dtl: dict[str, Any] | None, ns: str, gen: int) -> None:
        """The previous owner's tail is on the backend now: the peer may forget it."""
        if not dtl or not dtl.get("peer"):
            return
        host, port = _hostport(dtl["peer"])
        try:
            conn = Connection(Peer(dtl.get("node") or "?", host, port), self.cfg.dtl.timeout, self.tls)
            try:
                conn.call(dtl_wire.DROP, ns, gen)
            finally:
                conn.close()
        except OvsfsError as e:
            # Not fatal: the peer keeps a tail nobody reads (this owner's DTL record names
            # its own peer from now on) until the volume is deleted.
            log.warning("could not drop the old DTL tail of %s at %s: %s", ns, dtl["peer"], e.message)

    def _switch_dtl(self, vol: Any) -> None:
        """A new mode takes effect at once: what the old sink holds is flushed first."""
        vol.flush()
        with vol.lock:
            old, vol.state.dtl = vol.state.dtl, self.dtl_sink(vol)
            vol.state.dtl_ticket = None
        old.close(drop=True)
