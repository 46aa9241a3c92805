"""A stand-alone FUSE node for tests and benchmarks: `python -m ovsfs.fuse STATE_DIR`.

Opens a real Engine on STATE_DIR (creating vPool "default" if missing), serves the FUSE
mount (and the NBD door when ovsfs.nbd.server exists and --nbd is given) until SIGTERM or
SIGINT, then unmounts and closes the engine. Prints "READY <mountpoint>" once mounted.
The node daemon (ovsfs/daemon.py) does the same inside its own nursery.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from ovsfs.config import load


async def amain(args: argparse.Namespace) -> None:
    from ovsfs.backend.local import LocalStore
    from ovsfs.engine.engine import Engine
    from ovsfs.errors import AlreadyExists
    from ovsfs.fuse.mount import serve

    cfg = load(args.config, Path(args.state))
    if args.allow_other:
        cfg.fuse.allow_other = True
    engine = Engine(cfg, LocalStore(cfg.path(cfg.backend.path)))
    await trio.to_thread.run_sync(engine.open)
    try:
        try:
            engine.catalog.create_vpool("default")
        except AlreadyExists:
            pass
        async with trio.open_nursery() as nursery:
            mnt = await nursery.start(serve, engine, cfg)
            if args.nbd:
                from ovsfs.nbd.server import serve as nbd_serve
                await nursery.start(nbd_serve, engine, cfg)
            print(f"READY {mnt}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    logging.getLogger("ovsfs.fuse").info("signal %d: stopping", sig)
                    break
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(engine.close)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ovsfs.fuse")
    ap.add_argument("state")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--nbd", action="store_true", help="serve the NBD door too")
    ap.add_argument("--allow-other", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(amain, args)


if __name__ == "__main__":
    main()
