"""The node daemon: one trio nursery running the engine's management API and every door.

`ovsfs daemon --config FILE` is the service form (systemd, Type=notify); `ovsfs run
--state DIR [--asds N]` is the embedded single-node default, which writes a default config
into the state directory on first start (with --asds: N local ASD processes, their ports
and the preset chosen for them, so that a restart finds the same ASDs).
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import trio

from ovsfs.config import Config, default_toml, load
from ovsfs.errors import AlreadyExists, ConfigError, OvsfsError, first_leaf
from ovsfs.backend.node import NodeBackend, free_ports, preset_note
from ovsfs.preflight import DoorUnavailable, check_doors, check_write_buffer

log = logging.getLogger("ovsfs.daemon")

# (name, module, enabled?) of each door; modules are imported only when enabled.
DOORS: list[tuple[str, str, Callable[[Config], bool]]] = [
    ("nbd", "ovsfs.nbd.server", lambda cfg: cfg.nbd.enabled),
    ("fuse", "ovsfs.fuse.mount", lambda cfg: cfg.fuse.enabled),
    ("shm", "ovsfs.shm.server", lambda cfg: cfg.shm.enabled),
]


class Notifier:
    """sd_notify to systemd; does nothing when not started by systemd."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n: Any = None
        if self.enabled:
            import sdnotify

            self._n = sdnotify.SystemdNotifier()

    def __call__(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def watchdog_interval(self) -> float | None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not self.enabled or not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6


# What each door takes and the config keys that set it: named when a door cannot start.
def _door_addresses(name: str, cfg: Config) -> tuple[str, str]:
    if name == "nbd":
        where = f"unix socket {cfg.path(cfg.nbd.socket)}"
        if cfg.nbd.tcp_port:
            where += f", TCP {cfg.nbd.tcp_host or '*'}:{cfg.nbd.tcp_port}"
        return where, "nbd.socket / nbd.tcp_host / nbd.tcp_port"
    if name == "fuse":
        return f"mount point {cfg.path(cfg.fuse.mountpoint)}", "fuse.mountpoint"
    if name == "shm":
        return f"unix sockets in {cfg.path(cfg.shm.socket_dir)}", "shm.socket_dir"
    return "?", f"[{name}]"


async def _door(name: str, serve: Any, engine: Any, cfg: Config, doors: dict[str, str],
                source: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run one door. A door that cannot start stops the daemon (DoorUnavailable out of
    nursery.start: never a ready node without a configured door); one that fails later is
    logged and reported, the others keep serving."""
    started = False
    try:
        async with trio.open_nursery() as inner:
            await inner.start(functools.partial(serve, engine, cfg))
            doors[name] = "running"
            log.info("%s door is serving", name)
            started = True
            task_status.started()
    except Exception as e:
        leaf = first_leaf(e)
        reason = getattr(leaf, "message", None) or getattr(leaf, "strerror", None) or str(leaf)
        doors[name] = f"failed: {reason}"
        if not started:
            where, keys = _door_addresses(name, cfg)
            raise DoorUnavailable(name, where, reason, keys, source) from e
        log.error("%s door failed: %s", name, reason,
                  exc_info=not isinstance(leaf, (OvsfsError, OSError)))


def _import_door(name: str, module: str) -> Any | None:
    try:
        return importlib.import_module(module).serve
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            log.warning("%s door: module %s does not exist yet; skipping it", name, module)
        else:
            log.error("%s door: cannot import %s (%s); skipping it", name, module, e)
    except (ImportError, AttributeError) as e:
        log.error("%s door: cannot load %s (%s); skipping it", name, module, e)
    return None


async def _watch_signals(signals: Any, scope: trio.CancelScope, notify: Notifier) -> None:
    async for signum in signals:
        log.info("got %s: shutting down", signal.Signals(signum).name)
        notify("STOPPING=1")
        scope.cancel()
        return


async def _watchdog(notify: Notifier, interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)


class Shutdown:
    """How the stop went: `abandoned` when a close overran its bound and was left running
    in its thread (the process then exits without waiting for it)."""

    def __init__(self) -> None:
        self.abandoned = False


async def _bounded(what: str, fn: Callable[[], None], seconds: float, shutdown: Shutdown) -> bool:
    """Run a blocking close in a worker thread for at most `seconds`; False (and the thread
    left behind) when it overran: a backend that does not answer must not hold a SIGTERM."""
    with trio.move_on_after(seconds):
        await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        return True
    log.error("%s did not finish within %.0f s: leaving it", what, seconds)
    shutdown.abandoned = True
    return False


# A SIGTERM finishes within engine.stop_timeout + CLOSE_SLACK seconds (then the ASDs are
# stopped): the engine spends up to stop_timeout (local flush and commits first, then
# uploads); the backend close saves its index at once and waits BACKEND_IO_WAIT at most for
# I/O in flight to ASDs that may not answer; MIN_BACKEND_CLOSE bounds the whole backend close.
CLOSE_SLACK = 3.0
MIN_BACKEND_CLOSE = 2.0
BACKEND_IO_WAIT = 0.5


async def amain(cfg: Config, backend: NodeBackend, shutdown: Shutdown | None = None,
                source: str = "the config file") -> int:
    """Run the node until SIGTERM/SIGINT; `source` names the config file in messages."""
    shutdown = shutdown if shutdown is not None else Shutdown()
    from ovsfs.engine.engine import Engine
    from ovsfs.mgmt.api import Api
    from ovsfs.mgmt.http import serve_unix

    notify = Notifier()
    # Held open through engine.close() so a second signal cannot interrupt the clean close.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        notify("STATUS=opening the backend")
        try:
            # The proxy talks to ASDs and may rebuild its index from them: not on the event loop.
            store = await trio.to_thread.run_sync(backend.open)
        except Exception as e:
            log.error("cannot open the %s backend: %s", cfg.backend.kind, getattr(e, "message", None) or e,
                      exc_info=not isinstance(e, (OvsfsError, OSError)))
            return 1
        notify("STATUS=opening the engine")
        member = None
        try:
            if cfg.clustered:
                # Several nodes: etcd is the registry and says which volumes are served here.
                from ovsfs.member import Member

                member = Member(cfg, store, backend.removed() if cfg.backend.kind == "asd" else [])
                engine = Engine(cfg, store, registry=member.kv, role=member.role)
            else:
                engine = Engine(cfg, store)
            await trio.to_thread.run_sync(engine.open)
        except Exception as e:
            log.error("cannot open the engine: %s", getattr(e, "message", None) or e,
                      exc_info=not isinstance(e, (OvsfsError, OSError)))
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(backend.close)
            return 1
        rc = 0
        try:
            if not await trio.to_thread.run_sync(engine.list_vpools):
                try:
                    await trio.to_thread.run_sync(engine.create_vpool, "default")
                    log.info("first start: created vPool default")
                except AlreadyExists:
                    pass   # another node of the cluster made it at the same time
            doors: dict[str, str] = {}
            sock = cfg.path(cfg.mgmt.socket)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, signals, nursery.cancel_scope, notify)
                for name, module, enabled in DOORS:
                    if not enabled(cfg):
                        doors[name] = "disabled"
                        continue
                    serve = _import_door(name, module)
                    if serve is None:
                        doors[name] = "unavailable"
                        continue
                    doors[name] = "starting"
                    await nursery.start(_door, name, serve, engine, cfg, doors, source)
                # The API comes last: once /status answers, every door is listening.
                api = Api(engine, cfg, doors, backend, cluster=member)
                if member is not None:
                    # Registered before /status answers: a node that cannot join (its name
                    # is alive elsewhere, etcd away) never looks ready.
                    from ovsfs.member import serve as serve_member

                    await nursery.start(serve_member, member, engine, api)
                try:
                    await nursery.start(serve_unix, sock, api)
                except OvsfsError as e:
                    raise DoorUnavailable("management API", f"unix socket {sock}", e.message,
                                          "mgmt.socket", source) from e
                log.info("management API on %s", sock)
                interval = notify.watchdog_interval()
                if interval:
                    nursery.start_soon(_watchdog, notify, interval)
                nvol = len(engine.volumes)
                running = ", ".join(n for n, s in doors.items() if s == "running") or "none"
                notify(f"READY=1\nSTATUS=serving {nvol} volumes; doors: {running}")
                log.info("ready: %d volumes; doors: %s", nvol, running)
        except Exception as e:
            leaf = first_leaf(e)
            if isinstance(leaf, DoorUnavailable):
                log.error("%s", leaf.message)
            else:
                log.error("daemon failed: %s", getattr(leaf, "message", None) or leaf,
                          exc_info=not isinstance(leaf, OvsfsError))
            rc = 1
        finally:
            notify("STOPPING=1\nSTATUS=closing the engine")
            # Bounded (engine.stop_timeout, enforced by the engine itself; the guard here only
            # catches a close stuck somewhere else): local data is flushed and committed first,
            # uploads that the backend does not take in time are queued again at the next start.
            with trio.CancelScope(shield=True):
                deadline = trio.current_time() + cfg.engine.stop_timeout + CLOSE_SLACK
                try:
                    if await _bounded("closing the engine", engine.close,
                                      deadline - trio.current_time(), shutdown):
                        log.info("engine closed")
                    else:
                        rc = 1
                except Exception:
                    log.exception("closing the engine failed")
                    rc = 1
                if member is not None:
                    await trio.to_thread.run_sync(member.close)
                try:
                    left = max(MIN_BACKEND_CLOSE, deadline - trio.current_time())
                    closed: list[bool] = []
                    if not await _bounded("closing the backend",
                                          lambda: closed.append(backend.close(BACKEND_IO_WAIT)), left, shutdown):
                        log.warning("backend closed without waiting for ASDs that do not answer")
                    elif closed and not closed[0]:
                        # I/O threads left behind would hold interpreter exit.
                        shutdown.abandoned = True
                except Exception:
                    log.exception("closing the backend failed")
                    rc = 1
    return rc


class StateLock:
    """The pid file, locked for the daemon's lifetime: one daemon per state directory.

    flock dies with the process, so a pid file left by kill -9 never blocks a restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OvsfsError(f"another ovsfs daemon (pid {other}) is running on this state directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def load_config(config: Path | None, state: Path, embedded: bool, asds: int | None = None) -> Config:
    if embedded:
        state.mkdir(parents=True, exist_ok=True)
        config = state / "ovsfs.toml"
        if not config.exists():
            if asds:
                # Ports are picked once and written down: the proxy knows ASDs by address.
                text = default_toml(asds, free_ports(asds), preset_note(asds))
            else:
                text = default_toml()
            config.write_text(text)
    cfg = load(config, state)
    if asds is not None and (cfg.backend.kind != "asd" or cfg.backend.local_asds != asds):
        have = (f"{cfg.backend.local_asds} local ASDs" if cfg.backend.kind == "asd"
                else f"the {cfg.backend.kind} backend")
        raise ConfigError(f"{config} is set up for {have}, not --asds {asds}; "
                          f"edit backend.local_asds there or use a new state directory")
    return cfg


def main(config: Path | None, state: Path, embedded: bool, asds: int | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    try:
        cfg = load_config(config, state, embedded, asds)
    except OvsfsError as e:
        print(f"ovsfs: error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ovsfs: error: cannot prepare state directory {state}: {e.strerror or e}", file=sys.stderr)
        return 1
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)   # one line per etcd request otherwise
    source = str(config if config is not None else (state / "ovsfs.toml").absolute())
    lock = StateLock(cfg.path(cfg.node.run_dir) / "ovsfs.pid")
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OvsfsError as e:
        print(f"ovsfs: error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ovsfs: error: cannot prepare {cfg.state_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        # Before the ASDs and the engine: a door that cannot listen stops the start at once.
        check_doors(cfg, source)
        check_write_buffer(cfg, source)
    except OvsfsError as e:
        print(f"ovsfs: error: {e.message}", file=sys.stderr)
        lock.release()
        return 1
    log.info("ovsfs daemon (pid %d) starting on %s", os.getpid(), cfg.state_dir)
    backend = NodeBackend(cfg)
    shutdown = Shutdown()
    try:
        # Before the event loop: the ASDs are this process's children for its whole life.
        backend.spawn()
        rc = trio.run(amain, cfg, backend, shutdown, source)
    except OvsfsError as e:
        log.error("cannot start: %s", e.message)
        rc = 1
    finally:
        # A stopped (SIGSTOP) ASD acts on SIGTERM only once continued: wake our own ASDs
        # first, by PID, so that stopping them does not wait out their kill timeout.
        for p in backend.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        backend.stop()  # every ASD this daemon started, by PID, whatever happened above
        lock.release()
    log.info("stopped (exit %d)", rc)
    if shutdown.abandoned:
        # Threads left in a close (waiting on the backend) would hold interpreter exit:
        # everything durable is done, so leave now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
