"""The netns worker: creates or repairs one guest's network, as root.

It runs in a subprocess of its own, because pyroute2 forks helpers and runs
an event loop of its own: neither belongs in the daemon. Request::

    {"guest": str, "ifname": str, "address": "a.b.c.d/N", "gateway": "a.b.c.d",
     "reply_to": <address>}

Reply: ``{"ok": True}`` or ``{"ok": False, "error": str}``.
"""

from __future__ import annotations

import ipaddress

import anyio

import pactors

from .. import network
from ..config import Veth


async def main(inbox: pactors.Inbox) -> int:
    msg = await inbox.receive()
    veth = Veth(ifname=msg["ifname"], address=ipaddress.IPv4Interface(msg["address"]),
                gateway=ipaddress.IPv4Address(msg["gateway"]))
    try:
        # pyroute2's synchronous API runs an asyncio loop of its own.
        await anyio.to_thread.run_sync(network.ensure, msg["guest"], veth)
    except network.NetworkError as e:
        await msg["reply_to"].send({"ok": False, "error": str(e)})
        return 1
    await msg["reply_to"].send({"ok": True})
    return 0
