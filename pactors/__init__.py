"""pactors: an Emilua-style multiprocess actor runtime on anyio.

    import pactors

    async def main():
        actor = await pactors.spawn_actor("mypkg.worker", subprocess=pactors.Subprocess())
        await actor.send({"reply_to": pactors.current_inbox().address})
        reply = await pactors.current_inbox().receive()
        await actor.wait()

    pactors.run(main)

See docs/pactors.md.
"""

from . import system
from ._errors import (
    ActorError,
    ChannelClosed,
    InitError,
    MessageError,
    NoSenders,
    PactorsError,
)
from ._inbox import Channel, Fd, Inbox
from ._runtime import current_inbox, run
from .vm import Actor, Init, Subprocess, spawn_actor

__all__ = [
    "Actor",
    "ActorError",
    "Channel",
    "ChannelClosed",
    "Fd",
    "Inbox",
    "Init",
    "InitError",
    "MessageError",
    "NoSenders",
    "PactorsError",
    "Subprocess",
    "current_inbox",
    "run",
    "spawn_actor",
    "system",
]
