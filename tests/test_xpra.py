"""End to end on a real Xvfb: daemon, client as an unprivileged user, xterm in
the container through a real xpra, the window forwarded and painted."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import BASE_ENV, Daemon, User

pytestmark = pytest.mark.xpra

RED = (255, 0, 0)
XTERM_MIN = (300, 150)  # an 80x24 xterm is larger than this with any font


def screenshot_rgb(display: str) -> tuple[int, int, bytes]:
    geometry = subprocess.run(["xdpyinfo", "-display", display], capture_output=True,
                              text=True, check=True).stdout
    dims = next(line.split()[1] for line in geometry.splitlines() if "dimensions:" in line)
    width, height = (int(v) for v in dims.split("x"))
    raw = subprocess.run(["import", "-display", display, "-window", "root", "-depth", "8",
                          "rgb:-"], capture_output=True, check=True).stdout
    assert len(raw) == width * height * 3
    return width, height, raw


def red_box(display: str) -> tuple[int, int, int]:
    """(count, width, height) of the bounding box of pure red pixels on screen."""
    width, _, raw = screenshot_rgb(display)
    xs: list[int] = []
    ys: list[int] = []
    count = 0
    red = bytes(RED)
    for offset in range(0, len(raw), 3):
        if raw[offset:offset + 3] == red:
            count += 1
            pixel = offset // 3
            xs.append(pixel % width)
            ys.append(pixel // width)
    if not count:
        return 0, 0, 0
    return count, max(xs) - min(xs) + 1, max(ys) - min(ys) + 1


def find_window(display: str, title: str) -> list[str]:
    out = subprocess.run(["xdotool", "search", "--name", title], capture_output=True,
                         text=True, env={**BASE_ENV, "DISPLAY": display})
    return out.stdout.split()


def wait_for(predicate: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()  # type: ignore[operator]
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def container_xpra_processes(uid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "-u", str(uid)], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if "xpra" in line or "Xvfb" in line]


@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_xterm_through_xpra_is_forwarded_and_painted(daemon: Daemon, test_user: User,
                                                      xvfb: str, attempt: int) -> None:
    title = f"packxd-e2e-{attempt}"
    rundir = f"/run/user/{test_user.uid}"
    had_rundir = os.path.exists(rundir)
    client = daemon.client_popen(
        "gui", "xterm", f"e2e{attempt}", "/usr/bin/xterm", "--", "-T", title, "-bg", "red",
        "-fg", "red", "-geometry", "80x24",
        user=test_user, env={**BASE_ENV, "DISPLAY": xvfb}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    try:
        windows = wait_for(lambda: find_window(xvfb, title), 60, f"a window titled {title}")
        assert windows
        # The window must be painted, not left black: the whole xterm is red.
        count, _, _ = wait_for(
            lambda: (lambda box: box if box[1] >= XTERM_MIN[0] and box[2] >= XTERM_MIN[1]
                     else None)(red_box(xvfb)), 20, "the xterm's red pixels")  # type: ignore[misc]
        assert count >= XTERM_MIN[0] * XTERM_MIN[1]
        assert client.poll() is None, "the client must stay attached while the app runs"
    finally:
        client.send_signal(signal.SIGTERM)
        try:
            _, err = client.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            client.kill()
            _, err = client.communicate()
    assert b"waiting for display" in err
    # Closing the client stops the container: xpra and its Xvfb go away.
    wait_for(lambda: not container_xpra_processes(test_user.uid), 20,
             "the container's xpra to exit")
    wait_for(lambda: not find_window(xvfb, title), 10, "the forwarded window to close")
    assert not os.path.exists(f"{rundir}/packxd/xterm/e2e{attempt}")
    # xpra's own output went to the daemon's log, each line marked with the launch.
    prefix = f"packxd: gui/xterm/e2e{attempt}: "
    xpra_lines = [line for line in daemon.read_log().splitlines() if line.startswith(prefix)]
    assert any("xpra" in line.lower() for line in xpra_lines), xpra_lines[:5]
    if not had_rundir:  # the daemon made it, as logind would, and removed it after
        wait_for(lambda: not os.path.exists(rundir), 10, f"{rundir} to be removed")
