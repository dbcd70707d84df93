"""The daemon for real: root, real namespaces and mounts, the real client.

Terminal-mode launches run through ``python -m packxd.client`` as the
unprivileged test user against the session daemon (conftest's ``daemon``);
protocol tests talk to the same daemon over a raw SOCK_SEQPACKET socket.
Only the startup-error tests start daemons of their own. Every test leaves
nothing behind: no processes, mounts or descriptors.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import (
    BASE_ENV,
    PYTHON,
    Daemon,
    User,
    guest,
    is_spare,
    make_config,
    public_tempdir,
    start_daemon,
    stop_daemon,
)

from pactors._supervisor import MAX_SPARES

NOBODY = User("nobody", 65534, 65534)
INSIDE_UID = 1000  # the guests' default "user"
MINIMAL_ROOT = ["bin", "dev", "etc", "home", "lib", "lib64", "proc", "run", "sbin", "tmp", "usr"]


# -- helpers ------------------------------------------------------------------


def run_app(daemon: Daemon, user: User | None, app: str, profile: str, *argv: str,
            guest_name: str = "term", input: bytes | None = None,
            ) -> subprocess.CompletedProcess[bytes]:
    """Launches ``argv`` in terminal mode through the real client, to completion."""
    return daemon.client(guest_name, app, profile, argv[0], "--", *argv[1:], user=user,
                         input=input if input is not None else b"")


def shell(daemon: Daemon, user: User | None, script: str, *, app: str = "shell",
          profile: str = "default", input: bytes | None = None,
          ) -> subprocess.CompletedProcess[bytes]:
    return run_app(daemon, user, app, profile, "sh", "-c", script, input=input)


def ok_stdout(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.decode()


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def pids_running(argv: list[str]) -> list[int]:
    """Live (non-zombie) processes whose command line is exactly ``argv``."""
    found = []
    for pid in all_pids():
        if cmdline(pid) == argv:
            found.append(pid)
    return found


def children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def daemon_processes(daemon: Daemon, *, spares: bool = False) -> set[int]:
    """The daemon, every process forked from it (its supervisor and actors carry
    its command line, whoever their parent is now), and all their descendants:
    every container and app of this daemon. Without ``spares``, not the
    supervisors' warm spares, which are made anew after each launch they take."""
    roots = {pid for pid in all_pids()
             if (args := cmdline(pid)) and daemon.config in args and "packxd.daemon" in args}
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children(pid))
    return seen if spares else {pid for pid in seen if not is_spare(pid)}


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def host_mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


def marker() -> str:
    """A unique ``sleep`` argument: finds the app's process from the host."""
    return f"{1000 + uuid.uuid4().int % 9000}.{uuid.uuid4().int % 10**6:06d}"


def listed_apps(daemon: Daemon, user: User | None) -> list[dict[str, str]]:
    out = ok_stdout(daemon.client("list", user=user))
    lines = out.splitlines()
    assert lines[0].split() == ["GUEST", "APP", "PROFILE", "DISPLAY", "PID"]
    keys = ("guest", "app", "profile", "display", "pid")
    return [dict(zip(keys, line.split(), strict=True)) for line in lines[1:]]


def is_listed(daemon: Daemon, user: User | None, app: str, profile: str) -> bool:
    return any(a["app"] == app and a["profile"] == profile for a in listed_apps(daemon, user))


class SleepingApp:
    """A client running ``sleep MARKER`` in the container, in the background."""

    def __init__(self, daemon: Daemon, user: User, app: str, profile: str) -> None:
        self.daemon, self.user, self.app, self.profile = daemon, user, app, profile
        self.argv = ["sleep", marker()]
        self.client = daemon.client_popen("term", app, profile, *self.argv, user=user,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE)
        try:
            self.pid = wait_for(lambda: pids_running(self.argv), 20, "the app to start")[0]
        except BaseException:
            self.close()
            raise

    def wait_client(self, timeout: float) -> tuple[int, str]:
        _, err = self.client.communicate(timeout=timeout)
        return self.client.returncode, err.decode()

    def close(self) -> None:
        if self.client.poll() is None:
            self.client.kill()
        self.client.communicate()
        for pid in pids_running(self.argv):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # The daemon forgets the launch once the container is gone.
        wait_for(lambda: not is_listed(self.daemon, self.user, self.app, self.profile), 20,
                 "the launch to end")


@pytest.fixture
def sleeping(daemon: Daemon, test_user: User) -> Iterator[Callable[[str, str], SleepingApp]]:
    apps: list[SleepingApp] = []

    def start(app: str, profile: str) -> SleepingApp:
        apps.append(SleepingApp(daemon, test_user, app, profile))
        return apps[-1]

    yield start
    for app in apps:
        app.close()


@pytest.fixture
def scratch() -> Iterator[str]:
    """A private directory, removed afterwards (tmp_path would be kept)."""
    path = public_tempdir("packxd-test-scratch-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- terminal mode ------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["id", "-u"], f"{INSIDE_UID}\n"),
    (["id", "-un"], "user\n"),
    (["hostname"], "sandbox\n"),
    (["sh", "-c", 'echo "$HOME $USER $LOGNAME $XDG_RUNTIME_DIR $PWD"'],
     f"/home/user user user /run/user/{INSIDE_UID} /home/user\n"),
])
def test_terminal_identity(daemon: Daemon, test_user: User, argv: list[str],
                           expected: str) -> None:
    assert ok_stdout(run_app(daemon, test_user, "ident", "p", *argv)) == expected


def test_terminal_other_guest_hostname(daemon: Daemon, test_user: User) -> None:
    result = run_app(daemon, test_user, "ident", "p", "hostname", guest_name="other")
    assert ok_stdout(result) == "elsewhere\n"


def test_client_progress_lines(daemon: Daemon, test_user: User) -> None:
    result = run_app(daemon, test_user, "ident", "p", "true")
    ok_stdout(result)
    assert result.stderr.decode().splitlines() == [
        f"packxd: connecting to {daemon.socket}", "packxd: starting container"]


def test_root_is_the_minimal_tree(daemon: Daemon, test_user: User) -> None:
    out = ok_stdout(run_app(daemon, test_user, "tree", "p", "ls", "-A", "/"))
    assert out.split() == MINIMAL_ROOT


def test_host_secrets_are_invisible(daemon: Daemon, test_user: User) -> None:
    assert os.path.exists("/etc/shadow") and os.path.isdir("/root")
    out = ok_stdout(shell(daemon, test_user,
                          "for p in /etc/shadow /root /etc/sudoers /var /sys /mnt; do "
                          'if [ -e "$p" ]; then echo "visible $p"; fi; done; echo checked'))
    assert out == "checked\n"


def test_home_persists_per_app_and_profile(daemon: Daemon, test_user: User) -> None:
    note = f"note {uuid.uuid4()}"
    ok_stdout(run_app(daemon, test_user, "notes", "work", "sh", "-c",
                      'printf "%s" "$1" > /home/user/note', "sh", note))
    # The same app and profile, a new container: the file is still there.
    assert ok_stdout(run_app(daemon, test_user, "notes", "work", "cat",
                             "/home/user/note")) == note
    # Another profile, and another app with the same profile name: not there.
    for app, profile in (("notes", "play"), ("other-notes", "work")):
        out = ok_stdout(run_app(daemon, test_user, app, profile, "ls", "-A", "/home/user"))
        assert out == "", (app, profile)
    # On the host: <state>/<caller uid>/<app>/<profile>, owned by the caller.
    host_file = os.path.join(daemon.state_dir, str(test_user.uid), "notes", "work", "note")
    with open(host_file) as f:
        assert f.read() == note
    st = os.stat(host_file)
    assert (st.st_uid, st.st_gid) == (test_user.uid, test_user.gid)
    home = os.stat(os.path.dirname(host_file))
    assert (home.st_uid, home.st_mode & 0o777) == (test_user.uid, 0o700)


@pytest.mark.parametrize("status", [0, 1, 7, 255])
def test_exit_status_propagates(daemon: Daemon, test_user: User, status: int) -> None:
    result = shell(daemon, test_user, f"exit {status}")
    assert result.returncode == status, result.stderr


def test_missing_app_bin_fails_cleanly(daemon: Daemon, test_user: User) -> None:
    result = run_app(daemon, test_user, "missing", "p", "/no/such/program")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1].startswith(
        "packxd: cannot run /no/such/program: No such file or directory")
    assert listed_apps(daemon, test_user) == []


def test_stdin_and_stdout_reach_the_app(daemon: Daemon, test_user: User) -> None:
    data = b"".join(b"line %d\n" % i for i in range(2000))
    result = run_app(daemon, test_user, "cat", "p", "cat", input=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    result = shell(daemon, test_user, "echo to-stderr >&2; exit 3")
    assert result.returncode == 3
    assert b"to-stderr\n" in result.stderr


def test_sigint_reaches_the_app(daemon: Daemon, test_user: User) -> None:
    token = f"sigint-{uuid.uuid4().hex}"
    script = f': {token}; trap "exit 42" INT; while :; do sleep 0.05; done'
    client = daemon.client_popen("term", "sigint", "p", "sh", "--", "-c", script,
                                 user=test_user, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: pids_running(["sh", "-c", script]), 20, "the app to start")
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=10)
        assert client.returncode == 42, err
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()


def test_no_new_privs_and_no_capabilities(daemon: Daemon, test_user: User) -> None:
    out = ok_stdout(shell(daemon, test_user, "grep -E '^(NoNewPrivs|Cap[A-Za-z]+):' "
                          "/proc/self/status"))
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert fields["NoNewPrivs"] == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])


def test_setuid_binaries_do_not_give_root(daemon: Daemon, test_user: User) -> None:
    su = "/usr/bin/su"
    if not os.stat(su).st_mode & 0o4000:
        pytest.skip(f"{su} is not setuid on this host")
    out = ok_stdout(shell(daemon, test_user,
                          f'ls -ln {su} | cut -c4; {su} -c "id -u" root </dev/null >/tmp/out '
                          '2>/dev/null; echo "status $?"; cat /tmp/out; '
                          "mount_opts=$(grep ' /usr ' /proc/self/mountinfo | cut -d' ' -f6); "
                          'echo "usr $mount_opts"'))
    lines = out.splitlines()
    assert lines[0] == "s"  # the bit is there, and has no effect
    assert lines[1] != "status 0"
    assert "0" not in lines[2:-1]
    assert "nosuid" in lines[-1].split(",")


# -- authorization ------------------------------------------------------------


def test_unpermitted_uid_is_refused(daemon: Daemon, test_user: User) -> None:
    result = daemon.client("term", "refused", "p", "id", user=NOBODY)
    assert result.returncode == 1
    err = result.stderr.decode().splitlines()
    assert err[-1] == f"packxd: uid {NOBODY.uid} is not permitted to use packxd"
    assert result.stdout == b""
    assert not os.path.exists(os.path.join(daemon.state_dir, str(NOBODY.uid)))
    assert f"refused uid {NOBODY.uid}" in daemon.read_log()
    for args in (["list"], ["stop", "refused", "p"]):
        result = daemon.client(*args, user=NOBODY)
        assert result.returncode == 1
        assert result.stderr.decode().strip() == \
            f"packxd: uid {NOBODY.uid} is not permitted to use packxd"
    # The daemon is unaffected.
    assert listed_apps(daemon, test_user) == []


def test_root_is_allowed_and_runs_as_nobody(daemon: Daemon) -> None:
    out = ok_stdout(run_app(daemon, None, "rootapp", "p", "sh", "-c",
                            "id -u; touch /home/user/made-by-root"))
    assert out == f"{INSIDE_UID}\n"
    home = os.path.join(daemon.state_dir, "0", "rootapp", "p")
    for path in (home, os.path.join(home, "made-by-root")):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (NOBODY.uid, NOBODY.gid), path


# -- daemon startup -------------------------------------------------------------


def run_daemon(config: str, sock: str, state: str, user: User | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "packxd.daemon", "--config", config, "--socket", sock,
         "--state-dir", state], capture_output=True, text=True, timeout=15, cwd="/",
        env=dict(BASE_ENV), user=user.uid if user else None,
        group=user.gid if user else None, extra_groups=[] if user else None)


def assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("packxd: "), lines[0]
    for part in expected:
        assert part in lines[0], (part, lines[0])


def term_guest(**changes: Any) -> dict[str, Any]:
    g = guest("sandbox")
    for key, value in changes.items():
        if value is None:
            g.pop(key, None)
        else:
            g[key] = value
    return g


CONFIG_ERRORS: list[tuple[str, Any, tuple[str, ...]]] = [
    ("missing file", None, ("cannot read the configuration file: No such file or directory",)),
    ("invalid JSON", '{"guests": {"term": ', ("invalid JSON at line 1 column",)),
    ("duplicate key", '{"guests": {}, "guests": {}}', ("invalid JSON", 'duplicate key "guests"')),
    ("not an object", "[]", ("the top level must be a JSON object, not an array",)),
    ("unknown top key", {"guests": {"term": term_guest()}, "permit_user": []},
     ("permit_user: unknown key",)),
    ("unknown guest key", {"guests": {"term": term_guest(colour="red")}},
     ("guests.term.colour: unknown key",)),
    ("no guests", {"guests": {}}, ("guests: must define at least one guest",)),
    ("unknown user", {"permit_users": ["no-such-user-packxd"], "guests": {"term": term_guest()}},
     ('permit_users[0]: there is no user named "no-such-user-packxd"',)),
    ("rootfs missing", {"guests": {"term": term_guest(rootfs=None)}},
     ("guests.term.rootfs: required key is missing",)),
    ("rootfs not a directory", {"guests": {"term": term_guest(rootfs="/etc/passwd")}},
     ('guests.term.rootfs: "/etc/passwd" is not a directory',)),
    ("rootfs absent", {"guests": {"term": term_guest(rootfs="/no/such/rootfs")}},
     ('guests.term.rootfs: "/no/such/rootfs" does not exist',)),
    ("rootfs relative", {"guests": {"term": term_guest(rootfs="srv/rootfs")}},
     ('guests.term.rootfs: "srv/rootfs" is not an absolute path',)),
    ("rootfs symlinked", {"guests": {"term": term_guest(rootfs="{scratch}/link")}},
     ("guests.term.rootfs: ", "goes through a symbolic link")),
    ("hostname", {"guests": {"term": term_guest(hostname="-bad")}},
     ('guests.term.hostname: "-bad" is not a valid RFC 1123 host name',)),
    ("hostname chars", {"guests": {"term": term_guest(hostname="a_b")}},
     ('guests.term.hostname: "a_b" is not a valid RFC 1123 host name',)),
    ("environment value", {"guests": {"term": term_guest(environment={"A": 1})}},
     ("guests.term.environment.A: must be a string, not a number",)),
    ("environment shape", {"guests": {"term": term_guest(environment=["A=b"])}},
     ("guests.term.environment: must be an object, not an array",)),
    ("root_symlinks relative link",
     {"guests": {"term": term_guest(root_symlinks={"bin": "usr/bin"})}},
     ('guests.term.root_symlinks.bin: "bin" is not an absolute path',)),
    ("root_symlinks absolute target",
     {"guests": {"term": term_guest(root_symlinks={"/bin": "/usr/bin"})}},
     ('guests.term.root_symlinks."/bin": target "/usr/bin" must be relative',)),
    ("display", {"guests": {"term": term_guest(display="x11")}},
     ('guests.term.display: "x11" is invalid: use "xpra" or "none"',)),
    ("user zero", {"guests": {"term": term_guest(user=0)}},
     ("guests.term.user: 0 is out of range: use 1 to 65534",)),
    ("user name", {"guests": {"term": term_guest(user="root")}},
     ("guests.term.user: must be an integer, not a string",)),
    ("bind under /proc",
     {"guests": {"term": term_guest(binds=[{"source": "/srv", "target": "/proc/x"}])}},
     ('guests.term.binds[0].target: "/proc/x" is under /proc',)),
]


@pytest.mark.parametrize(("config", "expected"), [(c, e) for _, c, e in CONFIG_ERRORS],
                         ids=[name for name, _, _ in CONFIG_ERRORS])
def test_bad_config_refuses_to_start(scratch: str, config: Any,
                                     expected: tuple[str, ...]) -> None:
    os.symlink("/", os.path.join(scratch, "link"))
    path = os.path.join(scratch, "packxd.json")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        with open(path, "w") as f:
            f.write(text.replace("{scratch}", scratch))
    sock = os.path.join(scratch, "packxd.socket")
    result = run_daemon(path, sock, os.path.join(scratch, "state"))
    assert_refused(result, f"packxd: {path}: ", *expected)
    assert not os.path.lexists(sock)


def test_not_root_refuses_to_start(daemon: Daemon, test_user: User, scratch: str) -> None:
    sock = os.path.join(scratch, "packxd.socket")
    result = run_daemon(daemon.config, sock, os.path.join(scratch, "state"), user=test_user)
    assert_refused(result, "must run as root")
    assert not os.path.lexists(sock)


def test_live_socket_refuses_to_start(daemon: Daemon, test_user: User, scratch: str) -> None:
    result = run_daemon(daemon.config, daemon.socket, os.path.join(scratch, "state"))
    assert_refused(result, f"packxd: {daemon.socket}: a packxd daemon is already running")
    # The running daemon keeps its socket and serves on.
    assert os.path.exists(daemon.socket)
    assert ok_stdout(run_app(daemon, test_user, "after-refusal", "p", "hostname")) == "sandbox\n"


def test_socket_path_not_a_socket_refuses_to_start(daemon: Daemon, scratch: str) -> None:
    sock = os.path.join(scratch, "packxd.socket")
    with open(sock, "w") as f:
        f.write("precious")
    result = run_daemon(daemon.config, sock, os.path.join(scratch, "state"))
    assert_refused(result, f"packxd: {sock}: exists and is not a socket")
    with open(sock) as f:
        assert f.read() == "precious"


def test_stale_socket_is_replaced(test_user: User) -> None:
    workdir = public_tempdir("packxd-test-stale-")
    sock = os.path.join(workdir, "packxd.socket")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(sock)  # bound, never listening, then closed: a dead daemon's leftover
    stale.close()
    assert os.path.exists(sock)
    try:
        d = start_daemon(make_config(term=guest("stalebox")), workdir=workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    try:
        assert ok_stdout(run_app(d, test_user, "stale", "p", "hostname")) == "stalebox\n"
        assert os.stat(sock).st_mode & 0o777 == 0o666
    finally:
        stop_daemon(d)
    assert d.proc.returncode == 0
    assert not os.path.exists(workdir)


# -- protocol over a raw socket ------------------------------------------------


def request(name: str, **arguments: Any) -> bytes:
    return json.dumps({"request": name, "arguments": arguments}).encode()


def spawn(**changes: Any) -> bytes:
    arguments: dict[str, Any] = {"guest_name": "term", "app_name": "raw", "profile": "p",
                                 "app_bin": "true", "args": [], "display": "none"}
    for key, value in changes.items():
        if value is None:
            arguments.pop(key)
        else:
            arguments[key] = value
    return json.dumps({"request": "spawn_linux_app", "arguments": arguments}).encode()


def exchange(conn: socket.socket, data: bytes, nfds: int = 0) -> dict[str, Any]:
    """Sends one packet (with ``nfds`` copies of /dev/null) and returns the reply."""
    fds = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(nfds)]
    try:
        socket.send_fds(conn, [data], fds) if fds else conn.send(data)
    finally:
        for fd in fds:
            os.close(fd)
    reply, got, _flags, _addr = socket.recv_fds(conn, 1 << 17, 4)
    for fd in got:
        os.close(fd)
    assert got == [], "an error reply carries no descriptors"
    assert reply, "the daemon closed the connection instead of replying"
    decoded: dict[str, Any] = json.loads(reply)
    return decoded


def launch_raw(conn: socket.socket, **changes: Any) -> socket.socket:
    """Launches ``spawn(**changes)`` in terminal mode (stdio /dev/null) on a
    raw connection; returns the launch's control socket."""
    nulls = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]
    try:
        socket.send_fds(conn, [spawn(**changes)], nulls)
    finally:
        for fd in nulls:
            os.close(fd)
    reply, fds, _flags, _addr = socket.recv_fds(conn, 1 << 17, 4)
    assert json.loads(reply)["result"] == "ok", reply
    control = socket.socket(fileno=fds[0])
    control.settimeout(20)
    return control


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[Callable[[], socket.socket]]:
    conns: list[socket.socket] = []

    def connect() -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conns.append(conn)
        conn.settimeout(20)
        conn.connect(daemon.socket)
        return conn

    yield connect
    for conn in conns:
        conn.close()


def test_a_relaunch_waits_for_the_same_apps_teardown(
        daemon: Daemon, raw: Callable[[], socket.socket]) -> None:
    """The client gets the app's status before the container is torn down;
    the same app and profile launched the moment that status arrives waits
    for the teardown instead of being refused as "already running"."""
    conns = [raw(), raw()]
    control = launch_raw(conns[0], app_name="again")
    for i in range(1, 5):
        with control:
            assert json.loads(control.recv(4096)) == {"event": "exit", "status": 0}
            # At once, on a connection made before: no client start in between.
            next_control = launch_raw(conns[i % 2], app_name="again")
        control = next_control
    with control:
        assert json.loads(control.recv(4096)) == {"event": "exit", "status": 0}


def test_a_client_flooding_its_control_socket_does_not_hold_up_the_daemon(
        daemon: Daemon, raw: Callable[[], socket.socket]) -> None:
    """The daemon reads a client's control messages as they come; a client
    that never stops sending (garbage, here) must not keep the daemon from
    serving everybody else."""
    control = launch_raw(raw(), app_name="flood", app_bin="sleep", args=["60"])
    control.setblocking(True)  # the flooders share its file: they must block, not fail
    # Two processes writing garbage in a loop keep the daemon's side full.
    flooders = [subprocess.Popen(
        [sys.executable, "-c", "import os, sys\nfd = int(sys.argv[1])\n"
         "while True: os.write(fd, b'x')", str(control.fileno())],
        pass_fds=[control.fileno()]) for _ in range(2)]
    try:
        time.sleep(0.3)  # the daemon is reading the flood by now
        t0 = time.monotonic()
        listed = exchange(raw(), request("list"))
        waited = time.monotonic() - t0
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait()
    with control:
        control.settimeout(20)
        control.send(json.dumps({"signal": signal.SIGTERM}).encode())
        while (event := json.loads(control.recv(4096)))["event"] != "exit":
            pass
    assert event["status"] == 128 + signal.SIGTERM
    assert listed["result"] == "ok", listed
    assert waited < 2, f"a list request waited {waited:.1f} s behind the flood"


def test_a_flood_of_connections_does_not_hold_up_the_daemon(
        daemon: Daemon, raw: Callable[[], socket.socket]) -> None:
    """Connections that keep coming always have one waiting in the backlog:
    the daemon must still serve the requests of those it accepted. (Whether
    a new connection finds room in a full backlog is the kernel's affair.)"""
    conn = raw()  # accepted before the flood
    flooders = [subprocess.Popen(
        [sys.executable, "-c", "import socket, sys\n"
         "while True:\n"
         "    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
         "    s.connect(sys.argv[1])\n"
         "    s.close()", daemon.socket], stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        time.sleep(0.3)  # the daemon is accepting the flood by now
        t0 = time.monotonic()
        listed = exchange(conn, request("list"))
        waited = time.monotonic() - t0
    finally:
        for flooder in flooders:
            flooder.kill()
            flooder.wait()
    assert listed["result"] == "ok", listed
    assert waited < 2, f"a list request waited {waited:.1f} s behind the flood"


BAD_PACKETS: list[tuple[str, bytes, int, str]] = [
    ("garbage", b"\xff\xfe\x00\x9cgarbage\x00", 0, "the request is not valid UTF-8"),
    ("not JSON", b"{request: list}", 0, "the request is not valid JSON"),
    ("NaN", b'{"request": "list", "arguments": {"x": NaN}}', 0, "NaN is not a JSON value"),
    ("not an object", b'["list"]', 0, "the request must be a JSON object, not an array"),
    ("deep nesting", b"[" * 60000, 0, "the request is nested too deeply"),
    ("too large", b" " * 70000, 0, "larger than 65536 bytes"),
    ("unknown request", request("format_disk"), 0, 'unknown request "format_disk"'),
    ("no request", b'{"arguments": {}}', 0, 'the request has no "request" key'),
    ("unknown key", b'{"request": "list", "extra": 1}', 0, 'unknown key "extra"'),
    ("unknown argument", request("list", verbose=True), 0,
     'list does not take an argument "verbose"'),
    ("missing argument", request("stop", app_name="x"), 0, 'stop needs the argument "profile"'),
    ("app_name ../x", spawn(app_name="../x"), 3, 'app_name "../x" is invalid'),
    ("app_name empty", spawn(app_name=""), 3, 'app_name "" is invalid'),
    ("app_name 65 chars", spawn(app_name="a" * 65), 3, 'app_name "' + "a" * 40),
    ("app_name ..", spawn(app_name=".."), 3, 'app_name ".." is invalid'),
    ("app_name not a string", spawn(app_name=7), 3, "app_name must be a string, not a number"),
    ("profile slash", spawn(profile="a/b"), 3, 'profile "a/b" is invalid'),
    ("stop bad profile", request("stop", app_name="x", profile="../../etc"), 0,
     'profile "../../etc" is invalid'),
    ("app_bin NUL", spawn(app_bin="tr\0ue"), 3, "app_bin must not contain a NUL character"),
    ("args not strings", spawn(args=[1]), 3, "args[0] must be a string, not a number"),
    ("bad display", spawn(display="x11"), 3, 'display "x11" is invalid'),
    ("unknown guest", spawn(guest_name="nope"), 3, 'guest "nope" is not in '),
    ("missing fds", spawn(), 0, 'display "none" needs the client\'s stdin, stdout and stderr'),
    ("missing fds, guest default", spawn(display=None), 0, 'display "none" needs the client'),
    ("one fd", spawn(), 1, "but 1 were attached"),
    ("too many fds", spawn(), 4, "too many file descriptors were attached (at most 3)"),
    ("fds with list", request("list"), 2, "list takes no file descriptors, but 2 were attached"),
    ("stop not running", request("stop", app_name="ghost", profile="p"), 0,
     'app "ghost" with profile "p" is not running'),
]


def test_bad_packets_get_error_replies(daemon: Daemon, test_user: User,
                                       raw: Callable[[], socket.socket]) -> None:
    """Each bad packet gets an error reply; the connection and the daemon serve on,
    and no descriptor that came with a bad packet stays open in the daemon."""
    warm = raw()
    assert exchange(warm, request("list"))["result"] == "ok"
    baseline_fds = fd_count(daemon.proc.pid)
    shared = raw()
    for name, data, nfds, expected in BAD_PACKETS:
        fresh = raw()
        for conn in (fresh, shared):
            reply = exchange(conn, data, nfds)
            assert reply["result"] == "error", (name, reply)
            assert set(reply) == {"result", "error"}, (name, reply)
            assert expected in reply["error"], (name, reply["error"])
            assert "\n" not in reply["error"] and "Traceback" not in reply["error"], name
            # The same connection still serves.
            assert exchange(conn, request("list")) == {"result": "ok", "apps": []}, name
        fresh.close()
    shared.close()
    warm.close()
    # A fresh client is served, and nothing was launched or leaked.
    assert exchange(raw(), request("list")) == {"result": "ok", "apps": []}
    assert "internal error" not in daemon.read_log()
    assert not os.path.exists(os.path.join(daemon.state_dir, "0", "raw"))
    wait_for(lambda: fd_count(daemon.proc.pid) <= baseline_fds, 10,
             "the daemon's descriptors to return to their baseline")
    assert ok_stdout(run_app(daemon, test_user, "after-garbage", "p", "hostname")) == \
        "sandbox\n"


def test_hangups_mid_request_do_not_hurt(daemon: Daemon, test_user: User,
                                         raw: Callable[[], socket.socket]) -> None:
    argv = ["sleep", marker()]
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for i in range(5):
            raw().close()  # connect and go
            conn = raw()
            # Ask for a launch and go before the reply.
            socket.send_fds(conn, [spawn(app_bin=argv[0], args=argv[1:], profile=f"p{i}")],
                            [null, null, null])
            conn.close()
    finally:
        os.close(null)
    wait_for(lambda: not any(a["app"] == "raw" for a in listed_apps(daemon, None)), 20,
             "the launches to end")
    wait_for(lambda: not pids_running(argv), 15, "the apps to go")
    log = daemon.read_log()
    assert "uid 0 started term/raw/" in log  # the daemon did launch them
    assert "internal error" not in log
    assert ok_stdout(run_app(daemon, test_user, "after-hangup", "p", "hostname")) == "sandbox\n"


# -- many at once, and nothing left behind -------------------------------------


def test_ten_concurrent_launches_leave_nothing_behind(daemon: Daemon, test_user: User) -> None:
    # Warm up: the first launch starts the daemon's supervisor.
    ok_stdout(run_app(daemon, test_user, "warm", "p", "true"))
    time.sleep(0.3)
    base_procs = daemon_processes(daemon)
    base_fds = fd_count(daemon.proc.pid)
    base_mounts = host_mounts()

    clients = [daemon.client_popen("term", "many", f"p{i}", "sh", "--", "-c",
                                   'sleep 0.5; echo "$(hostname) $1 $(id -u)"', "sh", str(i),
                                   user=test_user, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for i in range(10)]
    try:
        for i, client in enumerate(clients):
            out, err = client.communicate(timeout=60)
            assert client.returncode == 0, (i, err)
            assert out.decode() == f"sandbox {i} {INSIDE_UID}\n"
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.communicate()

    # Nothing left: processes, descriptors, mounts, launches.
    wait_for(lambda: daemon_processes(daemon) == base_procs, 15,
             "the containers' processes to go")
    spares = daemon_processes(daemon, spares=True) - base_procs
    assert len(spares) <= MAX_SPARES, "spares pile up"
    wait_for(lambda: fd_count(daemon.proc.pid) == base_fds, 15,
             f"the daemon's descriptors to return to {base_fds} "
             f"(now {fd_count(daemon.proc.pid)})")
    assert host_mounts() - base_mounts == set()
    assert listed_apps(daemon, test_user) == []
    homes = sorted(os.listdir(os.path.join(daemon.state_dir, str(test_user.uid), "many")))
    assert homes == [f"p{i}" for i in range(10)]


def test_many_sequential_launches_do_not_leak_descriptors(daemon: Daemon,
                                                          test_user: User) -> None:
    ok_stdout(run_app(daemon, test_user, "seq", "p", "true"))
    time.sleep(0.2)
    base_fds = fd_count(daemon.proc.pid)
    for _ in range(5):
        ok_stdout(run_app(daemon, test_user, "seq", "p", "true"))
        # A launch that fails releases everything too.
        assert run_app(daemon, test_user, "seq", "p", "/no/such/program").returncode == 1
    wait_for(lambda: fd_count(daemon.proc.pid) <= base_fds, 10,
             f"the daemon's descriptors to return to {base_fds} "
             f"(now {fd_count(daemon.proc.pid)})")


# -- the client's and the container's lives are tied -----------------------------


def test_killing_the_client_stops_the_container(daemon: Daemon, test_user: User,
                                                sleeping: Callable[[str, str], SleepingApp]
                                                ) -> None:
    app = sleeping("killclient", "p")
    assert is_listed(daemon, test_user, "killclient", "p")
    app.client.send_signal(signal.SIGKILL)
    app.client.wait(timeout=10)
    wait_for(lambda: not pids_running(app.argv), 15, "the app's process to go")
    wait_for(lambda: not is_listed(daemon, test_user, "killclient", "p"), 15,
             "the launch to end")


def test_killing_the_app_ends_the_client(daemon: Daemon,
                                         sleeping: Callable[[str, str], SleepingApp]) -> None:
    app = sleeping("killapp", "p")
    os.kill(app.pid, signal.SIGKILL)
    status, err = app.wait_client(timeout=10)
    assert status == 128 + signal.SIGKILL, err


def test_killing_the_container_ends_the_client(daemon: Daemon, test_user: User,
                                               sleeping: Callable[[str, str], SleepingApp]
                                               ) -> None:
    app = sleeping("killcontainer", "p")
    (entry,) = [a for a in listed_apps(daemon, test_user) if a["app"] == "killcontainer"]
    container_pid = int(entry["pid"])
    assert app.pid in daemon_processes(daemon)
    os.kill(container_pid, signal.SIGKILL)
    started = time.monotonic()
    status, err = app.wait_client(timeout=10)
    assert time.monotonic() - started < 5
    assert status != 0, err
    wait_for(lambda: not pids_running(app.argv), 10, "the app's process to go")


def test_only_the_app_holds_the_callers_stdio(daemon: Daemon, test_user: User,
                                              sleeping: Callable[[str, str], SleepingApp]
                                              ) -> None:
    """Neither PID 1 nor the guest actor keeps the client's stdout: a pipe
    reading the app's output ends with the app, not with the container."""
    app = sleeping("stdio", "p")
    (entry,) = [a for a in listed_apps(daemon, test_user) if a["app"] == "stdio"]
    pid1 = int(entry["pid"])
    (guest,) = children(pid1)

    def links(pid: int) -> dict[int, str]:
        fd_dir = f"/proc/{pid}/fd"
        return {int(fd): os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir)}

    assert app.client.stdout is not None
    pipe = f"pipe:[{os.fstat(app.client.stdout.fileno()).st_ino}]"
    assert links(app.pid)[1] == pipe, "the app writes to the client's stdout"
    # Both let go right after starting their child: give them that moment.
    wait_for(lambda: pipe not in links(pid1).values(), 5, "PID 1 to close its stdio")
    wait_for(lambda: links(guest)[1] == "/dev/null", 5, "the guest to let go of stdout")
    assert pipe not in links(guest).values()


# -- list and stop ----------------------------------------------------------------


def test_list_and_stop(daemon: Daemon, test_user: User,
                       sleeping: Callable[[str, str], SleepingApp]) -> None:
    app = sleeping("listed", "work")
    (entry,) = [a for a in listed_apps(daemon, test_user) if a["app"] == "listed"]
    assert entry["guest"] == "term" and entry["profile"] == "work"
    assert entry["display"] == "none"
    # The pid is the container's: the app runs inside it.
    container = int(entry["pid"])
    tree = {container}
    todo = [container]
    while todo:
        kids = children(todo.pop())
        tree |= kids
        todo.extend(kids)
    assert app.pid in tree

    # Someone else's app of the same name is not ours to stop.
    result = daemon.client("stop", "listed", "other", user=test_user)
    assert result.returncode == 1
    assert result.stderr.decode().strip() == \
        'packxd: app "listed" with profile "other" is not running'

    result = daemon.client("stop", "listed", "work", user=test_user)
    assert result.returncode == 0, result.stderr
    status, err = app.wait_client(timeout=15)
    assert status == 128 + signal.SIGTERM, err
    assert not pids_running(app.argv)
    wait_for(lambda: not is_listed(daemon, test_user, "listed", "work"), 10,
             "the launch to end")
    # The same app and profile can be launched again.
    assert ok_stdout(run_app(daemon, test_user, "listed", "work", "hostname")) == "sandbox\n"


def test_one_launch_per_app_and_profile(daemon: Daemon, test_user: User,
                                        sleeping: Callable[[str, str], SleepingApp]) -> None:
    sleeping("single", "p")
    result = run_app(daemon, test_user, "single", "p", "true")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines()[-1] == \
        'packxd: app "single" with profile "p" is already running'


TIOCSTI_PROBE = """
import errno, fcntl, termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"X")
    print("injected")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_the_app_cannot_inject_input_into_the_callers_terminal(
        daemon: Daemon, test_user: User) -> None:
    """CVE-2017-5226 (bubblewrap#142): with the caller's terminal as its stdin, the
    app must not push characters into it with TIOCSTI. The terminal is the
    client's controlling terminal, as in a shell; the container runs in a
    session of its own (setsid), where it is not."""
    import fcntl
    import termios

    def take_terminal() -> None:  # in the client, before exec
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    master, slave = os.openpty()
    try:
        os.chown(os.ttyname(slave), test_user.uid, -1)
        proc = daemon.client_popen(
            "term", "tty", "p", "/usr/bin/python3", "--", "-c", TIOCSTI_PROBE,
            user=test_user, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=take_terminal)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.decode().strip() in ("EPERM", "EIO"), out
        # Nothing arrived on the terminal's input side either.
        os.set_blocking(slave, False)
        with pytest.raises(BlockingIOError):
            os.read(slave, 16)
    finally:
        os.close(master)
        os.close(slave)


# -- denial of service ---------------------------------------------------------


def test_one_user_cannot_hold_every_connection(daemon: Daemon,
                                               raw: Callable[[], socket.socket]) -> None:
    """Past the per-uid bound, connections are refused at once; others are served."""
    from packxd.actors.handler import MAX_CONNECTIONS_PER_UID

    held = [raw() for _ in range(MAX_CONNECTIONS_PER_UID)]
    for conn in held:  # each is being served (the daemon answers on it)
        assert exchange(conn, request("list"))["result"] == "ok"
    extra = raw()
    reply = json.loads(extra.recv(1 << 16))
    assert reply == {"result": "error",
                     "error": "packxd has too many connections; try again later"}
    for conn in held:
        conn.close()
    wait_for(lambda: exchange(raw(), request("list"))["result"] == "ok", 10,
             "the daemon to serve again")


def test_a_client_descriptor_that_blocks_on_close_does_not_stall_the_daemon(
        daemon: Daemon, raw: Callable[[], socket.socket]) -> None:
    """A TCP socket with SO_LINGER and a full send buffer makes close() wait up to
    the linger time. Sent with a request, it must not stop the daemon serving
    others (the daemon closes client descriptors off its event loop)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # never accepted, never read: loopback only
    sticky = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sticky.connect(listener.getsockname())
        sticky.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 30))
        sticky.setblocking(False)
        try:
            while True:
                sticky.send(b"x" * 65536)
        except BlockingIOError:
            pass  # the send buffer is full now
        conn = raw()
        socket.send_fds(conn, [request("list")], [sticky.fileno()])
        sticky.close()  # the daemon's copy is now the last one
        reply = json.loads(conn.recv(1 << 16))
        assert reply["result"] == "error" and "takes no file descriptors" in reply["error"]
        started = time.monotonic()
        assert exchange(raw(), request("list"))["result"] == "ok"
        assert time.monotonic() - started < 3, "the daemon stalled on a client's close()"
    finally:
        sticky.close()
        listener.close()  # the peer's reset ends the lingering close in the daemon


def test_container_output_reaches_the_log_printable_and_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """xpra's output (and the app's, through xpra) is less trusted: the log
    gets it one sanitized line at a time, and only so much of it."""
    import anyio

    from packxd.actors import handler

    logged: list[str] = []
    monkeypatch.setattr(handler, "log", logged.append)
    r, w = os.pipe()
    lines = [b"plain", b"\x1b[31mred\x1b[0m and a\x00nul", "caf\u00e9".encode(), b"\xff\xfe bad",
             b"x" * 5000]
    lines += [b"line %d" % i for i in range(handler.MAX_OUTPUT_LINES + 50)]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(handler._log_output, "g/a/p", r)
            # Written in pieces that split lines: the log still gets whole lines.
            data = b"\n".join(lines) + b"\nno newline at the end"
            for i in range(0, len(data), 777):
                await anyio.to_thread.run_sync(os.write, w, data[i:i + 777])
            os.close(w)

    try:
        anyio.run(main)
    finally:
        os.close(r)
    assert logged[:4] == ["g/a/p: plain", "g/a/p: ?[31mred?[0m and a?nul", "g/a/p: caf\u00e9",
                          "g/a/p: \ufffd\ufffd bad"]
    assert len(logged[4]) == len("g/a/p: ") + handler.MAX_OUTPUT_LINE
    assert logged[4].endswith("...")
    assert len(logged) == handler.MAX_OUTPUT_LINES + 1
    assert logged[-1] == "g/a/p: (further output dropped)"


def test_container_output_without_end_does_not_hold_up_the_daemon(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A container whose output never stops always has a chunk waiting: the
    daemon's other tasks must still run while it is read and dropped."""
    import anyio

    from packxd.actors import handler

    monkeypatch.setattr(handler, "log", lambda line: None)
    # Every line logged (none dropped unread): reading is slower than `yes`.
    monkeypatch.setattr(handler, "MAX_OUTPUT_LINES", 1 << 40)
    r, w = os.pipe()
    writer = subprocess.Popen(["yes", "output"], stdout=w)
    os.close(w)
    ticks = [time.monotonic()]

    async def main() -> None:
        async def ticker() -> None:
            while True:
                await anyio.sleep(0)
                ticks.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await handler._log_output("g", r)  # until the writer is killed
            ticks.append(time.monotonic())
            tg.cancel_scope.cancel()

    # Killed from a thread: a reader that never yields would stop any timer.
    killer = threading.Timer(0.5, writer.kill)
    killer.start()
    try:
        anyio.run(main)
    finally:
        killer.cancel()
        killer.join()  # a later pactors.run() needs a process without threads
        writer.kill()
        writer.wait()
        os.close(r)
    longest = max(b - a for a, b in itertools.pairwise(ticks))
    assert longest < 0.1, f"another task waited {longest:.2f} s while the output was read"


@pytest.mark.parametrize("data, lines", [
    (b"a\nb\n", ["a", "b"]), (b"a\nlast", ["a", "last"]), (b"", []), (b"\n", [""]),
])
def test_container_output_lines_end_where_the_output_does(
        monkeypatch: pytest.MonkeyPatch, data: bytes, lines: list[str]) -> None:
    import anyio

    from packxd.actors import handler

    logged: list[str] = []
    monkeypatch.setattr(handler, "log", logged.append)
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        anyio.run(handler._log_output, "g", r)
    finally:
        os.close(r)
    assert logged == [f"g: {line}" for line in lines]
