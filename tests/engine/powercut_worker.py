"""An engine in its own process for the power-cut tests, driven by JSON lines on stdin.

Usage: python -m tests.engine.powercut_worker STATE_DIR SIZE [ENGINE_CONFIG_JSON]
Opens (creating if needed) vPool "default" and volume "v" of SIZE bytes, prints
{"ready": ..., "snapshots": [...]} and then answers one JSON line per command:
  {"op": "write", "writes": [[offset, length, tag], ...]}   one writev; data = payload(tag, length)
  {"op": "flush"} | {"op": "snapshot", "name": N} | {"op": "scrub"} | {"op": "sync"} (all on the backend)
  {"op": "read", "snapshot": N or null}                    -> {"data": base64 of the whole volume}
Errors come back as {"error": "Type: message"}: the test decides what they mean.
A power cut SIGKILLs this process; nothing here is ever closed cleanly on purpose.
"""

from __future__ import annotations

import base64
import json
import random
import sys
from pathlib import Path
from typing import Any

from ovsfs.engine.engine import Engine
from tests.engine.helpers import small_config

# Small SCOs and TLogs: roll-overs (and the map commits at TLog seals) all the time.
CONFIG = {"sco_clusters": 8, "tlog_scos": 2, "backend_checkpoint_tlogs": 2, "write_buffer_size": 8 << 20}


def payload(tag: int, length: int) -> bytes:
    """The bytes of write number tag: unique per write, so any misplaced or torn byte shows."""
    return random.Random(tag).randbytes(length)


def main() -> None:
    state, size = Path(sys.argv[1]), int(sys.argv[2])
    overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    eng = Engine(small_config(state, **{**CONFIG, **overrides}))
    eng.open()
    if not eng.list_vpools():
        eng.create_vpool("default")
    if not eng.list_volumes():
        eng.create_volume("v", size)
    vol = eng.volume("v")
    print(json.dumps({"ready": True, "snapshots": [s["name"] for s in vol.list_snapshots()]}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        out: dict[str, Any] = {"ok": True}
        try:
            op = cmd["op"]
            if op == "write":
                vol.writev([(off, payload(tag, n)) for off, n, tag in cmd["writes"]])
            elif op == "flush":
                vol.flush()
            elif op == "snapshot":
                vol.create_snapshot(cmd["name"])
            elif op == "sync":
                vol.sync(timeout=cmd.get("timeout"))
            elif op == "scrub":
                eng.scrub()
            elif op == "read":
                out["data"] = base64.b64encode(vol.read(0, vol.size, snapshot=cmd.get("snapshot"))).decode()
            else:
                out = {"error": f"unknown op {op}"}
        except Exception as e:  # reported to the test, which fails on any error it does not expect
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
