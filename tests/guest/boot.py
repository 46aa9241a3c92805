"""Boots the test guest in QEMU (TCG) and reads its serial console.

`boot(qemu_argv, job, ...)` runs one boot to its end (the guest powers off by itself) and
returns a `BootResult`; `Guest` is the same boot held open, for tests that act while the
guest runs (e.g. SIGKILL the back end after the guest acknowledged a few chunks).

`qemu_argv` is the command without the kernel: the QEMU binary (or a launcher such as
`ovsfs qemu --`) plus machine, memory and disk options; `tcg_args()`, `memfd_args()` and
`vhost_args()` make the usual pieces. QEMU is started in its own session and stopped by its
PID only (SIGKILL on a timeout); nothing is matched by name.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.guest.image import GuestImage, ensure_image

QEMU = "qemu-system-x86_64"
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"


def tcg_args(mem_mib: int | None = 256, cpus: int = 1) -> list[str]:
    """Machine-independent options: TCG (KVM guests hang on these machines), `cpus` vCPUs,
    `mem_mib` MiB of RAM (None: no -m, e.g. when `ovsfs qemu-args` gives it), the serial
    console on stdout, nothing else; `-no-reboot` turns a guest panic into an exit."""
    mem = ["-m", f"{mem_mib}M"] if mem_mib is not None else []
    return ["-accel", "tcg", *mem, "-smp", str(cpus), "-nodefaults", "-display", "none",
            "-serial", "stdio", "-no-reboot"]


def memfd_args(mem_mib: int = 256) -> list[str]:
    """Guest RAM in a shared memfd: a vhost-user back end maps it (QEMU requires share=on)."""
    return ["-machine", "q35,memory-backend=mem",
            "-object", f"memory-backend-memfd,id=mem,size={mem_mib}M,share=on"]


def vhost_args(socket_path: str | Path, *, reconnect: int = 0, num_queues: int | None = None,
               ident: str = "d0") -> list[str]:
    """A vhost-user-blk disk (the guest's /dev/vda) on the back end at `socket_path`;
    `reconnect`: seconds between QEMU's attempts to reconnect after the back end went away."""
    chardev = f"socket,id=c{ident},path={socket_path}" + (f",reconnect={reconnect}" if reconnect else "")
    device = f"vhost-user-blk-pci,chardev=c{ident},id={ident}" + (f",num-queues={num_queues}" if num_queues else "")
    return ["-chardev", chardev, "-device", device]


def kernel_args(image: GuestImage, job: str, seed: int, mib: int, count: int = 0, writers: int = 1) -> list[str]:
    append = (f"{KERNEL_CMDLINE} ovsfs.job={job} ovsfs.seed={seed} ovsfs.mib={mib} ovsfs.count={count} "
              f"ovsfs.writers={writers}")
    return ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append]


_KV = re.compile(r"(\w+)=(\S*)")


@dataclass
class BootResult:
    """What one boot printed. `console` is the serial output, `stderr` QEMU's own messages."""

    console: str
    stderr: str
    returncode: int | None
    timed_out: bool
    seconds: float
    results: dict[str, dict[str, str]] = field(default_factory=dict)   # "DEV" -> {"size": ...}
    acked: list[int] = field(default_factory=list)                     # writeloop ACKED n, in order
    writing: list[int] = field(default_factory=list)                   # writeloop WRITING n (started)
    errors: list[str] = field(default_factory=list)                    # "OVSFS ERROR ..." lines

    @classmethod
    def parse(cls, console: str, stderr: str, returncode: int | None, timed_out: bool, seconds: float) -> "BootResult":
        r = cls(console, stderr, returncode, timed_out, seconds)
        for raw in console.splitlines():
            line = raw.strip("\r\n\x00 ")
            if line.startswith("ACKED "):
                r.acked.append(int(line.split()[1]))
            elif line.startswith("WRITING "):
                r.writing.append(int(line.split()[1]))
            elif line.startswith("OVSFS ERROR"):
                r.errors.append(line)
            elif line.startswith("OVSFS "):
                tag, _, rest = line[len("OVSFS "):].partition(" ")
                r.results[tag] = dict(_KV.findall(rest))
        return r

    @property
    def done(self) -> bool:
        """The guest's job ran to its end with rc 0 and the guest powered itself off."""
        return self.results.get("DONE", {}).get("rc") == "0" and not self.timed_out and self.returncode == 0

    @property
    def dev(self) -> dict[str, str]:
        return self.results.get("DEV", {})

    def explain(self) -> str:
        """A failure message: how the boot ended and the console's tail."""
        tail = "\n".join(self.console.splitlines()[-25:])
        return (f"qemu rc={self.returncode} timed_out={self.timed_out} after {self.seconds:.1f} s\n"
                f"--- console tail ---\n{tail}\n--- qemu stderr ---\n{self.stderr[-2000:]}")


class Guest:
    """One running QEMU; lines of its serial console are collected by a reader thread."""

    def __init__(self, qemu_argv: list[str], job: str, seed: int = 1, mib: int = 4, count: int = 0,
                 image: GuestImage | None = None, env: dict[str, str] | None = None, writers: int = 1) -> None:
        self.image = image or ensure_image()
        self.argv = [*qemu_argv, *kernel_args(self.image, job, seed, mib, count, writers)]
        self._lines: list[str] = []
        self._err: list[str] = []
        self._times: list[float] = []
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.timed_out = False
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self._lines), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._readers:
            t.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream: Any, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                into.append(raw.decode(errors="replace"))
                if into is self._lines:
                    self._times.append(time.monotonic())
                self._cond.notify_all()
        stream.close()

    def timeline(self) -> list[tuple[float, str]]:
        """(monotonic arrival time, line) of every console line so far."""
        with self._cond:
            return list(zip(self._times, self._lines))

    def write_seconds(self) -> float:
        """Median host-seen time from "WRITING n" to "ACKED n" in a writeloop so far: how long
        one chunk's write + fsync takes (0.0 before the first ACK)."""
        seen: dict[str, float] = {}
        took = []
        for t, line in self.timeline():
            word, _, n = line.strip().partition(" ")
            if word == "WRITING":
                seen[n] = t
            elif word == "ACKED" and n in seen:
                took.append(t - seen[n])
        return sorted(took)[len(took) // 2] if took else 0.0

    def console(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def wait_for(self, regex: str, timeout: float) -> re.Match[str] | None:
        """The first console line matching `regex` (searched from the start), or None if QEMU
        exits or `timeout` seconds pass first."""
        pat = re.compile(regex)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self._lines[seen:]:
                    if m := pat.search(line):
                        return m
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.2))

    def kill(self) -> None:
        """SIGKILL QEMU by its PID (a no-op once it has exited)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> BootResult:
        """Wait for QEMU to exit (the guest powers off at the end of its job); after `timeout`
        seconds QEMU is killed and the result says timed_out."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
            self.proc.wait(30)
        for t in self._readers:
            t.join(10)
        return BootResult.parse(self.console(), "".join(self._err), self.proc.returncode, self.timed_out,
                                time.monotonic() - self.started)

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.proc.wait(30)


def boot(qemu_argv: list[str], job: str, seed: int = 1, mib: int = 4, timeout: float = 90.0,
         count: int = 0, image: GuestImage | None = None) -> BootResult:
    """Boot the guest with `job` (write | verify | trim | writeloop | info) and return what it printed.
    The guest powers itself off; after `timeout` seconds QEMU is SIGKILLed by PID."""
    with Guest(qemu_argv, job, seed=seed, mib=mib, count=count, image=image) as g:
        return g.wait(timeout)


@dataclass
class CrashRun:
    """A writeloop whose back end was killed and restarted while the guest wrote."""

    result: BootResult
    acked_before: list[int]     # ACKED before the kill
    acked_after: list[int]      # ACKED after it: the guest resumed on the restarted back end
    chunk_seconds: float        # one chunk's write + fsync, as the host saw it before the kill
    qemu_alive: bool            # QEMU still ran when we stopped it
    writers: int                # loops writing at once (writer j writes chunks n = j mod writers)
    started_unacked: list[int]  # chunks started (WRITING) but not acknowledged at the kill

    @property
    def resumed(self) -> bool:
        """Every writer had a chunk acknowledged after the kill."""
        return {n % self.writers for n in self.acked_after} == set(range(self.writers))

    @property
    def clean(self) -> bool:
        """Every writer resumed, or the guest failed visibly: an I/O error reported by the
        guest or QEMU exiting by itself with an error code. A writer stuck on I/O (e.g. a
        request lost in the reconnect), or QEMU dying by a signal, is not clean."""
        if self.resumed:
            return True
        return bool(self.result.errors) or (not self.qemu_alive and (self.result.returncode or 0) > 0)

    def summary(self) -> str:
        r = self.result
        return (f"one chunk's write + fsync took {self.chunk_seconds * 1000:.0f} ms; ACKED "
                f"{len(self.acked_before)} chunks before the kill, {len(self.acked_after)} after "
                f"({self.writers} writers; started, unacknowledged at the kill: {self.started_unacked}); "
                f"guest errors {r.errors}; qemu alive={self.qemu_alive} rc={r.returncode}; "
                f"qemu stderr {r.stderr.strip()[-300:]!r}")


def writeloop_with_crash(qemu_argv: list[str], kill: Callable[[], None], restart: Callable[[], None],
                         seed: int, mib: int, image: GuestImage | None = None, kill_at: int = 8,
                         resume_to: int = 60, resume_timeout: float = 15.0, writers: int = 1) -> CrashRun:
    """Boot a writeloop, `kill()` the back end while chunk `kill_at` is in flight (half-way
    through a write + fsync, as long as the previous chunks took: the guest prints WRITING n
    just before each write), `restart()` it, give the guest `resume_timeout` s to go on to
    ACKED `resume_to`, then stop QEMU (SIGKILL by PID). `writers` loops write at once."""
    with Guest(qemu_argv, "writeloop", seed=seed, mib=mib, image=image, writers=writers) as g:
        if not g.wait_for(rf"^WRITING {kill_at}\b", timeout=60):
            raise AssertionError(f"the writeloop never reached chunk {kill_at}:\n{g.wait(1).explain()}")
        chunk_s = g.write_seconds()
        time.sleep(chunk_s / 2)
        kill()
        killed_at = len(g.timeline())
        restart()
        g.wait_for(rf"^ACKED {resume_to}\b", timeout=resume_timeout)
        alive = g.proc.poll() is None
        g.kill()
        res = g.wait(30)
    seen = BootResult.parse("".join(res.console.splitlines(keepends=True)[:killed_at]), "", None, False, 0)
    return CrashRun(res, seen.acked, res.acked[len(seen.acked):], chunk_s, alive, writers,
                    sorted(set(seen.writing) - set(seen.acked)))
