"""Helpers of the DTL tests: real DTL servers (in-process under trio in a thread, or in a
subprocess stopped by PID), the owner's local log a DtlClient catches peers up from, and a
throwaway CA for mutual TLS."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import trio

from ovsfs.config import DtlSection
from ovsfs.dtl import Peer, Pos
from ovsfs.dtl.client import DtlClient
from ovsfs.dtl.server import DtlServer

REPO = Path(__file__).resolve().parents[2]


def cfg(**kw: Any) -> DtlSection:
    base: dict[str, Any] = {"timeout": 2.0, "retry_seconds": 0.2, "queue_age": 0.002}
    base.update(kw)
    return DtlSection(**base)


def blob(i: int, size: int = 4096) -> bytes:
    """Distinct, checkable content per entry."""
    return (i.to_bytes(8, "big") * (size // 8 + 1))[:size]


def pos(i: int) -> Pos:
    # Several "TLogs" so that positions cross a tlog_no boundary.
    return (i // 100, (i % 100) * 4096)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class ThreadServer:
    """A DtlServer under trio.run in a thread of the test process."""

    def __init__(self, path: Path, **kw: Any) -> None:
        self.server = DtlServer(path, **kw)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error:
            raise RuntimeError(f"DTL server did not start: {self._error}")
        self.peer = Peer("inproc", "127.0.0.1", self.port)

    def _main(self) -> None:
        async def run() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as cs:
                self._cs = cs
                async with trio.open_nursery() as n:
                    self.port = await n.start(self.server.serve)
                    self._ready.set()
        try:
            trio.run(run)
        except BaseException as e:  # noqa: BLE001 - reported by the constructor
            self._error = e
            self._ready.set()

    def stop(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._cs.cancel, trio_token=self._token)
            self._thread.join(10)


class ProcServer:
    """`python -m ovsfs.dtl.server` in a subprocess, stopped (or SIGKILLed) by PID."""

    def __init__(self, path: Path, port: int = 0, name: str = "proc", extra: tuple = ()) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = open(Path(path).parent / f"{name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ovsfs.dtl.server", "--path", str(path), "--port", str(port),
             *extra], stdout=subprocess.PIPE, stderr=self.log, env=env)
        line = self.proc.stdout.readline().decode().split()   # type: ignore[union-attr]
        if line[:2] != ["DTL", "READY"]:
            self.kill()
            raise RuntimeError(f"DTL server did not start: {line}")
        self.port, self.incarnation = int(line[3]), line[4]
        self.peer = Peer(name, "127.0.0.1", self.port)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


class LocalLog:
    """The owner's side: a local log of (pos, blob) in order, and the volume lock under which
    a batch goes into the log and then to DtlSink.append (the engine's order)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[Pos, bytes]] = []
        self.sink: Any = None

    def write(self, p: Pos, data: bytes) -> object:
        with self.lock:
            self.entries.append((p, data))
            return self.sink.append(p, data)

    def tail(self, from_pos: Pos) -> Iterator[tuple[Pos, bytes]]:
        with self.lock:
            snap = list(self.entries)
        return iter([(p, b) for p, b in snap if p >= from_pos])


class Peers:
    """choose_peer: the first listed peer not excluded."""

    def __init__(self, *peers: Peer) -> None:
        self.peers = list(peers)
        self.asked: list[set[str]] = []

    def __call__(self, exclude: set[str]) -> Peer | None:
        self.asked.append(set(exclude))
        for p in self.peers:
            if p.node not in exclude:
                return p
        return None


def make_client(local: LocalLog, peers: Callable, mode: str = "sync", volume: str = "vol",
                gen: int = 1, **kw: Any) -> tuple[DtlClient, list[dict]]:
    changes: list[dict] = []
    c = DtlClient(volume, gen, mode, cfg(**kw), peers, local.tail, changes.append)
    local.sink = c
    return c, changes


# ---- TLS: a CA and certificates made with `cryptography` --------------------------------------

def make_certs(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k: Any, p: Path) -> None:
        p.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))

    def cert(cn: str, key: Any, issuer: x509.Name, ikey: Any, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                              False, False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), False)
        return b.sign(ikey, hashes.SHA256())

    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("ovsfs test CA", ca_key, name("ovsfs test CA"), ca_key, True)
    out["ca"] = d / "ca.pem"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        k = ec.generate_private_key(ec.SECP256R1())
        c = cert(who, k, ca.subject, ca_key, False)
        out[who + "_cert"] = d / f"{who}.pem"
        out[who + "_cert"].write_bytes(c.public_bytes(serialization.Encoding.PEM))
        out[who + "_key"] = d / f"{who}.key"
        write_key(k, out[who + "_key"])
    return out
