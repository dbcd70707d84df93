"""The container worker: as root, it starts the container and stays its
parent until it exits.

A container cannot join a network namespace owned by the host once its own
user namespace exists, so (as in the seed) for a guest with ``veth`` this
privileged actor is a process of its own that enters the guest's netns in
its init script, and the container, spawned from here, inherits it. Without
``veth`` it is an actor of the daemon's process, and the container gets a
new network namespace with only ``lo`` up.

Request::

    {"ops": [[bytes, Fd | None], ...], "uid": int, "gid": int, "user": int,
     "environment": {str: str}, "stdio": [Fd, Fd, Fd], "newns_net": bool,
     "reply_to": <address>}

Replies: ``{"container": <address>, "pid": int}`` once the setup is queued
(or ``{"error": str}``), then ``{"exit": int}`` or ``{"exit": 1, "error": str}``
when the container ends.
"""

from __future__ import annotations

from typing import Any

import pactors

from .. import launcher
from . import guest as _guest  # noqa: F401  the container runs it after pivot_root


async def main(inbox: pactors.Inbox) -> int:
    msg = await inbox.receive()
    inbox.close()
    reply_to = msg["reply_to"]
    try:
        return await _run(msg, reply_to)
    finally:
        # This actor may live in the daemon's process: release what we hold
        # now rather than whenever the garbage collector runs.
        reply_to.close()


async def _run(msg: dict[str, Any], reply_to: pactors.Channel) -> int:
    ops = [(data, fd.detach() if fd is not None else None) for data, fd in msg["ops"]]
    # The container's stdio: the client's own descriptors (terminal mode), or
    # the daemon's output pipe (xpra). Closing ours may be the last close of
    # a client's descriptor, so it happens off the loop once the reply is sent.
    client_fds: list[int] = [fd.detach() for fd in msg["stdio"]]
    stdio: tuple[Any, Any, Any] = (client_fds[0], client_fds[1], client_fds[2])
    try:
        try:
            container = await launcher.start_container(
                ops, user=msg["user"], caller_uid=msg["uid"], caller_gid=msg["gid"],
                environment=msg["environment"], stdio=stdio, newns_net=msg["newns_net"])
        except launcher.LaunchError as e:
            await reply_to.send({"error": str(e)})
            return 1
        finally:
            launcher.close_op_fds(ops)
        try:
            await reply_to.send({"container": container.address, "pid": container.child_pid})
            await launcher.close_untrusted(client_fds)
            client_fds = []
            try:
                status = await container.wait()
            except pactors.PactorsError as e:
                await reply_to.send({"exit": 1, "error": str(e)})
                return 1
            await reply_to.send({"exit": status})
            return 0
        finally:
            container.kill()
            container.close()
    finally:
        await launcher.close_untrusted(client_fds)
