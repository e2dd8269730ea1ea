"""Small helpers shared by the benchmarks: percentiles, peak memory, machine load, timing, tables.

Timings on a shared CPU mean little without knowing what else ran: every benchmark prints
`foreign_cpu_load` first, and measures torch with a fixed thread count (`set_torch_threads`),
because two torch threads collapse when the other core is busy while one thread degrades gently.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GIB",
    "CpuLoad",
    "LoadMeter",
    "Measured",
    "Timer",
    "busy_cpu_seconds",
    "foreign_cpu_load",
    "format_bytes",
    "peak_rss_bytes",
    "percentile",
    "print_table",
    "process_cpu_seconds",
    "run_measured",
    "set_torch_threads",
    "timed",
    "wait_for_idle",
]

GIB = 1024**3


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: str
    peak_rss_bytes: int
    seconds: float


def run_measured(args: Sequence[str], *, cwd: Path | None = None) -> Measured:
    """Run a command to completion; its own peak RSS comes from ``wait4`` (not this process's)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(args), cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    stdout = proc.stdout.read()  # stderr passes through, so the child's progress stays visible
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(proc.returncode, stdout, usage.ru_maxrss * 1024, time.perf_counter() - start)


@dataclass(frozen=True)
class CpuLoad:
    foreign_cores: float
    """Cores kept busy by other processes (all busy time minus this process's own)."""
    cores: int

    def __str__(self) -> str:
        return f"{self.foreign_cores:.2f} of {self.cores} cores busy with other processes"


def busy_cpu_seconds() -> float:
    """CPU seconds all processes have been busy since boot (every core summed); OSError without /proc."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | str = "self", *, children: bool = False) -> float:
    """User + system CPU seconds of process ``pid`` (plus its waited-for children's with ``children``)."""
    # utime, stime, cutime, cstime: fields 14-17, counted after the ")" that ends the command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11 : 15 if children else 13]) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Cores kept busy by *other* processes between ``start()`` and ``stop()`` (None without /proc)."""

    def start(self) -> LoadMeter:
        try:
            self._start: tuple[float, float, float] | None = (
                busy_cpu_seconds(),
                process_cpu_seconds(children=True),
                time.perf_counter(),
            )
        except (OSError, ValueError):
            self._start = None
        return self

    def stop(self) -> float | None:
        if self._start is None:
            return None
        try:
            busy, own = busy_cpu_seconds(), process_cpu_seconds(children=True)
        except (OSError, ValueError):
            return None
        elapsed = time.perf_counter() - self._start[2]
        return max(busy - self._start[0] - (own - self._start[1]), 0.0) / elapsed


def foreign_cpu_load(seconds: float = 1.0) -> CpuLoad | None:
    """Average load from *other* processes over ``seconds``; None where /proc is unavailable."""
    meter = LoadMeter().start()
    time.sleep(seconds)
    cores = meter.stop()
    return None if cores is None else CpuLoad(cores, os.cpu_count() or 1)


def wait_for_idle(max_seconds: float, threshold: float, *, say: Callable[[str], object] = print) -> None:
    """Wait (at most ``max_seconds``) until other processes use less than ``threshold`` cores."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        load = foreign_cpu_load(3.0)
        if load is None or load.foreign_cores < threshold:
            return
        say(f"  waiting for an idle CPU: {load}")
    say("  the CPU did not become idle; measuring anyway")


def set_torch_threads(threads: int) -> str:
    """Fix torch's intra-op threads; returns a line saying so, for the report."""
    import torch

    torch.set_num_threads(threads)
    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall) and ``t.cpu_seconds`` (this process).

    On a busy machine the CPU time of a single-threaded block is close to what the wall time would
    be on an idle one, so reporting both shows how much of a slow figure is contention.
    """

    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def __enter__(self) -> Timer:
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


@contextmanager
def timed(label: str) -> Iterator[Timer]:
    """A `Timer` that also prints ``label: N s`` to stderr when the block ends."""
    with Timer() as timer:
        yield timer
    print(f"  {label}: {timer.seconds:.1f} s", file=sys.stderr)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str = "") -> None:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    if title:
        print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
