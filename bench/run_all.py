"""Runs every benchmark in sequence and prints all their tables.

Each benchmark runs in an interpreter of its own, exactly as
``python bench/<name>.py`` would, so that each has its own supervisor and
none inherits another's memory. The machine and its load average are
printed first: the figures are only comparable within one run.

Run: /opt/packxd/venv/bin/python bench/run_all.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _common import machine

BENCHMARKS = ["bench_spawn.py", "bench_messages.py", "bench_memory.py", "bench_namespaces.py",
              "bench_launch.py"]


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def revision(repo: str) -> str:
    """The checkout's commit, and whether pactors/ has uncommitted changes (read-only git)."""
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "pactors"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in pactors/" if dirty else "")


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"Machine: {machine()}")
    print(f"pactors: {revision(os.path.dirname(here))}")
    print(f"Load average before: {load()}\n", flush=True)
    failed = []
    for name in BENCHMARKS:
        print(f"## {name}\n", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, os.path.join(here, name)]).returncode
        print(f"({name}: {time.monotonic() - t0:.1f} s, exit status {rc})\n", flush=True)
        if rc != 0:
            failed.append(name)
    print(f"Load average after: {load()}")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
