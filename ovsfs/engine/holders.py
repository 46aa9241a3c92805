"""Who holds which volume or snapshot open, and the one set of lifecycle rules.

Every door handle, every job (import, export, clone) and every legacy `Volume.acquire`
registers here, per volume, keyed by what it pins: the live volume (epoch None) or a
snapshot (its epoch, so a snapshot recreated under the same name is another object).
The catalog (Engine) asks `check_*` before deleting, renaming, rolling back, deleting a
snapshot or shrinking; each refuses with `Busy` naming the holders ("nbd client
127.0.0.1:50312", "import job 7"). Callers run the check and the change under the
volume's lock, and handles register under that lock too, so no open slips in between.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Iterable

from ovsfs.engine.api import Holder
from ovsfs.errors import AlreadyExists, Busy

Key = tuple[int | None, Holder]     # (snapshot epoch or None for the volume itself, who)


def legacy_holder(user: str) -> Holder:
    """The Holder for a `Volume.acquire(user)` string of the doors before the contract:
    "nbd:<cid>", "fuse", "snapshot:<name>" (the snapshot part is the epoch, not here)."""
    door, _, client = user.partition(":")
    if door == "snapshot":
        return Holder("fuse", "open file")
    if door == "fuse" and not client:
        return Holder("fuse", "open file")
    return Holder(door, client)


def describe(holders: Iterable[Holder]) -> str:
    """"nbd client unix, fuse client open file" (sorted, each once)."""
    return ", ".join(sorted({str(h) for h in holders}))


class HoldTable:
    """The holders of one volume (and of its snapshots). Thread-safe; counts repeats
    (one FUSE client may open a file twice)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Counter[Key] = Counter()

    def add(self, holder: Holder, epoch: int | None = None) -> None:
        with self._lock:
            self._held[(epoch, holder)] += 1

    def remove(self, holder: Holder, epoch: int | None = None) -> None:
        """Drop one hold; dropping what is not held is a no-op (close is idempotent)."""
        with self._lock:
            key = (epoch, holder)
            if self._held[key] > 1:
                self._held[key] -= 1
            else:
                self._held.pop(key, None)

    def holders(self, epochs: Iterable[int | None] | None = None) -> list[Holder]:
        """Holders of the given epochs (None in it: the live volume); all when epochs is None."""
        with self._lock:
            keys = list(self._held)
        want = None if epochs is None else set(epochs)
        return sorted({h for (e, h) in keys if want is None or e in want}, key=str)

    def held(self) -> bool:
        with self._lock:
            return bool(self._held)

    # ---- the rules --------------------------------------------------------------------

    def check_free(self, what: str, action: str, epochs: Iterable[int | None] | None = None,
                   ignore: Holder | None = None) -> None:
        """Busy("cannot <action> <what>: in use by <holders>") if anyone (but `ignore`)
        holds the given epochs (all when None)."""
        hs = [h for h in self.holders(epochs) if h != ignore]
        if hs:
            raise Busy(f"cannot {action} {what}: in use by {describe(hs)}")

    def check_delete_volume(self, name: str) -> None:
        self.check_free(f"volume {name}", "delete")

    def check_rename(self, name: str) -> None:
        self.check_free(f"volume {name}", "rename")

    def check_rollback(self, name: str, snap: str, later_epochs: Iterable[int]) -> None:
        """The volume itself, and every snapshot the rollback drops, must be free."""
        self.check_free(f"volume {name} to {snap}", "roll back", [None, *later_epochs])

    def check_delete_snapshot(self, name: str, snap: str, epoch: int) -> None:
        self.check_free(f"snapshot {name}@{snap}", "delete", [epoch])

    def check_shrink(self, name: str, ignore: Holder | None = None) -> None:
        """Shrinking a volume while another holder uses it: its disk would end under it."""
        self.check_free(f"volume {name}", "shrink", [None], ignore=ignore)


# Name reservations (volumes-to-be, e.g. a file being created in a FUSE vPool directory):
# name -> (vPool, holder). Every catalog keeps such a dict and decides with these two.

def check_unreserved(reserved: dict[str, tuple[str, Holder]], name: str, holder: Holder | None) -> None:
    """AlreadyExists if another holder has reserved `name`."""
    r = reserved.get(name)
    if r is not None and r[1] != holder:
        raise AlreadyExists(f"volume {name} already exists (a new file in vPool {r[0]}, held by {r[1]})")


def reserve(reserved: dict[str, tuple[str, Holder]], name: str, holder: Holder, vpool: str) -> None:
    """Reserve `name` in `vpool` for `holder` (again: a no-op). AlreadyExists if another
    holder has it, or this one in another vPool: names are global."""
    check_unreserved(reserved, name, holder)
    mine = reserved.get(name)
    if mine is not None and mine[0] != vpool:
        raise AlreadyExists(f"volume {name} is being created in vPool {mine[0]}")
    reserved[name] = (vpool, holder)
