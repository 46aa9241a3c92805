"""The embedded configuration store: a small key -> JSON store in SQLite.

Keys are paths (`/vpools/default`, `/volumes/v1`) so the etcd store of the
clustered mode (`ovsfs/cluster/etcd.py`) offers the same calls (get, put, delete, list by
prefix, and get_rev / cas for ownership records).

Revisions work as etcd's mod_revision: one counter for the whole store, bumped by every put
and delete and never reused, so a key deleted and written again never shows an old revision
(no ABA for `cas`). Rows from before revisions existed read as revision 1.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from ovsfs.fsutil import fsync_path, mkdir_durable


class ConfigStore:
    def __init__(self, path: Path) -> None:
        mkdir_durable(path.parent)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")   # a registered volume survives a power cut
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT)")
        cols = [row[1] for row in self._db.execute("PRAGMA table_info(kv)")]
        if "rev" not in cols:   # a store written before revisions: its rows count as revision 1
            self._db.execute("ALTER TABLE kv ADD COLUMN rev INTEGER NOT NULL DEFAULT 1")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('rev', 1)")
        # The database and its WAL (kept while the connection is open) are new names: make
        # them durable before the first put counts as done.
        fsync_path(path.parent)

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def get_rev(self, key: str) -> tuple[Any | None, int]:
        """(value, revision of its last put); (None, 0) when the key does not exist."""
        with self._lock:
            row = self._db.execute("SELECT value, rev FROM kv WHERE key=?", (key,)).fetchone()
        return (None, 0) if row is None else (json.loads(row[0]), int(row[1]))

    def put(self, key: str, value: Any) -> None:
        with self._lock, self._txn():
            rev = self._next_rev()
            self._db.execute("INSERT OR REPLACE INTO kv (key, value, rev) VALUES (?, ?, ?)",
                             (key, json.dumps(value), rev))

    def cas(self, key: str, expected_rev: int, value: Any) -> bool:
        """Put `value` only if `key`'s revision is still `expected_rev` (0: the key must not
        exist). True when written, False when the key changed meanwhile."""
        with self._lock, self._txn():
            row = self._db.execute("SELECT rev FROM kv WHERE key=?", (key,)).fetchone()
            if (0 if row is None else int(row[0])) != expected_rev:
                return False
            rev = self._next_rev()
            self._db.execute("INSERT OR REPLACE INTO kv (key, value, rev) VALUES (?, ?, ?)",
                             (key, json.dumps(value), rev))
            return True

    def delete(self, key: str) -> None:
        with self._lock, self._txn():
            if self._db.execute("DELETE FROM kv WHERE key=?", (key,)).rowcount:
                self._next_rev()   # as etcd: a delete is a revision too

    def list(self, prefix: str) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                (prefix, prefix + "\uffff")).fetchall()
        return {k: json.loads(v) for k, v in rows}

    @contextlib.contextmanager
    def _txn(self) -> Iterator[None]:
        """One SQLite transaction (one fsync): the revision counter and the row change
        together. Called with self._lock held."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _next_rev(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name='rev'")
        return int(self._db.execute("SELECT value FROM meta WHERE name='rev'").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
