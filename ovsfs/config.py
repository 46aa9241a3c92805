"""The node configuration: one typed object loaded from TOML, with defaults that run.

Relative paths in the file are taken relative to the state directory, so a state
directory can be moved as a whole. Unknown keys and values of the wrong type are
refused with a ConfigError that names the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ovsfs.errors import ConfigError


@dataclass
class NodeSection:
    name: str = "node1"
    # Paths below are relative to the state directory unless absolute.
    run_dir: str = "run"


@dataclass
class EngineSection:
    cluster_size: int = 4096
    sco_clusters: int = 1024          # clusters per SCO: 4 MiB with 4 KiB clusters
    tlog_scos: int = 4                # a TLog rolls over every N SCOs
    write_buffer: str = "wb"
    write_buffer_size: int = 2 << 30  # bytes of SCOs kept locally before writes wait
    map_cache_pages: int = 1024       # resident map pages per volume (32 KiB each)
    checkpoint_seconds: float = 30.0  # local map commit interval
    backend_checkpoint_tlogs: int = 16  # a map checkpoint goes to the backend every N TLogs
    scrub_threshold: float = 0.5      # SCOs with a smaller live share are rewritten
    # Free space (bytes) kept on the write-buffer filesystem (at most a tenth of it):
    # writers wait while less is free (the engine seals, uploads and evicts meanwhile).
    disk_reserve: int = 64 << 20
    disk_wait: float = 60.0           # seconds a writer waits for disk space, then NoSpace
    # Upload queues (ovsfs/engine/uploads.py): one ordered lane per volume, served by this
    # many threads; a failed upload is retried with doubling backoff (jittered) up to the cap.
    upload_workers: int = 4
    upload_retry_max_seconds: float = 10.0
    # Bound on Engine.close (and so on a SIGTERM): local flush and map commits, then queued
    # uploads for what is left of it; what is not uploaded by then is queued at the next start.
    stop_timeout: float = 30.0
    # A volume that failed to open for a reason that passes (disk full, I/O error, backend
    # away) is tried again this often (seconds), in the background.
    reopen_seconds: float = 30.0


@dataclass
class BackendSection:
    kind: str = "local"               # local (a directory) | asd (erasure coded over ASDs)
    path: str = "backend"             # the local backend's directory
    # kind = "asd": ASDs to attach at start ("HOST:PORT"); `ovsfs backend asd add` adds more.
    asds: list[str] = field(default_factory=list)
    # ASD processes the daemon starts and stops itself (`ovsfs run --asds N`), disks at
    # STATE/asd/0..N-1, one storage node each; their ports are fixed so that a restart
    # finds the same ASDs at the same addresses.
    local_asds: int = 0
    local_asd_ports: list[int] = field(default_factory=list)
    asd_restart_interval: float = 10.0  # seconds between tries to start a local ASD that did not start
    preset: str = "default"           # the preset the proxy writes with
    down_timeout: float = 900.0       # seconds an ASD may be down before its data is rebuilt
    fragment_cache_size: int = 256 << 20  # bytes of fragments cached on local disk
    # Garbage collection of what ASDs that were away still hold (deleted objects, replaced
    # versions, fragments of puts that crashed): a pass every gc_interval seconds (0: only
    # `ovsfs backend gc`); orphaned fragments younger than gc_grace seconds are left alone.
    gc_interval: float = 600.0
    gc_grace: float = 3600.0


@dataclass
class MgmtSection:
    socket: str = "run/ovsfs.sock"


@dataclass
class NbdSection:
    enabled: bool = True
    socket: str = "run/nbd.sock"
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 10809             # 0 disables the TCP listener
    allow: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    tls: str = "off"                  # off | optional | required
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    # Limits (ovsfs/nbd/limits.py documents the memory figures they give):
    max_connections: int = 256        # per node, both listeners; more are refused and closed
    handshake_timeout: float = 10.0   # seconds from accept to the end of negotiation
    send_timeout: float = 120.0       # seconds a client may leave a reply unread before it is dropped
    connection_buffer: int = 32 << 20  # bytes in flight per connection (requests + unsent replies)
    node_buffer: int = 256 << 20      # bytes in flight for all connections together
    threads: int = 16                 # worker threads for reads, writes, trims of all connections
    flush_threads: int = 4            # worker threads for FLUSH / FUA and negotiation look-ups


@dataclass
class FuseSection:
    enabled: bool = True
    mountpoint: str = "mnt"
    allow_other: bool = False
    default_permissions: bool = False


@dataclass
class ShmSection:
    """The vhost-user-blk door (ovsfs/shm/): a unix socket per volume for QEMU and the
    client library. Limits are printed when the door starts."""

    enabled: bool = True
    socket_dir: str = "run/vhost"     # VOL.sock and VOL@SNAP.sock (read-only) in here
    # Who may connect: a QEMU run by libvirt is another user (Debian: group libvirt-qemu).
    socket_mode: int = 0o660          # permissions of each socket (connecting needs write)
    socket_group: str = ""            # group of each socket and of socket_dir; "" = the daemon's
    num_queues: int = 4               # queues offered per device (the front end may use fewer)
    queue_size: int = 1024            # largest ring accepted (entries, a power of two)
    seg_max: int = 126                # data segments per request (Linux puts seg_max + 2 in a table)
    size_max: int = 256 << 10         # bytes per segment
    max_request_bytes: int = 32 << 20  # bytes of one IN / OUT request (>= seg_max * size_max)
    batches: int = 4                  # batches (DoorIO.run calls) in flight per queue
    threads: int = 16                 # worker threads for reads, writes, trims of all connections
    flush_threads: int = 4            # worker threads for FLUSH
    connection_requests: int = 4096   # requests (segments) in flight per connection
    connection_bytes: int = 64 << 20  # bytes of data in flight per connection
    node_requests: int = 1 << 16      # requests in flight for all connections together
    node_bytes: int = 512 << 20       # bytes in flight for all connections together
    # Seconds from connect until the front end has asked for the config (GET_CONFIG, which
    # QEMU does when it attaches, even paused) or sent its memory table; else it is dropped.
    handshake_timeout: float = 10.0
    # Guest memory must be a memfd sealed against shrinking (QEMU memory-backend-memfd,
    # seal=on by default): a file that shrinks under the mapping kills the daemon (SIGBUS).
    # true also takes unsealed tmpfs / hugetlbfs files (memory-backend-file on
    # /dev/hugepages), trusting the front end not to truncate them.
    allow_unsealed_memory: bool = False


@dataclass
class ClusterSection:
    # etcd client URLs; empty = one node with the embedded store (the default).
    etcd: list[str] = field(default_factory=list)
    prefix: str = "/ovsfs"            # every key of this cluster lives under it in etcd
    failure_domain: str = ""          # DTL peers are chosen in another one when there is one
    # Addresses other nodes use to reach this one (mgmt API over TCP, DTL, NBD).
    mgmt_host: str = "127.0.0.1"
    mgmt_port: int = 0                # 0: no TCP management listener (one node needs none)
    lease_ttl: int = 10               # seconds: a node not heard of for this long is down


@dataclass
class DtlSection:
    host: str = "127.0.0.1"
    port: int = 0                     # 0: no DTL server (one node, or a node that is no DTL peer)
    mode: str = "async"               # default of new vPools: none | async | sync
    path: str = "dtl"                 # where this node keeps the tails it holds for others
    tls: str = "off"                  # off | required (cert, key and CA as for NBD)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    queue_bytes: int = 8 << 20        # async: bytes queued before writers wait
    queue_age: float = 0.002          # async: seconds an append may wait before it is shipped
    timeout: float = 5.0              # seconds a peer may take to answer before it counts as gone
    retry_seconds: float = 5.0        # between tries to find a new peer while degraded
    max_bytes: int = 4 << 30          # bytes of tails this node holds for others, all volumes


@dataclass
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    engine: EngineSection = field(default_factory=EngineSection)
    backend: BackendSection = field(default_factory=BackendSection)
    mgmt: MgmtSection = field(default_factory=MgmtSection)
    nbd: NbdSection = field(default_factory=NbdSection)
    fuse: FuseSection = field(default_factory=FuseSection)
    shm: ShmSection = field(default_factory=ShmSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    dtl: DtlSection = field(default_factory=DtlSection)
    state_dir: Path = Path("var")

    def path(self, value: str) -> Path:
        """Resolve a configured path against the state directory."""
        p = Path(value)
        return p if p.is_absolute() else self.state_dir / p

    def validate(self) -> None:
        e = self.engine
        if e.cluster_size < 512 or e.cluster_size & (e.cluster_size - 1):
            raise ConfigError(f"engine.cluster_size must be a power of two >= 512, not {e.cluster_size}")
        if not 1 <= e.sco_clusters <= 65535:
            raise ConfigError(f"engine.sco_clusters must be 1..65535, not {e.sco_clusters}")
        if e.tlog_scos < 1:
            raise ConfigError("engine.tlog_scos must be at least 1")
        if e.write_buffer_size < 4 * e.cluster_size * e.sco_clusters:
            raise ConfigError("engine.write_buffer_size must hold at least 4 SCOs")
        if e.map_cache_pages < 4:
            raise ConfigError("engine.map_cache_pages must be at least 4")
        if not 0.0 <= e.scrub_threshold <= 1.0:
            raise ConfigError("engine.scrub_threshold must be between 0 and 1")
        if e.disk_reserve < 0:
            raise ConfigError("engine.disk_reserve must be >= 0 bytes")
        if e.disk_wait < 0:
            raise ConfigError("engine.disk_wait must be >= 0 seconds")
        if not 1 <= e.upload_workers <= 64:
            raise ConfigError(f"engine.upload_workers must be 1..64, not {e.upload_workers}")
        if e.upload_retry_max_seconds <= 0 or e.stop_timeout <= 0:
            raise ConfigError("engine.upload_retry_max_seconds and engine.stop_timeout must be positive")
        if e.reopen_seconds <= 0:
            raise ConfigError("engine.reopen_seconds must be positive")
        if e.checkpoint_seconds <= 0:
            raise ConfigError("engine.checkpoint_seconds must be positive")
        if e.backend_checkpoint_tlogs < 1:
            raise ConfigError("engine.backend_checkpoint_tlogs must be at least 1")
        if not e.write_buffer:
            raise ConfigError("engine.write_buffer must name a directory")
        self._validate_backend()
        self._validate_nbd()
        self._validate_shm()
        self._validate_cluster()

    def _validate_cluster(self) -> None:
        c, d = self.cluster, self.dtl
        for url in c.etcd:
            if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+:\d+/?$", url):
                raise ConfigError(f"cluster.etcd entry {url!r} must be a URL like http://127.0.0.1:2379")
        if not c.prefix.startswith("/") or c.prefix.endswith("/"):
            raise ConfigError(f"cluster.prefix {c.prefix!r} must start with / and not end with /")
        if c.etcd and not c.mgmt_port:
            raise ConfigError("cluster.mgmt_port must be set with cluster.etcd: the other nodes call this "
                              "node's management API over TCP for moves and restarts")
        if c.lease_ttl < 2:
            raise ConfigError("cluster.lease_ttl must be at least 2 seconds")
        for key, port in (("cluster.mgmt_port", c.mgmt_port), ("dtl.port", d.port)):
            if not 0 <= port <= 65535:
                raise ConfigError(f"{key} must be 0..65535 (0: none), not {port}")
        for key, host in (("cluster.mgmt_host", c.mgmt_host), ("dtl.host", d.host)):
            if not _host_ok(host):
                raise ConfigError(f"{key} {host!r} is not an IP address or host name")
        if d.mode not in ("none", "async", "sync"):
            raise ConfigError(f"dtl.mode must be none, async or sync, not {d.mode!r}")
        if d.tls not in ("off", "required"):
            raise ConfigError("dtl.tls must be off or required")
        if d.tls == "required" and not (d.tls_cert and d.tls_key and d.tls_ca):
            raise ConfigError("dtl.tls = required needs dtl.tls_cert, dtl.tls_key and dtl.tls_ca")
        if d.queue_bytes < 1 << 16 or d.max_bytes < d.queue_bytes:
            raise ConfigError("dtl.queue_bytes must be at least 64 KiB and dtl.max_bytes at least as large")
        if d.queue_age <= 0 or d.timeout <= 0 or d.retry_seconds <= 0:
            raise ConfigError("dtl.queue_age, dtl.timeout and dtl.retry_seconds must be positive")
        if (c.etcd or d.port) and self.engine.sco_clusters > 0xFFFF:
            raise ConfigError("engine.sco_clusters must stay below 65536 with a cluster")

    @property
    def clustered(self) -> bool:
        """Several nodes: etcd holds the configuration and ownership (else the embedded store)."""
        return bool(self.cluster.etcd)

    def _validate_nbd(self) -> None:
        n = self.nbd
        if n.tls not in ("off", "optional", "required"):
            raise ConfigError("nbd.tls must be off, optional or required")
        if not 0 <= n.tcp_port <= 65535:
            raise ConfigError(f"nbd.tcp_port must be 0..65535 (0: no TCP listener), not {n.tcp_port}")
        if n.tcp_host and not _host_ok(n.tcp_host):
            raise ConfigError(f"nbd.tcp_host {n.tcp_host!r} is not an IP address or host name")
        for a in n.allow:
            try:
                ipaddress.ip_network(a if isinstance(a, str) else None, strict=False)  # type: ignore[arg-type]
            except (ValueError, TypeError):
                raise ConfigError(f"nbd.allow entry {a!r} is not an address or CIDR network "
                                  "(e.g. 10.0.0.0/8)") from None
        if n.max_connections < 1:
            raise ConfigError("nbd.max_connections must be at least 1")
        if n.handshake_timeout <= 0 or n.send_timeout <= 0:
            raise ConfigError("nbd.handshake_timeout and nbd.send_timeout must be positive")
        if n.connection_buffer <= 0 or n.node_buffer < n.connection_buffer:
            raise ConfigError("nbd.connection_buffer must be positive and nbd.node_buffer at least as large")
        if n.threads < 1 or n.flush_threads < 1:
            raise ConfigError("nbd.threads and nbd.flush_threads must be at least 1")

    def _validate_shm(self) -> None:
        m = self.shm
        if not m.socket_dir:
            raise ConfigError("shm.socket_dir must name a directory")
        if not 0 <= m.socket_mode <= 0o777:
            raise ConfigError(f"shm.socket_mode must be permission bits (0o000..0o777), not {m.socket_mode!r}")
        if m.socket_group:
            import grp
            try:
                grp.getgrnam(m.socket_group)
            except KeyError:
                raise ConfigError(f"shm.socket_group: no group {m.socket_group!r} on this machine") from None
        if not 1 <= m.num_queues <= 64:
            raise ConfigError(f"shm.num_queues must be 1..64, not {m.num_queues}")
        if m.queue_size < 2 or m.queue_size > 32768 or m.queue_size & (m.queue_size - 1):
            raise ConfigError(f"shm.queue_size must be a power of two in 2..32768, not {m.queue_size}")
        if not 1 <= m.seg_max <= 1022:
            # An indirect table holds seg_max + 2 descriptors; the door accepts up to 1024.
            raise ConfigError(f"shm.seg_max must be 1..1022, not {m.seg_max}")
        if m.size_max < 4096 or m.max_request_bytes < m.seg_max * m.size_max:
            # A guest builds requests of up to seg_max segments of size_max bytes: a smaller
            # max_request_bytes would fail its large requests with I/O errors.
            raise ConfigError("shm.size_max must be at least 4096 and shm.max_request_bytes at least "
                              "shm.seg_max * shm.size_max")
        if m.batches < 1 or m.threads < 1 or m.flush_threads < 1:
            raise ConfigError("shm.batches, shm.threads and shm.flush_threads must be at least 1")
        if (m.connection_requests < 1 or m.connection_bytes < 1 or m.node_requests < m.connection_requests
                or m.node_bytes < m.connection_bytes):
            raise ConfigError("shm.connection_requests / connection_bytes must be positive and "
                              "shm.node_requests / node_bytes at least as large")
        if not 0 < m.handshake_timeout <= 3600:
            raise ConfigError(f"shm.handshake_timeout must be 0..3600 seconds (not 0), not {m.handshake_timeout}")

    def _validate_backend(self) -> None:
        b = self.backend
        if b.kind not in ("local", "asd"):
            raise ConfigError(f"backend.kind {b.kind!r} is not known (local, asd)")
        for addr in b.asds:
            host, sep, port = addr.rpartition(":") if isinstance(addr, str) else ("", "", "")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"backend.asds entry {addr!r} must be HOST:PORT")
        if not 0 <= b.local_asds <= 64:
            raise ConfigError(f"backend.local_asds must be 0..64, not {b.local_asds}")
        ports = b.local_asd_ports
        if any(not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536 for p in ports):
            raise ConfigError("backend.local_asd_ports must be port numbers 1..65535")
        if len(ports) != b.local_asds or len(set(ports)) != len(ports):
            # Fixed ports are what lets a restart find the same ASDs: they cannot be left out.
            raise ConfigError(f"backend.local_asd_ports must list {b.local_asds} distinct ports "
                              f"(one per local ASD), not {len(ports)}")
        if b.kind == "local" and (b.asds or b.local_asds):
            raise ConfigError('backend.asds and backend.local_asds need backend.kind = "asd"')
        if b.kind == "asd" and not (b.asds or b.local_asds):
            raise ConfigError('backend.kind = "asd" needs backend.asds or backend.local_asds')
        if b.asd_restart_interval <= 0:
            raise ConfigError("backend.asd_restart_interval must be positive")
        if b.down_timeout < 0:
            raise ConfigError("backend.down_timeout must not be negative")
        if b.fragment_cache_size < 0:
            raise ConfigError("backend.fragment_cache_size must not be negative")
        if b.gc_interval < 0 or b.gc_grace < 0:
            raise ConfigError("backend.gc_interval and backend.gc_grace must not be negative")
        if not b.preset:
            raise ConfigError("backend.preset must name a preset")


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known or key == "state_dir":
            raise ConfigError(f"unknown config key {where}{key}")
        want = hints[key]
        if dataclasses.is_dataclass(want):
            if not isinstance(value, dict):
                raise ConfigError(f"config section [{where}{key}] must be a table")
            kwargs[key] = _build(want, value, f"{where}{key}.")
            continue
        origin = typing.get_origin(want) or want
        ok = isinstance(value, origin)
        if origin is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if origin is int and isinstance(value, bool):
            ok = False
        if not ok:
            raise ConfigError(f"config key {where}{key} must be {origin.__name__}, not {type(value).__name__}")
        if origin is float and not math.isfinite(value):
            # TOML has nan and inf; no setting means either (a nan timeout waits forever).
            raise ConfigError(f"config key {where}{key} must be a finite number, not {value}")
        kwargs[key] = value
    return cls(**kwargs)


def load(path: Path | None, state_dir: Path) -> Config:
    """Load the config file (or defaults when path is None) for a state directory."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        state = data.pop("state_dir", None)
        if state is not None:
            if not isinstance(state, str):
                raise ConfigError("config key state_dir must be str")
            state_dir = Path(state)
    cfg = _build(Config, data, "")
    cfg.state_dir = Path(state_dir).absolute()
    cfg.validate()
    return cfg


def default_toml(local_asds: int = 0, ports: list[int] | None = None, preset_note: str = "") -> str:
    """The config `ovsfs run` writes on first start: the local backend, or N local ASDs."""
    if not local_asds:
        return DEFAULT_TOML
    backend = (
        '[backend]\n'
        '# erasure coded over ASD processes this daemon starts (STATE/asd/0..N-1)\n'
        'kind = "asd"\n'
        'asds = []\n'
        f'local_asds = {local_asds}\n'
        f'local_asd_ports = [{", ".join(str(p) for p in ports or [])}]\n'
        + (f'# {preset_note}\n' if preset_note else '')
        + 'preset = "default"\n'
        'down_timeout = 900.0\n'
        f'fragment_cache_size = {256 << 20}\n')
    return DEFAULT_TOML.replace('[backend]\nkind = "local"\npath = "backend"\n', backend)


DEFAULT_TOML = """\
# ovsfs node configuration. Relative paths are below the state directory.
[node]
name = "node1"

[engine]
cluster_size = 4096
sco_clusters = 1024
tlog_scos = 4
write_buffer_size = 2147483648
map_cache_pages = 1024

[backend]
kind = "local"
path = "backend"

[nbd]
enabled = true
socket = "run/nbd.sock"
tcp_host = "127.0.0.1"
tcp_port = 10809

[fuse]
enabled = true
mountpoint = "mnt"

[shm]
# vhost-user-blk sockets for QEMU and the client library: socket_dir/VOL.sock
enabled = true
socket_dir = "run/vhost"
# socket_mode = 0o660              # who may connect: libvirt's QEMU runs as another user,
# socket_group = "libvirt-qemu"    # so give the sockets (and socket_dir) its group
"""
