"""A node that registers itself and keeps its lease alive, in its own process so a test can
SIGSTOP / SIGCONT / SIGKILL it by PID. Prints "registered" (or "busy: ...") on stdout, then
"lost: ..." if its name is taken while it is away; logs go to stderr. Stops on SIGTERM.

    python -m tests.cluster.node_proc URLS PREFIX NAME TTL
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from ovsfs.cluster.etcd import EtcdStore
from ovsfs.cluster.nodes import NodeRecord, NodeRegistry
from ovsfs.errors import Busy


def main() -> int:
    urls, prefix, name, ttl = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    store = EtcdStore(urls, prefix=prefix)
    reg = NodeRegistry(store, on_lost=lambda why: print(f"lost: {why}", flush=True))
    try:
        reg.register(NodeRecord(name, failure_domain="fd", dtl="127.0.0.1:1"), ttl)
    except Busy as e:
        print(f"busy: {e}", flush=True)
        return 3
    print("registered", flush=True)
    done.wait()
    reg.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
