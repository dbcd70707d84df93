"""Actor entry points the benchmarks spawn by module name (``"_actors"``).

bench/ is sys.path[0] of every benchmark script, and the pactors supervisor
is forked from the script, so a subprocess actor can import this module by
name. Kept tiny and stdlib-only: the child imports it at each spawn.
"""

from __future__ import annotations

from typing import Any


async def main(inbox: Any) -> None:
    """Replies once to the address in the first message, then exits."""
    msg = await inbox.receive()
    await msg["reply_to"].send("ready")
