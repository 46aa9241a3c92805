"""A writer process for the crash test: writes a known schedule, prints each acknowledgement.

Usage: python crash_writer.py STATE_DIR SEED
Write i goes to offset offset_of(i) with content content_of(i); "ack i" is printed
(and flushed to the pipe) only after writev returned, which is the engine's
acknowledgement. The test kills this process with SIGKILL at a random moment.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from ovsfs.engine.engine import Engine
from tests.engine.helpers import small_config

CS = 4096
SIZE = 64 << 20
BATCH = 8


def offset_of(seed: int, i: int) -> int:
    return random.Random(seed * 1_000_003 + i).randrange(SIZE // CS) * CS


def content_of(i: int) -> bytes:
    return i.to_bytes(8, "little") * (CS // 8)


def main() -> None:
    state, seed = Path(sys.argv[1]), int(sys.argv[2])
    eng = Engine(small_config(state, sco_clusters=64, write_buffer_size=64 << 20))
    eng.open()
    if not eng.list_vpools():
        eng.create_vpool("default")
        eng.create_volume("v", SIZE)
    vol = eng.volume("v")
    print("ready", flush=True)
    i = 0
    while True:
        vol.writev([(offset_of(seed, j), content_of(j)) for j in range(i, i + BATCH)])
        i += BATCH
        if i % 512 == 0:
            vol.create_snapshot(f"s{i}")
        print(f"ack {i - 1}", flush=True)


if __name__ == "__main__":
    main()
