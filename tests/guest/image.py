"""Builds and caches the tiny Linux guest the QEMU tests boot (issue 12, TESTBED.md recipe).

The guest is Debian 12's own kernel (`apt-get download linux-image-6.1.0-N-amd64`, unpacked
like `dpkg -x` but only the files we need) and a busybox-static initramfs holding the virtio
modules of the same package and `init.sh` as `/init`. Nothing is installed on the host.

Cache: `$OVSFS_GUEST_CACHE`, else /var/cache/ovsfs-guest (~/.cache/ovsfs-guest if that is
not writable). Layout:
    debs/linux-image-*.deb            the downloaded package
    <kver>/vmlinux                    the kernel, uncompressed for a PVH boot (else vmlinuz)
    <kver>/initrd-<key>.gz            initramfs; <key> hashes init.sh, busybox, this builder
    current.json                      {"kver"}: the kernel in use
A build holds an exclusive flock on `<cache>/.lock`, so concurrent test workers wait for one
build instead of racing; a finished cache is found without the lock (files appear by rename).

Run `python -m tests.guest.image [--refresh]` to (re)build it ahead of the tests.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from contextlib import contextmanager

HERE = Path(__file__).resolve().parent
INIT = HERE / "init.sh"
BUSYBOX = Path("/bin/busybox")
# Dependency order; the init script loads them in the same order.
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk"]
BUILDER_VERSION = "2"   # bump when the initramfs layout changes


class GuestImageError(Exception):
    """The guest image could not be built (no package, no busybox-static, a tool failed)."""


@dataclass(frozen=True)
class GuestImage:
    kver: str       # e.g. "6.1.0-57-amd64"
    kernel: Path    # vmlinux (PVH ELF) or bzImage, to pass as -kernel
    initrd: Path    # gzip'ed newc cpio to pass as -initrd


Progress = Callable[[str], None]


def cache_dir() -> Path:
    """$OVSFS_GUEST_CACHE, else /var/cache/ovsfs-guest (one per machine) when we may write
    there, else ~/.cache/ovsfs-guest."""
    if env := os.environ.get("OVSFS_GUEST_CACHE"):
        return Path(env)
    machine = Path("/var/cache/ovsfs-guest")
    if os.access(machine if machine.exists() else machine.parent, os.W_OK):
        return machine
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ovsfs-guest"


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise GuestImageError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def initrd_key() -> str:
    """What the initramfs depends on besides the kernel: init.sh, busybox, this builder."""
    h = hashlib.sha256(BUILDER_VERSION.encode())
    h.update(INIT.read_bytes())
    h.update(BUSYBOX.read_bytes() if BUSYBOX.exists() else b"")
    h.update(",".join(MODULES).encode())
    return h.hexdigest()[:16]


def newest_kernel_package() -> str:
    """The newest linux-image-6.1.0-*-amd64 apt knows: what the meta package depends on,
    else the highest-numbered name in the package lists."""
    r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-6.1.0-") and name.endswith("-amd64"):
            return name
    names = _run(["apt-cache", "pkgnames", "linux-image-6.1.0-"]).stdout.split()
    abi = [n for n in names if n.endswith("-amd64") and n.count("-") == 4
           and n.split("-")[3].isdigit()]
    if not abi:
        raise GuestImageError("apt knows no linux-image-6.1.0-*-amd64 package (apt-get update?)")
    return max(abi, key=lambda n: int(n.split("-")[3]))


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _current_kver(cache: Path) -> str | None:
    try:
        return str(json.loads((cache / "current.json").read_text())["kver"])
    except (OSError, ValueError, KeyError):
        return None


def _cached(cache: Path, kver: str | None) -> GuestImage | None:
    """The image of kernel `kver` with this checkout's initramfs, if both are built."""
    if kver is None:
        return None
    kdir = cache / kver
    initrd = kdir / f"initrd-{initrd_key()}.gz"
    for kernel in (kdir / "vmlinux", kdir / "vmlinuz"):
        if kernel.exists() and initrd.exists():
            return GuestImage(kver, kernel, initrd)
    return None


def ensure_image(refresh: bool = False, progress: Progress | None = None) -> GuestImage:
    """The guest kernel and initramfs, built on first use and cached for the machine.

    The kernel is the one recorded in current.json (the newest apt offered when it was
    first built); refresh: ask apt for the newest again. Initramfs images are kept per key,
    so checkouts with different init.sh versions share the cache without rebuilding each
    other's. Raises GuestImageError if it cannot be built (e.g. no apt, no busybox-static).
    """
    say = progress or (lambda msg: None)
    cache = cache_dir()
    if not refresh and (img := _cached(cache, _current_kver(cache))):
        return img
    with _locked(cache):
        kver = _current_kver(cache)
        if not refresh and (img := _cached(cache, kver)):   # another worker built it meanwhile
            return img
        pkg = newest_kernel_package() if refresh or kver is None else f"linux-image-{kver}"
        img = _build(cache, pkg, say)
        tmp = cache / "current.json.tmp"
        tmp.write_text(json.dumps({"kver": img.kver}))
        os.replace(tmp, cache / "current.json")
        if kver is not None and kver != img.kver:          # a newer kernel replaced it
            shutil.rmtree(cache / kver, ignore_errors=True)
        return img


def _build(cache: Path, pkg: str, say: Progress) -> GuestImage:
    if not _is_static(BUSYBOX):
        raise GuestImageError(f"{BUSYBOX} is missing or not static: apt-get install busybox-static")
    kver = pkg.removeprefix("linux-image-")
    say(f"guest: kernel package {pkg}")
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    deb = next(iter(sorted(debs.glob(f"{pkg}_*.deb"))), None)
    if deb is None:
        say(f"guest: apt-get download {pkg}")
        with tempfile.TemporaryDirectory(dir=debs) as dl:
            _run(["apt-get", "download", "-q", pkg], cwd=dl)
            got = list(Path(dl).glob("*.deb"))
            if len(got) != 1:
                raise GuestImageError(f"apt-get download {pkg} left {got}")
            deb = debs / got[0].name
            os.replace(got[0], deb)
        for old in debs.glob("linux-image-*.deb"):   # keep one package: ~70 MB each
            if old != deb:
                old.unlink()
    kdir = cache / kver
    kdir.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        work = Path(tmp)
        say(f"guest: unpacking {deb.name} (kernel and virtio modules only)")
        _extract(deb, kver, work / "x")
        kernel = _kernel(work / "x" / "boot", kver, kdir, work, say)
        initrd = kdir / f"initrd-{initrd_key()}.gz"
        say(f"guest: packing {initrd}")
        _pack_initrd(work / "x" / "lib" / "modules" / kver, work / "root", work / "initrd.gz")
        os.replace(work / "initrd.gz", initrd)
    # Other checkouts' initramfs stay (1 MB each, maybe in use by a QEMU right now); only
    # the oldest beyond a handful go.
    for old in sorted(kdir.glob("initrd-*.gz"), key=lambda p: p.stat().st_mtime)[:-8]:
        old.unlink(missing_ok=True)
    say(f"guest: ready: {kernel} {initrd}")
    return GuestImage(kver, kernel, initrd)


def _kernel(boot: Path, kver: str, kdir: Path, work: Path, say: Progress) -> Path:
    """The kernel QEMU loads: the bare ELF vmlinux when the kernel can boot by PVH (Debian's
    can: CONFIG_PVH=y). QEMU then enters it directly, skipping the BIOS real-mode setup and
    the in-guest XZ decompression: under TCG that takes a boot from ~8 s to ~4 s.
    Else the bzImage as packaged."""
    vmlinux, vmlinuz = kdir / "vmlinux", kdir / "vmlinuz"
    if vmlinux.exists():
        return vmlinux
    bz = (boot / f"vmlinuz-{kver}").read_bytes()
    config = (boot / f"config-{kver}").read_text(errors="replace")
    elf = _unpack_bzimage(bz) if "CONFIG_PVH=y" in config.splitlines() else None
    if elf is None:
        say("guest: no PVH entry or unknown compression: booting the bzImage")
        (work / "k").write_bytes(bz)
        os.replace(work / "k", vmlinuz)
        return vmlinuz
    say(f"guest: vmlinux for a PVH boot ({len(elf) >> 20} MiB)")
    (work / "k").write_bytes(elf)
    os.replace(work / "k", vmlinux)
    return vmlinux


def _unpack_bzimage(bz: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage compressed with XZ or gzip, or None."""
    for magic, unpack in ((b"\xfd7zXZ\x00", lambda b: lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(b)),
                          (b"\x1f\x8b\x08\x00", lambda b: zlib.decompressobj(31).decompress(b))):
        at = bz.find(magic)
        while at >= 0:
            try:
                out = unpack(bz[at:])
            except (lzma.LZMAError, zlib.error):
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            at = bz.find(magic, at + 1)
    return None


def _is_static(path: Path) -> bool:
    """An x86-64 ELF executable without a PT_INTERP header (no dynamic loader needed: the
    initramfs has no libc). Checked from the ELF headers: `file` is not on every machine."""
    try:
        elf = path.read_bytes()
    except OSError:
        return False
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return all(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] != 3 for i in range(phnum))


def _extract(deb: Path, kver: str, dest: Path) -> None:
    """`dpkg -x` restricted to the kernel and the virtio modules (the whole package is ~400 MB
    unpacked; these are ~8 MB)."""
    dest.mkdir(parents=True)
    wanted = [f"./boot/vmlinuz-{kver}", f"./boot/config-{kver}", f"./lib/modules/{kver}/kernel/drivers/virtio/*",
              f"./lib/modules/{kver}/kernel/drivers/block/virtio_blk.ko*"]
    tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        r = subprocess.run(["tar", "-x", "-C", str(dest), "--wildcards", *wanted], stdin=tar.stdout,
                           capture_output=True, text=True)
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
    if tar.returncode != 0 or r.returncode != 0:
        raise GuestImageError(f"unpacking {deb} failed: {r.stderr.strip()[-500:]}")


def _module_bytes(moddir: Path, name: str) -> bytes | None:
    """The module's ELF bytes, decompressed at build time (busybox insmod reads plain .ko)."""
    hits = [p for p in moddir.rglob(f"{name}.ko*") if p.name.split(".ko")[0] == name]
    if not hits:
        return None   # built into this kernel
    p = hits[0]
    if p.name.endswith(".ko"):
        return p.read_bytes()
    if p.name.endswith(".ko.xz"):
        return lzma.decompress(p.read_bytes())
    if p.name.endswith(".ko.gz"):
        return gzip.decompress(p.read_bytes())
    if p.name.endswith(".ko.zst"):
        return _run(["zstd", "-dc", str(p)], text=False).stdout  # type: ignore[return-value]
    raise GuestImageError(f"unknown module compression: {p}")


def _pack_initrd(moddir: Path, root: Path, out: Path) -> None:
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib/modules"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755)
    os.symlink("busybox", root / "bin" / "sh")
    shutil.copyfile(INIT, root / "init")
    (root / "init").chmod(0o755)
    found = []
    for m in MODULES:
        data = _module_bytes(moddir, m)
        if data is not None:
            (root / "lib" / "modules" / f"{m}.ko").write_bytes(data)
            found.append(m)
    if "virtio_blk" not in found or "virtio_pci" not in found:
        raise GuestImageError(f"virtio_blk / virtio_pci modules not found under {moddir}")
    if os.geteuid() == 0:
        # The kernel opens /dev/console before running /init; without the node the first
        # lines (before init mounts devtmpfs) would go nowhere.
        os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=root,
                          input="\n".join(files).encode() + b"\n", capture_output=True)
    if cpio.returncode != 0:
        raise GuestImageError(f"cpio failed: {cpio.stderr.decode(errors='replace')[-500:]}")
    with gzip.open(out, "wb", compresslevel=6) as f:
        f.write(cpio.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.guest.image", description=__doc__.split("\n")[0])
    ap.add_argument("--refresh", action="store_true", help="look for a newer kernel package even if cached")
    args = ap.parse_args(argv)
    try:
        img = ensure_image(refresh=args.refresh, progress=lambda m: print(m, flush=True))
    except GuestImageError as e:
        print(f"guest: {e}", file=sys.stderr)
        return 1
    print(f"guest: kernel {img.kernel}\nguest: initrd {img.initrd}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
