"""The guest app actor: runs inside the container as the user, PID 2.

It receives one start message from the daemon's launcher::

    {"events": <address>, "app_bin": str, "args": [str], "display": "xpra"|"none",
     "xpra_dir": str}

and then runs the app (terminal mode: on the stdio the container was given)
or ``xpra start`` with the app as its child. Later messages from the
launcher: ``{"signal": N}`` forwards a signal; ``{"stop": True}`` (or the
launcher going away) sends SIGTERM, then SIGKILL after ``STOP_GRACE``.
Events it sends back: ``{"event": "display_ready"}``, ``{"event": "error",
"error": str}``. Its exit status is the app's (or xpra's).

This module is imported by the daemon before its supervisor forks, so it
still runs after the container's pivot_root.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio

import pactors
from pactors import system

STOP_GRACE = 10.0
XPRA_DISPLAY = ":100"


def xpra_arguments(app_bin: str, args: list[str], xpra_dir: str) -> list[str]:
    """``xpra start`` as the seed runs it, plus an explicit Xvfb command line."""
    child = " ".join(_shell_quote(a) for a in [app_bin, *args])
    return [
        "xpra", "start", XPRA_DISPLAY,
        "--daemon=no", "--mdns=no", "--dbus-proxy=no", "--dbus-launch=no",
        "--notifications=no", f"--bind={xpra_dir}/xpra", "--speaker=no",
        "--microphone=no", "--pulseaudio=no", "--webcam=no", "--printing=no",
        "--use-display=no", "--xsettings=no", "--forward-xdg-open=no",
        "--systemd-run=no", "--html=off", "--terminate-children=yes",
        "--exit-with-children=yes", "--env=QT_QUICK_BACKEND=software",
        f"--start-child={child}", f"--mmap={xpra_dir}/mmap/xpra",
        # Without the host's /etc, xpra falls back to Xorg's dummy driver,
        # which fails with "no screens found": name the X server ourselves.
        "--xvfb=Xvfb +extension Composite -screen 0 1920x1080x24+32 -nolisten tcp "
        "-noreset -auth $XAUTHORITY",
    ]


def _shell_quote(arg: str) -> str:
    # xpra runs --start-child through a shell; quote as shlex.quote does.
    safe = all(c.isalnum() or c in "@%+=:,./-_" for c in arg)
    return arg if arg and safe else "'" + arg.replace("'", "'\"'\"'") + "'"


async def main(inbox: pactors.Inbox) -> int:
    start = await inbox.receive()
    events = start["events"]
    display = start["display"]
    env = dict(os.environ)
    try:
        if display == "xpra":
            proc = system.spawn(
                "xpra", xpra_arguments(start["app_bin"], start["args"], start["xpra_dir"]),
                environment=env, stdout="share", stderr="share",
                working_directory="/home/user")
        else:
            proc = system.spawn(start["app_bin"], [start["app_bin"], *start["args"]],
                                environment=env, stdin="share", stdout="share",
                                stderr="share", working_directory="/home/user")
    except OSError as e:
        await events.send({"event": "error",
                           "error": f"cannot run {start['app_bin']}: {e.strerror}"})
        return 127
    if display != "xpra":
        _give_up_terminal()
    await events.send({"event": "started"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(_serve_requests, inbox, proc)
        if display == "xpra":
            tg.start_soon(_watch_display, events, env, start["xpra_dir"])
        status = await proc.wait()
        tg.cancel_scope.cancel()
    # Tell the daemon now: the container's teardown still takes a while.
    await events.send({"event": "exit", "status": status})
    return status


def _give_up_terminal() -> None:
    """The app has the caller's stdio now. Ours would keep it open until the
    container is torn down: a caller reading the app's output through a pipe
    (``... | cat``) would wait for that, not for the app."""
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


async def _serve_requests(inbox: pactors.Inbox, proc: system.Process) -> None:
    try:
        async for msg in inbox:
            if isinstance(msg, dict) and isinstance(msg.get("signal"), int):
                proc.kill(msg["signal"])
            elif isinstance(msg, dict) and msg.get("stop"):
                break
    except pactors.PactorsError:
        pass
    # Stop requested or the launcher is gone: end the app, gently first.
    proc.kill(signal.SIGTERM)
    await anyio.sleep(STOP_GRACE)
    proc.kill(signal.SIGKILL)


async def _watch_display(events: Any, env: dict[str, str], xpra_dir: str) -> None:
    """Tells the daemon once the app has a mapped window, so attach paints it.

    Attaching earlier left xterm's window black in 1 to 3 runs of 4 (xpra
    3.1.3). A rootfs without xprop gets the best we can do: the socket.
    """
    while True:
        await anyio.sleep(0.1)
        mapped = await _app_window_mapped(env)
        if mapped is None and os.path.exists(f"{xpra_dir}/xpra"):
            await anyio.sleep(1.0)
            mapped = True
        if mapped:
            await events.send({"event": "display_ready"})
            return


async def _app_window_mapped(env: dict[str, str]) -> bool | None:
    """Whether xpra manages a client window; None when xprop is missing."""
    read, write = os.pipe()
    try:
        proc = system.spawn("xprop", ["xprop", "-root", "_NET_CLIENT_LIST"],
                            environment={**env, "DISPLAY": XPRA_DISPLAY}, stdout=write)
    except OSError:
        os.close(read)
        os.close(write)
        return None
    os.close(write)
    try:
        await proc.wait()
        output = b""
        while chunk := os.read(read, 4096):
            output += chunk
    finally:
        os.close(read)
    return proc.exit_code == 0 and b"window id #" in output
