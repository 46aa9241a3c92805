"""How the CLI shows things: tables, key/value blocks and progress."""

from __future__ import annotations

import sys
from typing import Any, Callable

Column = tuple[str, "str | Callable[[dict[str, Any]], Any]"]


def print_table(rows: list[dict[str, Any]], columns: list[Column]) -> None:
    cells = [[h for h, _ in columns]]
    for row in rows:
        cells.append([str(get(row) if callable(get) else row.get(get, "")) for _, get in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def print_info(info: dict[str, Any]) -> None:
    width = max((len(k) for k in info), default=0) + 1
    for k, v in info.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
        elif isinstance(v, list):
            v = ", ".join(str(x) for x in v) or "-"
        print(f"{k + ':':<{width}} {'-' if v is None else v}")


class Progress:
    """A tqdm bar on a terminal; otherwise one plain line per ~10% on stderr.

    `unit` "B" counts bytes; anything else (e.g. "objects") counts items. A job that
    starts over (a second repair pass) restarts the bar and the percentages."""

    def __init__(self, what: str, unit: str = "B") -> None:
        self.what = what
        self.unit = unit
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.next_pct = 10
        self.last = 0

    def __call__(self, done: int, total: int) -> None:
        if done < self.last:
            self.next_pct = 10  # started over
        self.last = done
        if self.tty:
            if self.bar is None:
                import shutil

                from tqdm import tqdm

                # A terminal that reports a 0x0 size (a bare pty) would hide the bar: assume 80x24.
                cols, rows = shutil.get_terminal_size()
                byte = self.unit == "B"
                self.bar = tqdm(total=total, desc=self.what, unit=self.unit, unit_scale=byte, unit_divisor=1024,
                                file=sys.stderr, leave=False, ncols=cols, nrows=rows)
            if self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)
            return
        pct = done * 100 // total if total else 100
        if pct >= self.next_pct:
            unit = "bytes" if self.unit == "B" else self.unit
            print(f"ovsfs: {self.what}: {pct}% ({done} of {total} {unit})", file=sys.stderr, flush=True)
            self.next_pct = (pct // 10 + 1) * 10

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
