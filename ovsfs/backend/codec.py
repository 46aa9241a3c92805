"""Codec: compress, encrypt, erasure code and checksum one chunk, and the way back.

Order on write: compress (zstd / lz4, kept only when it helps) -> encrypt with
AES-256-GCM (nonce = object version id + chunk number, so it is never reused for a
key: each put draws a fresh random version id, repairs copy ciphertext and never
re-encrypt) -> Reed-Solomon (liberasurecode + ISA-L via pyeclib) -> CRC32C per
fragment. The heavy steps are C code that releases the GIL (zstd, lz4, crc32c,
OpenSSL through `cryptography`); pyeclib holds it, so the proxy keeps encoding on
one thread and overlaps it with network I/O instead.

Keys live in a key file outside the ASDs (under the node's state directory, or one
file / callback store shared by the nodes of a cluster: KeyRing); a manifest names the
key id only.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import crc32c
import lz4.frame
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyeclib.ec_iface import ECDriver

from ovsfs.backend.manifest import CHUNK_COMPRESSED
from ovsfs.backend.policy import EC_HEADER
from ovsfs.errors import ConfigError, DataError

EC_TYPE = "isa_l_rs_vand"
_drivers: dict[tuple[int, int], ECDriver] = {}
_drivers_lock = threading.Lock()
_local = threading.local()


def driver(k: int, m: int) -> ECDriver:
    with _drivers_lock:
        d = _drivers.get((k, m))
        if d is None:
            # m == 0 is plain striping; liberasurecode wants m >= 1, so use m=1 and drop parity.
            d = _drivers[(k, m)] = ECDriver(k=k, m=max(m, 1), ec_type=EC_TYPE)
        return d


class KeyRing:
    """AES-256 keys by id: in a JSON file readable by root only, or kept elsewhere through
    `load` / `save` callbacks (e.g. the cluster store, so every node of a cluster reads
    what any node encrypted).

    Several nodes may share one key file (or one callback store): creating the first key
    and rotating hold an exclusive flock on `<path>.lock` and re-read the keys first, so
    two nodes starting together agree on key 1; a key id this ring does not know (another
    node rotated) is looked up again before `get` gives up. ConfigError when the stored
    keys are damaged."""

    def __init__(self, path: Path | None = None, load: Callable[[], str | None] | None = None,
                 save: Callable[[str], None] | None = None) -> None:
        if path is None and (load is None or save is None):
            raise ConfigError("a key ring needs a path or both load and save callbacks")
        self.path = Path(path) if path is not None else None
        self._load_cb, self._save_cb = load, save
        self.keys: dict[int, bytes] = {}
        self.current = 0
        self._mutex = threading.Lock()
        with self._exclusive():
            self._read()
            if not self.keys:
                self._add_key()

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "the shared key store"

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._mutex:
            if self.path is None:
                yield
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _read(self) -> None:
        if self.path is not None:
            try:
                text: str | None = self.path.read_text()
            except FileNotFoundError:
                text = None
        else:
            assert self._load_cb is not None
            text = self._load_cb()
        if not text:
            return
        try:
            d = json.loads(text)
            keys = {int(k): bytes.fromhex(v) for k, v in d["keys"].items()}
            current = int(d["current"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"key file {self._where()} is damaged: {e}") from None
        self.keys.update(keys)   # keys are never dropped: old objects need them
        self.current = max(self.current, current)

    def _write(self) -> None:
        text = json.dumps({"current": self.current, "keys": {str(k): v.hex() for k, v in self.keys.items()}})
        if self.path is None:
            assert self._save_cb is not None
            self._save_cb(text)
            return
        tmp = self.path.with_name(f"{self.path.name}.tmp.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _add_key(self) -> int:
        self.current = max(self.keys, default=0) + 1
        self.keys[self.current] = AESGCM.generate_key(bit_length=256)
        self._write()
        return self.current

    def reload(self) -> None:
        """Read the stored keys again (another node may have added one)."""
        with self._exclusive():
            self._read()

    def rotate(self) -> int:
        """Add a fresh key and make it current; older keys stay to read older objects."""
        with self._exclusive():
            self._read()
            return self._add_key()

    def get(self, key_id: int) -> AESGCM:
        if key_id not in self.keys:
            self.reload()
        try:
            return AESGCM(self.keys[key_id])
        except KeyError:
            raise DataError(f"encryption key {key_id} is not in {self._where()}") from None


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_local, "zc", None)
    if c is None:
        c = _local.zc = zstandard.ZstdCompressor(level=1)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def nonce(vid: bytes, chunk: int) -> bytes:
    return vid + struct.pack(">I", chunk)


def transform(data: memoryview, compression: str, aead: AESGCM | None, vid: bytes,
              chunk: int) -> tuple[bytes | memoryview, int]:
    """Chunk bytes -> bytes to erasure code, and the chunk flags."""
    out: bytes | memoryview = data
    flags = 0
    if compression != "none":
        packed = (_zstd_c().compress(data) if compression == "zstd"
                  else lz4.frame.compress(data, store_size=False))
        if len(packed) < len(data):  # incompressible data is stored as is
            out, flags = packed, CHUNK_COMPRESSED
    if aead is not None:
        out = aead.encrypt(nonce(vid, chunk), out, None)
    return out, flags


def untransform(data: bytes | bytearray, flags: int, compression: str, aead: AESGCM | None,
                vid: bytes, chunk: int, raw_len: int) -> bytes:
    out: bytes | bytearray = data
    if aead is not None:
        try:
            out = aead.decrypt(nonce(vid, chunk), bytes(out), None)
        except InvalidTag:
            raise DataError(f"chunk {chunk} of {vid.hex()} fails authentication") from None
    if flags & CHUNK_COMPRESSED:
        if compression == "zstd":
            out = _zstd_d().decompress(out, max_output_size=raw_len)
        else:
            out = lz4.frame.decompress(out)
    if len(out) != raw_len:
        raise DataError(f"chunk {chunk} of {vid.hex()} decodes to {len(out)} bytes, not {raw_len}")
    return bytes(out)


def encode(data: bytes | memoryview, k: int, m: int) -> tuple[list[bytes], list[int], int]:
    """k data + m parity fragments, their CRC32Cs, and the payload size per fragment."""
    frags = driver(k, m).encode(bytes(data) if isinstance(data, memoryview) else data)
    frags = frags[:k + m]
    fsize = len(frags[0]) - EC_HEADER
    return frags, [crc32c.crc32c(f) for f in frags], fsize


def decode(frags: dict[int, bytes | bytearray], k: int, m: int, stored_len: int) -> bytes:
    """The chunk from any k fragments (index -> fragment)."""
    if len(frags) < k:
        raise DataError(f"only {len(frags)} of the {k} fragments needed are readable")
    if all(i in frags for i in range(k)):
        # Systematic code: the data fragments are the chunk, no arithmetic needed.
        return b"".join(memoryview(frags[i])[EC_HEADER:] for i in range(k))[:stored_len]
    return _dec(frags, k, m)[:stored_len]


def _dec(frags: dict[int, bytes | bytearray], k: int, m: int) -> bytes:
    try:
        return driver(k, m).decode([bytes(f) for f in frags.values()])
    except Exception as e:  # noqa: BLE001 - pyeclib raises its own hierarchy
        raise DataError(f"erasure decode failed: {e}") from None


def reconstruct(frags: dict[int, bytes | bytearray], k: int, m: int, missing: list[int]) -> dict[int, bytes]:
    """Rebuild the named fragments (data or parity) from any k others."""
    if len(frags) < k:
        raise DataError(f"only {len(frags)} fragments readable, {k} needed to rebuild")
    try:
        out = driver(k, m).reconstruct([bytes(f) for f in frags.values()], list(missing))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"fragment rebuild failed: {e}") from None
    return dict(zip(missing, out))
