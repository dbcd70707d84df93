"""The userrundir worker: manages a launch's runtime directory as the caller.

It runs in a subprocess of its own and drops to the caller's uid and gid
before touching anything, so the caller's own symlinks can only ever lead
it where the caller could go anyway. Request::

    {"op": "create" | "remove", "uid": int, "gid": int, "app": str,
     "profile": str, "reply_to": <address>}

``create`` makes ``/run/user/<uid>/packxd/<app>/<profile>/xpra/mmap`` (the
last two 0700); ``remove`` deletes ``.../<profile>`` again. The reply is
``{"ok": True}`` or ``{"ok": False, "error": str}``.
"""

from __future__ import annotations

import os
import shutil

import pactors


def runtime_dir(uid: int, app: str, profile: str) -> str:
    return f"/run/user/{uid}/packxd/{app}/{profile}"


async def main(inbox: pactors.Inbox) -> int:
    msg = await inbox.receive()
    uid, gid = int(msg["uid"]), int(msg["gid"])
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    os.umask(0o077)
    path = runtime_dir(uid, msg["app"], msg["profile"])
    try:
        if msg["op"] == "create":
            os.makedirs(os.path.join(path, "xpra", "mmap"), mode=0o700, exist_ok=True)
            os.chmod(os.path.join(path, "xpra"), 0o700)
            os.chmod(os.path.join(path, "xpra", "mmap"), 0o700)
        else:
            shutil.rmtree(path, ignore_errors=True)
            for parent in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
                try:
                    os.rmdir(parent)
                except OSError:
                    break
        await msg["reply_to"].send({"ok": True})
    except OSError as e:
        await msg["reply_to"].send({"ok": False, "error": f"{path}: {e.strerror}"})
        return 1
    return 0
