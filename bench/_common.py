"""Shared helpers for the benchmarks: timing statistics, memory readings, tables.

Stdlib only. Importing it puts the repository root on sys.path, so that the
benchmarks measure the checkout's pactors rather than an installed copy. The
multiprocessing peers do not import it: they run from _mp_peer.py.

The benchmarks are measurements, not tests: they print figures and ratios
against peers measured in the same run, and never assert on timing.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

MIB = 1024 * 1024

# Benchmark the checkout's pactors, not a copy installed in site-packages.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(1, REPO)


# Timing -------------------------------------------------------------------

def median(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    n = len(ordered)
    if n == 0:
        raise ValueError("no samples")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100) by linear interpolation between ranks."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Stats:
    """Summary of a list of durations in seconds."""

    def __init__(self, name: str, samples: Sequence[float]) -> None:
        self.name = name
        self.samples = list(samples)
        self.n = len(self.samples)
        self.median = median(self.samples)
        self.p90 = percentile(self.samples, 90)
        self.min = min(self.samples)
        self.max = max(self.samples)

    def __repr__(self) -> str:
        return (f"<Stats {self.name}: n={self.n} median={ms(self.median)} ms "
                f"p90={ms(self.p90)} ms>")


def measure(name: str, fn: Callable[[], Any], runs: int, warmup: int = 5,
            budget_s: float | None = None) -> Stats:
    """Times ``fn()`` ``runs`` times after ``warmup`` untimed calls.

    With ``budget_s`` the loop stops early once that much time has gone by
    (at least 10 timed runs are kept), so a slow peer cannot blow the
    script's time limit.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    gc.collect()
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if budget_s is not None and len(samples) >= 10 \
                and time.perf_counter() - start > budget_s:
            break
    return Stats(name, samples)


def measure_round_robin(cases: dict[str, Callable[[], Any]], runs: int, warmup: int = 5,
                        budget_s: float | None = None) -> dict[str, Stats]:
    """Times every case once per round, ``runs`` rounds after ``warmup``: a
    machine whose speed drifts during the run slows every case alike, so the
    ratios between them hold. ``budget_s`` stops early (10 rounds at least)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    start = time.perf_counter()
    gc.collect()
    for i in range(runs):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if budget_s is not None and i + 1 >= 10 and time.perf_counter() - start > budget_s:
            break
    return {name: Stats(name, s) for name, s in samples.items()}


async def ameasure(name: str, fn: Callable[[], Awaitable[Any]], runs: int, warmup: int = 5,
                   budget_s: float | None = None) -> Stats:
    """``measure`` for an async callable."""
    for _ in range(warmup):
        await fn()
    samples: list[float] = []
    start = time.perf_counter()
    gc.collect()
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
        if budget_s is not None and len(samples) >= 10 \
                and time.perf_counter() - start > budget_s:
            break
    return Stats(name, samples)


def ms(seconds: float, digits: int = 2) -> str:
    return f"{seconds * 1000:.{digits}f}"


def ratio(ours: float, theirs: float) -> str:
    """``ours / theirs`` formatted as "0.12x"."""
    if theirs == 0:
        return "n/a"
    r = ours / theirs
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


# Memory -------------------------------------------------------------------

def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields of /proc/<pid>/smaps_rollup, in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def uss(pid: int) -> int:
    """Unique set size: the memory only this process maps (Private_Clean + Private_Dirty)."""
    f = smaps_rollup(pid)
    return f.get("Private_Clean", 0) + f.get("Private_Dirty", 0)


def memory(pid: int) -> dict[str, int]:
    """USS, PSS and RSS of ``pid``, in bytes."""
    f = smaps_rollup(pid)
    return {"uss": f.get("Private_Clean", 0) + f.get("Private_Dirty", 0),
            "pss": f.get("Pss", 0), "rss": f.get("Rss", 0)}


def mib(nbytes: float, digits: int = 2) -> str:
    return f"{nbytes / MIB:.{digits}f}"


def ppid_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may hold spaces and parentheses: split after the last ")".
    return int(stat[stat.rindex(")") + 2:].split()[1])


# Output -------------------------------------------------------------------

def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> str:
    """A markdown table, columns padded for reading in a terminal."""
    body = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = []
    if title:
        out.append(f"### {title}\n")
    out.append(line(list(headers)))
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out.extend(line(row) for row in body)
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                title: str | None = None) -> None:
    print(table(headers, rows, title), flush=True)
    print(flush=True)


def machine() -> str:
    """One line describing the machine the figures come from."""
    import platform

    return (f"{os.cpu_count()} CPUs ({_cpu_model()}), Linux {platform.release()}, "
            f"Python {platform.python_version()} ({sys.executable})")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def target(met: bool) -> str:
    return "met" if met else "NOT met"


# Peers --------------------------------------------------------------------

def run_mp_peer(*args: object, timeout: float = 60) -> dict[str, Any]:
    """Runs a multiprocessing measurement of _mp_peer.py in a fresh interpreter.

    Its own small main module keeps the "spawn"/"forkserver" children from
    re-running a benchmark script (see _mp_peer.py).
    """
    import json
    import subprocess

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mp_peer.py")
    out = subprocess.run([sys.executable, script, *map(str, args)], check=True,
                         stdout=subprocess.PIPE, timeout=timeout)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def enable_bytecode_cache() -> None:
    """Lets this interpreter write __pycache__ for bench/ even under PYTHONDONTWRITEBYTECODE.

    Actors spawned by module name and the peers' children import bench/
    modules: without a cache each of them would compile the source again.
    """
    sys.dont_write_bytecode = False
