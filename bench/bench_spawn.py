"""Spawn latency: ``spawn_actor(..., subprocess=Subprocess())`` to its first reply.

The actor receives one message carrying a reply address and replies. Peers,
measured in the same run:
- multiprocessing "forkserver" and "spawn" (and "fork", for reference):
  ``Process.start()`` until the child's first message arrives over a Pipe;
- a fresh interpreter, ``subprocess.run([python, "-c", "pass"])`` and
  ``-c "import anyio"``, timed to its exit.

Targets (issue 2): median <= 5 ms, and <= 0.1x multiprocessing "spawn".

Run: /opt/packxd/venv/bin/python bench/bench_spawn.py [--runs N]
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from _common import (
    Stats,
    enable_bytecode_cache,
    measure,
    ms,
    print_table,
    ratio,
    run_mp_peer,
    target,
)


async def reply_once(inbox: Any) -> None:
    """The actor: replies to the address in its first message, then exits."""
    msg = await inbox.receive()
    await msg["reply_to"].send("ready")


def bench_pactors(runs: int, warmup: int) -> list[Stats]:
    import pactors

    async def main() -> list[Stats]:
        inbox = pactors.current_inbox()

        async def timed(entry: Any, name: str, n: int, to_exit: bool = False) -> Stats:
            samples: list[float] = []
            for i in range(warmup + n):
                t0 = time.perf_counter()
                actor = await pactors.spawn_actor(entry, subprocess=pactors.Subprocess())
                await actor.send({"reply_to": inbox.address})
                reply = await inbox.receive()
                t1 = time.perf_counter()
                # The exit is outside the figure, but never overlaps the next spawn.
                status = await actor.wait()
                t2 = time.perf_counter()
                if reply != "ready" or status != 0:
                    raise RuntimeError(f"actor replied {reply!r}, exit status {status}")
                if i >= warmup:
                    samples.append((t2 if to_exit else t1) - t0)
            return Stats(name, samples)

        return [
            await timed(reply_once, "pactors, callable (cloudpickle)", runs),
            await timed("_actors", "pactors, module name", runs // 2),
            # For comparison with the fresh-interpreter peers, timed to exit.
            await timed(reply_once, "pactors, callable, to exit", runs // 2, to_exit=True),
        ]

    return pactors.run(main)  # type: ignore[no-any-return]


def bench_mp(method: str, runs: int, warmup: int, budget_s: float) -> Stats:
    result = run_mp_peer("spawn-latency", method, runs, warmup, budget_s)
    return Stats(f"multiprocessing {method}", result["samples"])


def bench_interpreter(code: str, runs: int, warmup: int, budget_s: float) -> Stats:
    argv = [sys.executable, "-c", code]
    return measure(f"python -c {code!r}, to exit", lambda: subprocess.run(argv, check=True),
                   runs, warmup, budget_s)


def run(runs: int = 200) -> None:
    ours, by_module, to_exit = bench_pactors(runs, warmup=20)
    fork = bench_mp("fork", runs, warmup=5, budget_s=3)
    forkserver = bench_mp("forkserver", runs, warmup=5, budget_s=6)
    spawn = bench_mp("spawn", runs, warmup=3, budget_s=8)
    py_pass = bench_interpreter("pass", runs, warmup=3, budget_s=5)
    py_anyio = bench_interpreter("import anyio", runs, warmup=3, budget_s=6)

    rows = []
    for s in [ours, by_module, to_exit, forkserver, spawn, py_pass, py_anyio, fork]:
        rows.append([s.name, s.n, ms(s.median), ms(s.p90), ms(s.min),
                     "1.00x" if s is ours else ratio(ours.median, s.median)])
    print_table(["what", "runs", "median ms", "p90 ms", "min ms", "pactors / this"], rows,
                title="Spawn a subprocess actor, to its first reply (issue 2)")
    print("pactors rows: spawn_actor() until the reply arrives (the last one until wait() "
          "returns); multiprocessing rows: Process.start() until the child's first message; "
          "python -c rows: subprocess.run() until exit. 'fork' is a reference, not a target.\n")
    print_table(["target", "figure", "status"], [
        ["median <= 5 ms", f"{ms(ours.median)} ms", target(ours.median <= 0.005)],
        ["<= 0.1x multiprocessing spawn", ratio(ours.median, spawn.median),
         target(ours.median <= 0.1 * spawn.median)],
    ], title="Spawn targets")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="pactors spawn latency against its peers")
    parser.add_argument("--runs", type=int, default=200, help="timed pactors spawns (200)")
    args = parser.parse_args()
    enable_bytecode_cache()
    run(args.runs)


if __name__ == "__main__":
    main()
