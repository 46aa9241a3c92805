"""Manifests: which fragments of which object version live where, with their CRCs.

Binary and compact on purpose: every object has one, kept in RAM by the proxy and
replicated on m+1 ASDs. The ASD ids used by an object are listed once and fragments
refer to them by a one-byte index, so a 64 MiB object under (8,2) with 4 MiB
fragments (2 chunks x 10 fragments) costs about 350 bytes.

Layout (big endian):
  header   magic 'OM', version u8, seq u64, vid 8s, size u64, k m c x u8*4,
           compression u8, encryption u8, key id u16, max fragment size u32,
           chunk size u64, ASD count u8, replica count u8, chunk count u32
  ASDs     16 bytes each (uuid)
  replicas u8 index each (ASDs holding a copy of this manifest)
  chunks   stored length u32, fragment size u32, flags u8,
           then k+m times (ASD index u8 (255 = not placed), CRC32C u32)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ovsfs.backend.policy import COMPRESSIONS, ENCRYPTIONS, Policy, Preset, chunk_layout
from ovsfs.errors import DataError

_HEAD = struct.Struct(">2sBQ8sQBBBBBBHIQBBI")
_CHUNK = struct.Struct(">IIB")
_FRAG = struct.Struct(">BI")
NONE = 255
CHUNK_COMPRESSED = 1  # the chunk went through the compressor (it helped)


@dataclass
class Chunk:
    stored_len: int        # bytes fed to the erasure coder (after compression/encryption)
    frag_size: int         # payload bytes per fragment, without the EC header
    flags: int = 0
    asds: list[int] = field(default_factory=list)   # per fragment: index into Manifest.asds
    crcs: list[int] = field(default_factory=list)   # per fragment: CRC32C of the whole fragment


@dataclass
class Manifest:
    seq: int
    vid: bytes
    size: int
    policy: Policy
    compression: str
    encryption: str
    key_id: int
    max_fragment_size: int
    chunk_size: int
    asds: list[str] = field(default_factory=list)      # hex uuids
    replicas: list[int] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def raw(self) -> bool:
        """True when fragments hold the object's bytes as they are (partial reads are cheap)."""
        return self.compression == "none" and self.encryption == "none"

    def asd_index(self, asd_id: str) -> int:
        if asd_id not in self.asds:
            if len(self.asds) >= NONE:
                raise DataError("manifest cannot name more than 254 ASDs")
            self.asds.append(asd_id)
        return self.asds.index(asd_id)

    def fragment_asd(self, chunk: int, frag: int) -> str | None:
        i = self.chunks[chunk].asds[frag]
        return None if i == NONE else self.asds[i]

    def set_fragment(self, chunk: int, frag: int, asd_id: str | None, crc: int | None = None) -> None:
        c = self.chunks[chunk]
        c.asds[frag] = NONE if asd_id is None else self.asd_index(asd_id)
        if crc is not None:
            c.crcs[frag] = crc

    def replica_ids(self) -> list[str]:
        return [self.asds[i] for i in self.replicas]

    def chunk_len(self, i: int) -> int:
        return min(self.chunk_size, self.size - i * self.chunk_size)

    def fragment_key(self, chunk: int, frag: int) -> str:
        return f"f/{self.vid.hex()}/{chunk}/{frag}"

    def used_asds(self) -> set[str]:
        return {self.asds[i] for c in self.chunks for i in c.asds if i != NONE}

    def encode(self) -> bytes:
        p = self.policy
        out = [_HEAD.pack(b"OM", 1, self.seq, self.vid, self.size, p.k, p.m, p.c, p.x,
                          COMPRESSIONS.index(self.compression), ENCRYPTIONS.index(self.encryption),
                          self.key_id, self.max_fragment_size, self.chunk_size,
                          len(self.asds), len(self.replicas), len(self.chunks))]
        out += [bytes.fromhex(a) for a in self.asds]
        out.append(bytes(self.replicas))
        for c in self.chunks:
            out.append(_CHUNK.pack(c.stored_len, c.frag_size, c.flags))
            out += [_FRAG.pack(a, crc) for a, crc in zip(c.asds, c.crcs)]
        return b"".join(out)

    @classmethod
    def decode(cls, data: bytes) -> "Manifest":
        try:
            (magic, ver, seq, vid, size, k, m, c, x, comp, enc, key_id, mfs, chunk_size,
             nasd, nrep, nchunk) = _HEAD.unpack_from(data, 0)
            if magic != b"OM" or ver != 1:
                raise DataError("not a manifest")
            pos = _HEAD.size
            asds = [data[pos + 16 * i:pos + 16 * (i + 1)].hex() for i in range(nasd)]
            pos += 16 * nasd
            replicas = list(data[pos:pos + nrep])
            pos += nrep
            chunks = []
            for _ in range(nchunk):
                stored, fsz, flags = _CHUNK.unpack_from(data, pos)
                pos += _CHUNK.size
                ch = Chunk(stored, fsz, flags)
                for _ in range(k + m):
                    a, crc = _FRAG.unpack_from(data, pos)
                    pos += _FRAG.size
                    ch.asds.append(a)
                    ch.crcs.append(crc)
                chunks.append(ch)
            if pos != len(data) or any(len(a) != 32 for a in asds):
                raise DataError("manifest has trailing or missing bytes")
            return cls(seq, vid, size, Policy(k, m, c, x), COMPRESSIONS[comp], ENCRYPTIONS[enc],
                       key_id, mfs, chunk_size, asds, replicas, chunks)
        except (struct.error, IndexError) as e:
            raise DataError(f"damaged manifest: {e}") from None

    @classmethod
    def sample(cls, policy: Policy, preset: Preset, size: int) -> "Manifest":
        """A fully placed manifest of the given shape: used by `explain` to size metadata."""
        chunk, n = chunk_layout(size, policy.k, preset.max_fragment_size)
        width = policy.k + policy.m
        man = cls(0, bytes(8), size, policy, preset.compression, preset.encryption, 0,
                  preset.max_fragment_size, chunk, [f"{i:032x}" for i in range(width)],
                  list(range(policy.m + 1)))
        for i in range(n):
            man.chunks.append(Chunk(man.chunk_len(i), -(-man.chunk_len(i) // policy.k), 0,
                                    list(range(width)), [0] * width))
        return man


# -- tombstones ------------------------------------------------------------------------
# A deleted object's manifest key holds a tombstone instead: its sequence number is
# above every manifest of the object, so a late ASD bringing back an old manifest
# loses to it (highest sequence wins). A namespace record (key n/NS) is either live
# (b"\x02" + seq + preset JSON; the older b"\x01" + preset has seq 0) or a tombstone
# (b"\x00" + seq): objects of the namespace with lower sequence numbers are dead.
_TOMB = struct.Struct(">2sBQ")
_NSREC = struct.Struct(">BQ")


@dataclass(frozen=True)
class Tombstone:
    seq: int

    def encode(self) -> bytes:
        return _TOMB.pack(b"OT", 1, self.seq)


def decode_record(data: bytes) -> "Manifest | Tombstone":
    """What an ASD holds under a manifest key: a manifest or a tombstone (DataError if neither)."""
    if data[:2] == b"OT":
        if len(data) != _TOMB.size:
            raise DataError("damaged tombstone")
        return Tombstone(_TOMB.unpack(data)[2])
    return Manifest.decode(data)


@dataclass(frozen=True)
class NsRecord:
    seq: int
    live: bool
    preset: bytes = b""

    def encode(self) -> bytes:
        return _NSREC.pack(2 if self.live else 0, self.seq) + (self.preset if self.live else b"")

    @classmethod
    def decode(cls, data: bytes) -> "NsRecord":
        if data[:1] == b"\x01":               # before sequence numbers: oldest possible
            return cls(0, True, bytes(data[1:]))
        if len(data) < _NSREC.size or data[0] not in (0, 2):
            raise DataError("damaged namespace record")
        kind, seq = _NSREC.unpack_from(data, 0)
        return cls(seq, kind == 2, bytes(data[_NSREC.size:]) if kind == 2 else b"")
