"""The embedded configuration store: a small key -> JSON store in SQLite.

Keys are paths (`/vpools/default`, `/volumes/v1`) so the etcd store of the
clustered mode can offer the same calls (get, put, delete, list by prefix).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ovsfs.fsutil import fsync_path, mkdir_durable


class ConfigStore:
    def __init__(self, path: Path) -> None:
        mkdir_durable(path.parent)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")   # a registered volume survives a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)")
        # The database and its WAL (kept while the connection is open) are new names: make
        # them durable before the first put counts as done.
        fsync_path(path.parent)

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, json.dumps(value)))

    def delete(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM kv WHERE key=?", (key,))

    def list(self, prefix: str) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + "\uffff")).fetchall()
        return {k: json.loads(v) for k, v in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
