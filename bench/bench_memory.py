"""Memory of an idle subprocess actor: its unique set size (USS).

USS = Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup: what the
process alone maps, so what one more actor costs. PSS and RSS are shown
beside it. The actors have answered one message and wait in ``receive()``.

Also shown: the supervisor they were forked from, the parent (the program
running ``pactors.run``), and a multiprocessing "forkserver" and "spawn"
child blocked in ``Connection.recv()``.

Target (issue 2): USS of an idle subprocess actor <= 4 MiB.

Run: /opt/packxd/venv/bin/python bench/bench_memory.py [--actors N]
"""

from __future__ import annotations

import os
from typing import Any

from _common import (
    MIB,
    enable_bytecode_cache,
    median,
    memory,
    mib,
    ppid_of,
    print_table,
    run_mp_peer,
    target,
)

SETTLE_S = 0.3  # let the idle actors finish whatever follows their reply


async def idle(inbox: Any) -> None:
    """The actor: replies to its first message, then waits for the next one."""
    msg = await inbox.receive()
    await msg["reply_to"].send("ready")
    await inbox.receive()


def bench_pactors(count: int) -> dict[str, Any]:
    import anyio

    import pactors

    async def main() -> dict[str, Any]:
        inbox = pactors.current_inbox()
        actors = []
        for _ in range(count):
            actor = await pactors.spawn_actor(idle, subprocess=pactors.Subprocess())
            await actor.send({"reply_to": inbox.address})
            assert await inbox.receive() == "ready"
            actors.append(actor)
        await anyio.sleep(SETTLE_S)
        out = {
            "actors": [memory(a.child_pid) for a in actors],
            "supervisor": memory(ppid_of(actors[0].child_pid)),
            "parent": memory(os.getpid()),
        }
        for actor in actors:
            await actor.send("bye")
        for actor in actors:
            if await actor.wait() != 0:
                raise RuntimeError("an idle actor failed")
        return out

    return pactors.run(main)  # type: ignore[no-any-return]


def as_memory(smaps: dict[str, int]) -> dict[str, int]:
    return {"uss": smaps.get("Private_Clean", 0) + smaps.get("Private_Dirty", 0),
            "pss": smaps.get("Pss", 0), "rss": smaps.get("Rss", 0)}


def run(count: int = 5) -> None:
    ours = bench_pactors(count)
    forkserver = as_memory(run_mp_peer("idle-memory", "forkserver")["smaps"])
    spawn = as_memory(run_mp_peer("idle-memory", "spawn")["smaps"])

    actor_uss = [m["uss"] for m in ours["actors"]]
    first = ours["actors"][0]
    typical = {k: median([m[k] for m in ours["actors"]]) for k in ("uss", "pss", "rss")}

    def row(name: str, m: dict[str, Any]) -> list[str]:
        return [name, mib(m["uss"]), mib(m["pss"]), mib(m["rss"])]

    print_table(["process", "USS MiB", "PSS MiB", "RSS MiB"], [
        row("pactors idle subprocess actor (first)", first),
        row(f"pactors idle subprocess actor (median of {count})", typical),
        row(f"pactors supervisor (with {count} actors)", ours["supervisor"]),
        row("parent running pactors.run", ours["parent"]),
        row("multiprocessing forkserver child, idle", forkserver),
        row("multiprocessing spawn child, idle", spawn),
    ], title="Memory of an idle subprocess actor (issue 2)")
    print(f"USS of the {count} actors: {', '.join(mib(u) for u in actor_uss)} MiB. "
          f"The supervisor's USS counts pages it no longer shares with its children.\n")
    print_table(["target", "figure", "status"], [
        ["idle actor USS <= 4 MiB", f"{mib(typical['uss'])} MiB",
         target(typical["uss"] <= 4 * MIB)],
    ], title="Memory target")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="memory of an idle pactors subprocess actor")
    parser.add_argument("--actors", type=int, default=5, help="idle actors to spawn (5)")
    args = parser.parse_args()
    enable_bytecode_cache()
    run(args.actors)


if __name__ == "__main__":
    main()
