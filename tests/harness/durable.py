"""The durable half of the power-cut filesystem: what a power cut leaves on the disk.

The backing directory holds only durable state, in a form of our own (not a plain tree):

    SRC/objects/<key>   the content of one file inode as of its last fsync/fdatasync
    SRC/tree.json       {"next": N, "dirs": {dir_key: {name: key}}}: each directory's entries as
                        of that directory's last fsync; "d0" is the root

Keys starting with "f" are files, with "d" directories. What a cut leaves is the tree reachable
from "d0"; files and directories that no durable entry reaches are garbage, removed at the next
start (an inode that was fsynced but never linked by a durable directory entry: lost, as on ext4).
The host itself never loses power, so nothing here needs a real fsync: SRC *is* the platter.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHUNK = 1 << 20


class DurableStore:
    def __init__(self, src: Path) -> None:
        self.src = src
        self.objects = src / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        tree = src / "tree.json"
        if tree.exists():
            data = json.loads(tree.read_text())
            self.next: int = data["next"]
            self.dirs: dict[str, dict[str, str]] = data["dirs"]
        else:
            self.next, self.dirs = 1, {"d0": {}}
            self.save()

    def new_key(self, kind: str) -> str:
        """A fresh key for an inode that becomes durable now; kind is "f" or "d"."""
        key = f"{kind}{self.next}"
        self.next += 1
        if kind == "d":
            self.dirs[key] = {}
        else:
            open(self.objects / key, "wb").close()  # a durable inode with no data yet
        return key

    def save(self) -> None:
        tmp = self.src / "tree.json.tmp"
        tmp.write_text(json.dumps({"next": self.next, "dirs": self.dirs}))
        os.replace(tmp, self.src / "tree.json")

    def set_dir(self, key: str, entries: dict[str, str]) -> None:
        self.dirs[key] = entries
        self.save()

    def write_ranges(self, key: str, src_fd: int, ranges: list[tuple[int, int]], shrink_to: int | None,
                     size: int) -> int:
        """Copy byte ranges [a, b) from src_fd into the object; the object ends at size bytes.

        shrink_to: the smallest size the file was truncated to since the last sync (the object is cut
        there first, so bytes the truncation removed never come back). Returns bytes copied.
        """
        copied = 0
        fd = os.open(self.objects / key, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if shrink_to is not None:
                os.ftruncate(fd, min(shrink_to, os.fstat(fd).st_size))
            for a, b in ranges:
                b = min(b, size)
                while a < b:
                    data = os.pread(src_fd, min(CHUNK, b - a), a)
                    if not data:
                        break
                    os.pwrite(fd, data, a)
                    a += len(data)
                    copied += len(data)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return copied

    def materialize(self, work: Path) -> dict[int, str]:
        """Rebuild the volatile view in the empty directory work from what is durable.

        Returns {st_ino in work: key}. Collects garbage: objects and directories no durable entry reaches.
        """
        inos: dict[int, str] = {os.stat(work).st_ino: "d0"}
        first_path: dict[str, Path] = {}
        seen_dirs = {"d0"}
        stack = [("d0", work)]
        while stack:
            dkey, dpath = stack.pop()
            for name, key in self.dirs.get(dkey, {}).items():
                p = dpath / name
                if key.startswith("d"):
                    if key in seen_dirs:  # the same directory durable under two parents: keep one
                        continue
                    seen_dirs.add(key)
                    p.mkdir()
                    stack.append((key, p))
                elif key in first_path:
                    os.link(first_path[key], p)
                    continue
                else:
                    shutil.copyfile(self.objects / key, p)
                    first_path[key] = p
                inos[os.stat(p).st_ino] = key
        # Garbage: what no durable directory entry reaches is gone, as after a real power cut.
        for obj in os.listdir(self.objects):
            if obj not in first_path:
                os.unlink(self.objects / obj)
        self.dirs = {k: v for k, v in self.dirs.items() if k in seen_dirs}
        self.save()
        return inos
