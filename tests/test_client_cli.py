"""packxd.client on its own: import cost, command line, and its handling of
replies and control events.

The daemon here is a tiny peer written in each test, on a real SOCK_SEQPACKET
socket; it tests only the client's side. The daemon itself is tested
elsewhere, for real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import packxd
from packxd import client, protocol

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Run the same packxd the test process imported (the checkout or the installed copy).
PACKXD_PATH = str(Path(packxd.__file__).resolve().parents[1])
FORBIDDEN = ("anyio", "pyroute2", "pactors", "cloudpickle", "prctl")
# Only the xpra path needs these; they must load lazily.
LAZY = ("subprocess", "ctypes", "asyncio", "threading", "typing", "dataclasses")


def client_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKXD_PATH
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    env.update(extra)
    return env


def run_client(*args: str, env: dict[str, str] | None = None,
               timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "packxd.client", *args], capture_output=True, text=True,
        env=env or client_env(), timeout=timeout, stdin=subprocess.DEVNULL,
    )


# -- a peer standing in for the daemon's socket -------------------------------

Handler = Callable[["Peer", socket.socket], None]


class Peer:
    """Serves one connection with *handler* in a thread; failures re-raise on join()."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(20)
        self.replied = threading.Event()
        self.got_signal = threading.Event()
        self.notes: dict[str, object] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                self.handler(self, conn)
        except BaseException as e:
            self.error = e
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(20)
        assert not self.thread.is_alive(), "the peer is stuck"
        if self.error is not None:
            raise self.error


@pytest.fixture
def sockpath() -> Iterator[str]:
    # Short: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="pxd") as d:
        yield os.path.join(d, "s")


def control_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def spawn_reply(conn: socket.socket, display: str) -> socket.socket:
    """Reply ok with a control socket; return the daemon's end."""
    ours, theirs = control_pair()
    with theirs:
        protocol.send_packet(
            conn, protocol.ok_reply({"display": display, "runtime_dir": "/run/user/1/packxd/a/p"}),
            [theirs.fileno()])
    return ours


def stderr_lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return p.stderr.splitlines()


# -- import cost --------------------------------------------------------------


def imported_modules(code: str) -> set[str]:
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    p = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", code], capture_output=True, text=True,
        env=env, cwd=REPO, check=True,
    )
    return {
        line.split("|")[-1].strip()
        for line in p.stderr.splitlines() if line.startswith("import time:")
    }


def test_client_imports_only_the_standard_library() -> None:
    mods = imported_modules("import packxd.client")
    assert "packxd.client" in mods and "packxd.protocol" in mods
    heavy = sorted(m for m in mods if m.split(".")[0] in FORBIDDEN)
    assert heavy == []
    # Compare with a bare interpreter, whose site hooks may import anything.
    lazy = sorted(m for m in mods - imported_modules("pass") if m.split(".")[0] in LAZY)
    assert lazy == []


def test_client_sends_its_request_before_importing_json() -> None:
    """json (with re) costs 3 ms: the client imports it while the daemon works,
    so reaching the daemon must not need it; nor does a failed connection."""
    code = ("import sys, packxd.client as c; c.main(['--socket', '/nonexistent', "
            "'g', 'a', 'p', '/bin/true'])")
    mods = imported_modules(code) - imported_modules("pass")
    assert not {"json", "re"} & mods


# -- command line -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [[], ["web"], ["web", "app", "profile"], ["list", "extra"], ["stop", "app"],
     ["--display", "x11", "g", "a", "p", "b"], ["--display", "none", "list"],
     ["list", "--", "x"], ["--bogus", "g", "a", "p", "b"], ["g", "a", "p", "b", "--socket"],
     ["--socket", "/x", "--socket=/y", "list"], ["--display=x11", "g", "a", "p", "b"]],
)
def test_usage_errors(args: list[str]) -> None:
    p = run_client(*args)
    assert p.returncode == 2
    assert p.stderr.startswith("usage: python -m packxd.client")
    assert "Traceback" not in p.stderr


def test_help() -> None:
    p = run_client("--help")
    assert p.returncode == 0
    assert "stop APP PROFILE" in p.stdout


def test_missing_socket(sockpath: str) -> None:
    p = run_client("--socket", sockpath, "web", "xterm", "p1", "xterm")
    assert p.returncode == 1
    assert stderr_lines(p) == [
        f"packxd: connecting to {sockpath}",
        f"packxd: cannot connect to {sockpath}: No such file or directory "
        "(is the daemon running?)",
    ]


def test_missing_socket_list(sockpath: str) -> None:
    p = run_client("--socket", sockpath, "list")
    assert p.returncode == 1
    assert stderr_lines(p) == [
        f"packxd: cannot connect to {sockpath}: No such file or directory "
        "(is the daemon running?)",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [(["web", "../x", "p", "bin"], 'app_name "../x" is invalid: use 1 to 64 letters'),
     (["web", "app", "", "bin"], 'profile "" is invalid'),
     (["stop", "a" * 65, "p"], 'app_name "aaaa'),
     (["we/b", "app", "p", "bin"], 'guest_name "we/b" is invalid'),
     (["web", "app", "p", "bin", "--", "a\udcffb"], "args[0] is not valid UTF-8")],
)
def test_bad_names_fail_before_connecting(
    sockpath: str, args: list[str], message: str
) -> None:
    p = run_client("--socket", sockpath, *args)
    assert p.returncode == 1
    lines = stderr_lines(p)
    assert len(lines) == 1 and lines[0].startswith("packxd: " + message), lines


def test_xpra_without_display_fails_before_connecting(sockpath: str) -> None:
    p = run_client("--socket", sockpath, "--display", "xpra", "web", "xterm", "p", "xterm")
    assert p.returncode == 1
    assert stderr_lines(p) == [
        "packxd: cannot show the app: neither DISPLAY nor WAYLAND_DISPLAY is set"]


# -- replies ------------------------------------------------------------------


def test_error_reply(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        data, fds = protocol.recv_packet(conn, 3)
        for fd in fds:
            os.close(fd)
        peer.notes["request"] = protocol.parse_request(data)
        protocol.send_packet(conn, protocol.error_reply('guest "web" is not in /etc/packxd.json'))

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "web", "xterm", "p1", "xterm", "--", "-e", "sh")
    peer.join()
    assert p.returncode == 1
    assert stderr_lines(p) == [
        f"packxd: connecting to {sockpath}",
        "packxd: starting container",
        'packxd: guest "web" is not in /etc/packxd.json',
    ]
    assert peer.notes["request"] == protocol.Request("spawn_linux_app", {
        "guest_name": "web", "app_name": "xterm", "profile": "p1", "app_bin": "xterm",
        "args": ["-e", "sh"], "display": None})


@pytest.mark.parametrize(
    ("reply", "message"),
    [(None, "packxd: the daemon closed the connection without replying"),
     (b"garbage", "packxd: the daemon sent an invalid reply: the reply is not valid JSON"),
     (b'{"result": "ok"}', "packxd: the daemon did not send the container's control channel")],
)
def test_bad_replies(sockpath: str, reply: bytes | None, message: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        _, fds = protocol.recv_packet(conn, 3)
        for fd in fds:
            os.close(fd)
        if reply is not None:
            protocol.send_packet(conn, reply)

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "--display", "none", "web", "sh", "p", "sh")
    peer.join()
    assert p.returncode == 1
    assert stderr_lines(p)[-1] == message
    assert "Traceback" not in p.stderr


def test_terminal_mode_exit_status(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        data, fds = protocol.recv_packet(conn, 3)
        request = protocol.parse_request(data)
        protocol.check_request_fds(request, len(fds), "none")
        # Play the app: write to the client's own stdout.
        os.write(fds[1], b"hello from the app\n")
        for fd in fds:
            os.close(fd)
        with spawn_reply(conn, "none") as control:
            protocol.send_packet(control, protocol.exit_event(7))

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "--display", "none", "web", "sh", "p", "sh")
    peer.join()
    assert p.returncode == 7
    assert p.stdout == "hello from the app\n"
    assert stderr_lines(p) == [f"packxd: connecting to {sockpath}", "packxd: starting container"]


def test_terminal_mode_control_closed_without_status(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        _, fds = protocol.recv_packet(conn, 3)
        for fd in fds:
            os.close(fd)
        spawn_reply(conn, "none").close()

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "web", "sh", "p", "sh")
    peer.join()
    assert p.returncode == 1
    assert stderr_lines(p)[-1] == (
        "packxd: the container stopped without reporting the app's exit status")


def start_client(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "packxd.client", *args], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or client_env())


def test_terminal_mode_forwards_first_signal(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        _, fds = protocol.recv_packet(conn, 3)
        for fd in fds:
            os.close(fd)
        with spawn_reply(conn, "none") as control:
            peer.replied.set()
            control.settimeout(20)
            data, _ = protocol.recv_packet(control, 0)
            peer.notes["signal"] = protocol.parse_signal_message(data)
            protocol.send_packet(control, protocol.exit_event(130))

    peer = Peer(sockpath, handler)
    proc = start_client("--socket", sockpath, "--display", "none", "web", "sh", "p", "sh")
    assert peer.replied.wait(20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    peer.join()
    assert peer.notes["signal"] == signal.SIGINT
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_terminal_mode_second_signal_closes_control(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        _, fds = protocol.recv_packet(conn, 3)
        for fd in fds:
            os.close(fd)
        with spawn_reply(conn, "none") as control:
            peer.replied.set()
            control.settimeout(20)
            data, _ = protocol.recv_packet(control, 0)
            peer.notes["signal"] = protocol.parse_signal_message(data)
            peer.got_signal.set()
            # An app that ignores SIGTERM: the client gives up on the next one.
            peer.notes["after"] = protocol.recv_packet(control, 0)

    peer = Peer(sockpath, handler)
    proc = start_client("--socket", sockpath, "--display", "none", "web", "sh", "p", "sh")
    assert peer.replied.wait(20)
    proc.send_signal(signal.SIGTERM)
    assert peer.got_signal.wait(20)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    peer.join()
    assert peer.notes["signal"] == signal.SIGTERM
    assert peer.notes["after"] == (b"", [])  # the control socket was closed
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err


def test_signal_while_waiting_for_reply(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        _, fds = protocol.recv_packet(conn, 3)
        for fd in fds:
            os.close(fd)
        peer.replied.set()  # (the request arrived; no reply comes)
        conn.settimeout(20)
        peer.notes["eof"] = protocol.recv_packet(conn, 3)

    peer = Peer(sockpath, handler)
    proc = start_client("--socket", sockpath, "web", "sh", "p", "sh")
    assert peer.replied.wait(20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    peer.join()
    assert proc.returncode == 130
    assert peer.notes["eof"] == (b"", [])
    assert "Traceback" not in err


# -- xpra mode, with a stand-in for the xpra program --------------------------


def fake_xpra(tmp_path: Path, body: str) -> dict[str, str]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "xpra"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return client_env(PATH=f"{bindir}:{os.environ['PATH']}", DISPLAY=":99",
                      FAKE_XPRA_DIR=str(tmp_path))


def xpra_spawn_handler(after_ready: Callable[[Peer, socket.socket], None],
                       events: tuple[bytes, ...] = (protocol.display_ready_event(),)) -> Handler:
    def handler(peer: Peer, conn: socket.socket) -> None:
        _, fds = protocol.recv_packet(conn, 3)
        peer.notes["nfds"] = len(fds)
        for fd in fds:
            os.close(fd)
        with spawn_reply(conn, "xpra") as control:
            for e in events:
                protocol.send_packet(control, e)
            control.settimeout(20)
            after_ready(peer, control)
    return handler


def wait_eof(peer: Peer, control: socket.socket) -> None:
    peer.notes["after"] = protocol.recv_packet(control, 0)


def test_xpra_attach_then_detach(tmp_path: Path, sockpath: str) -> None:
    env = fake_xpra(tmp_path, 'printf "%s\\n" "$@" > "$FAKE_XPRA_DIR/argv"\nexit 0\n')
    peer = Peer(sockpath, xpra_spawn_handler(wait_eof))
    p = run_client("--socket", sockpath, "--display", "xpra", "web", "xterm", "p1", "xterm",
                   env=env)
    peer.join()
    assert p.returncode == 0, p.stderr
    assert peer.notes["nfds"] == 0
    assert peer.notes["after"] == (b"", [])  # detaching stops the container
    assert stderr_lines(p) == [f"packxd: connecting to {sockpath}", "packxd: starting container",
                               "packxd: waiting for display"]
    assert (tmp_path / "argv").read_text().splitlines() == [
        "attach", "/run/user/1/packxd/a/p/xpra/xpra", "--opengl=no", "--session-name=xterm/p1",
        "--mmap=/run/user/1/packxd/a/p/xpra/mmap/xpra"]


def test_xpra_attach_is_retried(tmp_path: Path, sockpath: str) -> None:
    env = fake_xpra(tmp_path, 'echo x >> "$FAKE_XPRA_DIR/tries"\n'
                              '[ "$(wc -l < "$FAKE_XPRA_DIR/tries")" -ge 3 ]\n')
    peer = Peer(sockpath, xpra_spawn_handler(wait_eof))
    started = time.monotonic()
    p = run_client("--socket", sockpath, "web", "xterm", "p1", "xterm", env=env)
    peer.join()
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "tries").read_text().count("x") == 3
    assert time.monotonic() - started >= 2 * client.ATTACH_RETRY_SECONDS


def test_xpra_app_exit_stops_attach(tmp_path: Path, sockpath: str) -> None:
    env = fake_xpra(tmp_path, 'echo $$ > "$FAKE_XPRA_DIR/pid.tmp"\n'
                              'mv "$FAKE_XPRA_DIR/pid.tmp" "$FAKE_XPRA_DIR/pid"\n'
                              "exec sleep 60\n")

    def after_ready(peer: Peer, control: socket.socket) -> None:
        deadline = time.monotonic() + 20
        while not (tmp_path / "pid").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        protocol.send_packet(control, protocol.exit_event(3))

    peer = Peer(sockpath, xpra_spawn_handler(after_ready))
    p = run_client("--socket", sockpath, "web", "xterm", "p1", "xterm", env=env)
    peer.join()
    assert p.returncode == 3
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_xpra_attach_dies_with_the_client(tmp_path: Path, sockpath: str) -> None:
    env = fake_xpra(tmp_path, 'echo $$ > "$FAKE_XPRA_DIR/pid.tmp"\n'
                              'mv "$FAKE_XPRA_DIR/pid.tmp" "$FAKE_XPRA_DIR/pid"\n'
                              "exec sleep 60\n")
    peer = Peer(sockpath, xpra_spawn_handler(wait_eof))
    proc = start_client("--socket", sockpath, "web", "xterm", "p1", "xterm", env=env)
    deadline = time.monotonic() + 20
    while not (tmp_path / "pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = int((tmp_path / "pid").read_text())
    proc.kill()  # SIGKILL: no cleanup code runs, only the parent-death signal
    proc.communicate(timeout=20)
    peer.join()
    assert peer.notes["after"] == (b"", [])
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, "xpra attach outlived the client"
        time.sleep(0.02)


def test_xpra_app_exits_before_display(tmp_path: Path, sockpath: str) -> None:
    env = fake_xpra(tmp_path, "exit 0\n")
    peer = Peer(sockpath, xpra_spawn_handler(lambda peer, control: None,
                                             events=(protocol.exit_event(4),)))
    p = run_client("--socket", sockpath, "web", "xterm", "p1", "xterm", env=env)
    peer.join()
    assert p.returncode == 4
    assert stderr_lines(p)[-1] == (
        "packxd: the app exited with status 4 before its window appeared")


def test_xpra_control_closes_before_display(tmp_path: Path, sockpath: str) -> None:
    env = fake_xpra(tmp_path, "exit 0\n")
    peer = Peer(sockpath, xpra_spawn_handler(lambda peer, control: None, events=()))
    p = run_client("--socket", sockpath, "web", "xterm", "p1", "xterm", env=env)
    peer.join()
    assert p.returncode == 1
    assert stderr_lines(p)[-1] == (
        "packxd: the container stopped before the app's window appeared")


# -- list and stop ------------------------------------------------------------


def test_list_table(sockpath: str, capsys: pytest.CaptureFixture[str]) -> None:
    apps = [
        {"guest": "web", "app_name": "firefox", "profile": "work", "display": "xpra",
         "pid": 4242},
        {"guest": "mycontainer01", "app_name": "sh", "profile": "p", "display": "none",
         "pid": 77},
    ]

    def handler(peer: Peer, conn: socket.socket) -> None:
        data, fds = protocol.recv_packet(conn, 3)
        peer.notes["request"] = protocol.parse_request(data)
        peer.notes["nfds"] = len(fds)
        protocol.send_packet(conn, protocol.ok_reply({"apps": apps}))

    peer = Peer(sockpath, handler)
    rc = client.main(["--socket", sockpath, "list"])
    peer.join()
    out, err = capsys.readouterr()
    assert rc == 0
    assert err == ""
    assert peer.notes["request"] == protocol.Request("list", {})
    assert peer.notes["nfds"] == 0
    assert out.splitlines() == [
        "GUEST          APP      PROFILE  DISPLAY  PID",
        "web            firefox  work     xpra     4242",
        "mycontainer01  sh       p        none     77",
    ]


def test_list_empty(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        protocol.recv_packet(conn, 3)
        protocol.send_packet(conn, protocol.ok_reply({"apps": []}))

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "list")
    peer.join()
    assert p.returncode == 0
    assert p.stdout == "GUEST  APP  PROFILE  DISPLAY  PID\n"


def test_options_take_their_value_with_an_equals_sign_or_after_the_words(
        sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        data, _ = protocol.recv_packet(conn, 3)
        peer.notes["request"] = protocol.parse_request(data)
        protocol.send_packet(conn, protocol.ok_reply())

    peer = Peer(sockpath, handler)
    p = run_client("stop", "firefox", f"--socket={sockpath}", "work")
    peer.join()
    assert p.returncode == 0, p.stderr
    assert peer.notes["request"] == protocol.Request(
        "stop", {"app_name": "firefox", "profile": "work"})


def test_stop(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        data, _ = protocol.recv_packet(conn, 3)
        peer.notes["request"] = json.loads(data)
        protocol.send_packet(conn, protocol.ok_reply())

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "stop", "firefox", "work")
    peer.join()
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert peer.notes["request"] == {
        "request": "stop", "arguments": {"app_name": "firefox", "profile": "work"}}


def test_stop_error(sockpath: str) -> None:
    def handler(peer: Peer, conn: socket.socket) -> None:
        protocol.recv_packet(conn, 3)
        protocol.send_packet(conn, protocol.error_reply('no app "firefox" with profile "work" '
                                                        "is running"))

    peer = Peer(sockpath, handler)
    p = run_client("--socket", sockpath, "stop", "firefox", "work")
    peer.join()
    assert p.returncode == 1
    assert p.stderr == 'packxd: no app "firefox" with profile "work" is running\n'
