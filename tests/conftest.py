"""Shared test setup. Tests run as root on the real kernel.

Slow things are shared per session: one unprivileged test user, one
daemon with a test configuration, one Xvfb.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

# Test helper modules (seed_container.py and friends) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))

TEST_USER = "packxd-test"
TEST_UID = 1999
PYTHON = sys.executable
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
ROOT_SYMLINKS = {"/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib64",
                 "/sbin": "usr/sbin"}


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("packxd's tests need root: they use real namespaces and mounts")


@dataclass
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="session")
def test_user() -> Iterator[User]:
    """An unprivileged user for the client; created for the session if missing."""
    created = False
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--uid", str(TEST_UID),
                        "--user-group", "--shell", "/bin/sh", TEST_USER], check=True)
        entry = pwd.getpwnam(TEST_USER)
        created = True
    yield User(TEST_USER, entry.pw_uid, entry.pw_gid)
    if created:
        subprocess.run(["userdel", TEST_USER], check=False)
        shutil.rmtree(f"/run/user/{entry.pw_uid}", ignore_errors=True)


def make_config(rootfs: str = "/", **guests: dict[str, Any]) -> dict[str, Any]:
    return {"permit_users": [TEST_USER], "guests": guests}


def guest(hostname: str, display: str = "none", **extra: Any) -> dict[str, Any]:
    return {"rootfs": "/", "hostname": hostname, "environment": dict(BASE_ENV),
            "root_symlinks": dict(ROOT_SYMLINKS), "display": display, **extra}


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: str
    state_dir: str
    config: str
    log: str
    workdir: str

    def client(self, *args: str, user: User | None = None, input: bytes | None = None,
               timeout: float = 60, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[bytes]:
        """Runs the client to completion, as ``user`` (None: root)."""
        return subprocess.run(
            client_command(self.socket, *args), input=input, capture_output=True,
            timeout=timeout, env=env or dict(BASE_ENV), cwd="/",
            user=user.uid if user else None, group=user.gid if user else None,
            extra_groups=[] if user else None)

    def client_popen(self, *args: str, user: User | None = None, **kwargs: Any
                     ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            client_command(self.socket, *args), cwd="/",
            env=kwargs.pop("env", dict(BASE_ENV)),
            user=user.uid if user else None, group=user.gid if user else None,
            extra_groups=[] if user else None, **kwargs)

    def read_log(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def client_command(sock: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "packxd.client", "--socket", sock, *args]


def public_tempdir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)  # the unprivileged client must reach the socket
    return path


def start_daemon(config: dict[str, Any], workdir: str | None = None) -> Daemon:
    workdir = workdir or public_tempdir("packxd-test-daemon-")
    cfg = os.path.join(workdir, "packxd.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    sock = os.path.join(workdir, "packxd.socket")
    log = os.path.join(workdir, "daemon.log")
    state = os.path.join(workdir, "state")
    with open(log, "wb") as logf:
        proc = subprocess.Popen([PYTHON, "-m", "packxd.daemon", "--config", cfg, "--socket", sock,
                                 "--state-dir", state], stdout=logf, stderr=subprocess.STDOUT,
                                cwd="/")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"the daemon exited: {f.read()}")
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            probe.connect(sock)
            probe.close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("the daemon did not start listening")
    return Daemon(proc, sock, state, cfg, log, workdir)


def stop_daemon(daemon: Daemon) -> None:
    if daemon.proc.poll() is None:
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
    shutil.rmtree(daemon.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon(test_user: User) -> Iterator[Daemon]:
    """One daemon for the session, with a terminal guest and an xpra guest."""
    d = start_daemon(make_config(
        term=guest("sandbox"),
        other=guest("elsewhere"),
        gui=guest("guibox", display="xpra"),
    ))
    yield d
    stop_daemon(d)


@pytest.fixture(scope="session")
def xvfb() -> Iterator[str]:
    """A private X server for the session; yields its DISPLAY."""
    for number in range(90, 120):
        if not os.path.exists(f"/tmp/.X11-unix/X{number}") and \
                not os.path.exists(f"/tmp/.X{number}-lock"):
            break
    display = f":{number}"
    proc = subprocess.Popen(["Xvfb", display, "-screen", "0", "1280x1024x24", "-nolisten",
                             "tcp", "-ac"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not os.path.exists(f"/tmp/.X11-unix/X{number}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("Xvfb did not start")
        time.sleep(0.05)
    yield display
    proc.terminate()
    proc.wait(timeout=10)


def is_spare(pid: int) -> bool:
    """Whether ``pid`` is a warm spare of a pactors supervisor (not an actor)."""
    from pactors._child import SPARE_NAME

    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == SPARE_NAME
    except OSError:
        return False
