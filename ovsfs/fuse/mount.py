"""Mount, serve and unmount the vPool filesystem.

`serve(engine, cfg)` is what the daemon runs in its nursery: it clears a stale mount a
crashed daemon left behind, mounts at cfg.fuse.mountpoint, reports started, serves
until cancelled and unmounts. pyfuse3 keeps one session per process, so one mount.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ovsfs.errors import ConfigError
from ovsfs.fuse import lowlevel
from ovsfs.engine.api import Holder
from ovsfs.fuse.fs import VpoolFS

log = logging.getLogger("ovsfs.fuse")

MAX_TASKS = 128   # FUSE requests served at once


def mounted_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at path, from /proc/self/mountinfo."""
    target = os.path.realpath(path)
    fstype = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mnt = parts[4].encode().decode("unicode_escape")
            if mnt == target:
                fstype = parts[sep + 1]
    return fstype


def _unmount_lazy(path: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=30)
        except FileNotFoundError:
            continue
        if r.returncode == 0:
            return
        log.debug("%s: %s", " ".join(cmd), r.stderr.decode(errors="replace").strip())
    raise ConfigError(f"cannot clear the stale mount at {path}")


def prepare_mountpoint(path: Path) -> None:
    """Create the mount point; lazily unmount what a dead daemon left there."""
    try:
        os.stat(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        log.warning("clearing the stale FUSE mount at %s (a daemon died without unmounting)", path)
        _unmount_lazy(path)
        return
    kind = mounted_at(path)
    if kind is not None and kind.startswith("fuse"):
        # Alive: another process serves it (a second daemon on the same state directory?).
        raise ConfigError(f"{path} is already mounted ({kind}) and answering: another daemon serves it")
    if not path.is_dir():
        raise ConfigError(f"FUSE mount point {path} is not a directory")


def mount_options(cfg: Any) -> set[str]:
    opts = {"fsname=ovsfs", "subtype=ovsfs", "noatime"}
    if cfg.fuse.allow_other:
        opts.add("allow_other")
    if cfg.fuse.default_permissions:
        opts.add("default_permissions")
    return opts


async def serve(engine: Any, cfg: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the vPool tree at cfg.fuse.mountpoint until cancelled; then unmount."""
    mnt = cfg.path(cfg.fuse.mountpoint)
    await trio.to_thread.run_sync(prepare_mountpoint, mnt)
    ops = VpoolFS(engine, Holder("fuse", str(mnt)))   # named in Busy: "fuse client MNT"
    pyfuse3.init(ops, str(mnt), mount_options(cfg))
    log.info("FUSE mounted at %s", mnt)
    try:
        async with trio.open_nursery() as nursery:
            lowlevel.install(ops, nursery)
            nursery.start_soon(_main)
            task_status.started(mnt)
    finally:
        with trio.CancelScope(shield=True):
            # Unmount first (lazily, as root), so nothing new arrives, then free the session.
            pyfuse3.close(unmount=True)
        ops.shutdown()
        log.info("FUSE unmounted from %s", mnt)


async def _main() -> None:
    await pyfuse3.main(min_tasks=4, max_tasks=MAX_TASKS)
    log.info("FUSE main loop ended (unmounted from outside?)")
