"""The packxd client: asks the daemon to launch an app in a container.

    python -m packxd.client [--socket PATH] [--display xpra|none]
                            GUEST APP PROFILE APP_BIN [-- ARGS...]
    python -m packxd.client [--socket PATH] list
    python -m packxd.client [--socket PATH] stop APP PROFILE

It runs on every launch, so it imports only the standard library and nothing
it does not need: ``subprocess`` and ``ctypes`` only for xpra.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import socket
import sys
import time

from packxd import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterable
    from typing import Any

PROG = "python -m packxd.client"
USAGE = f"""\
{PROG} [--socket PATH] [--display {{xpra,none}}] GUEST APP PROFILE APP_BIN [-- ARGS...]
       {PROG} [--socket PATH] list
       {PROG} [--socket PATH] stop APP PROFILE"""

ATTACH_RETRY_SECONDS = 0.5
# After xpra attach exits 0, how long an exit event may take to arrive: when
# the user closed the app, report its status rather than 0.
EXIT_EVENT_GRACE_SECONDS = 0.5
ATTACH_STOP_SECONDS = 2.0
PR_SET_PDEATHSIG = 1


class _Fail(Exception):
    """A user-facing error: printed as one line, exit status 1."""


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _say(message: str) -> None:
    # One line whatever the daemon sent.
    print("packxd: " + " ".join(message.splitlines()), file=sys.stderr, flush=True)


class _Signals:
    """Delivers signals as bytes on a socket the event loops select on
    (``signal.set_wakeup_fd``), so a signal never interrupts the client halfway
    through a step, and restores the previous handlers on exit."""

    def __init__(self, signums: Iterable[int]) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._old: dict[int, Any] = {}
        for s in signums:
            self._old[s] = signal.signal(s, _ignore_signal)

    def take(self) -> list[int]:
        """The signals received since the last call, in order."""
        got: list[int] = []
        while True:
            try:
                chunk = self.reader.recv(64)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got.extend(chunk)

    def __enter__(self) -> _Signals:
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_wakeup)
        self.reader.close()
        self._writer.close()


def _ignore_signal(signum: int, frame: object) -> None:
    """The wakeup fd does the work; the handler only keeps the default action away."""


# -- talking to the daemon ----------------------------------------------------


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        hint = ""
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
            hint = " (is the daemon running?)"
        raise _Fail(f"cannot connect to {path}: {e.strerror or e}{hint}") from None
    return sock


def _call(
    sock: socket.socket, request: bytes, fds: list[int], signals: _Signals | None
) -> tuple[dict[str, Any], list[int]]:
    """Send *request*, wait for the reply. A signal meanwhile raises _Interrupted."""
    protocol.send_packet(sock, request, fds)
    protocol.prepare_replies()  # while the daemon works
    if signals is not None:
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            sel.register(signals.reader, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                # A reply already there wins over a signal: it may carry the
                # control socket, which must then be closed properly.
                if sock in ready:
                    break
                for signum in signals.take():
                    if signum in (signal.SIGINT, signal.SIGTERM):
                        raise _Interrupted(signum)
    try:
        data, rfds = protocol.recv_packet(sock, 1, protocol.MAX_REPLY_BYTES)
    except protocol.ProtocolError as e:
        raise _Fail(f"the daemon sent an invalid reply: {e}") from None
    if not data:
        raise _Fail("the daemon closed the connection without replying")
    try:
        reply = protocol.parse_reply(data)
        if reply["result"] == "error":
            raise _Fail(reply["error"])
    except protocol.ProtocolError as e:
        _close_all(rfds)
        raise _Fail(f"the daemon sent an invalid reply: {e}") from None
    except _Fail:
        _close_all(rfds)
        raise
    return reply, rfds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def _encode(name: str, arguments: dict[str, Any]) -> bytes:
    # Validated here exactly as the daemon will: bad names fail before connecting.
    try:
        return protocol.encode_request(name, arguments)
    except protocol.ProtocolError as e:
        raise _Fail(str(e)) from None


def _next_event(control: socket.socket) -> dict[str, Any] | None:
    """The next control event, or None once the daemon closed the channel."""
    try:
        data, _ = protocol.recv_packet(control, 0, protocol.MAX_EVENT_BYTES)
    except ConnectionResetError:
        return None
    except protocol.ProtocolError as e:
        raise _Fail(f"the daemon sent an invalid event: {e}") from None
    if not data:
        return None
    try:
        return protocol.parse_event(data)
    except protocol.ProtocolError as e:
        raise _Fail(f"the daemon sent an invalid event: {e}") from None


def _adopt_control(fds: list[int]) -> socket.socket:
    if len(fds) != 1:
        _close_all(fds)
        raise _Fail("the daemon did not send the container's control channel")
    try:
        control = socket.socket(fileno=fds[0])
    except OSError:
        os.close(fds[0])
        raise _Fail("the daemon sent a control channel that is not a socket") from None
    if control.type != socket.SOCK_SEQPACKET:
        control.close()
        raise _Fail("the daemon sent a control channel of the wrong kind")
    return control


# -- commands -----------------------------------------------------------------


def _spawn(
    path: str, guest: str, app: str, profile: str, app_bin: str, args: list[str],
    display: str | None,
) -> int:
    arguments: dict[str, Any] = {
        "guest_name": guest, "app_name": app, "profile": profile, "app_bin": app_bin,
        "args": args,
    }
    if display is not None:
        arguments["display"] = display
    request = _encode("spawn_linux_app", arguments)
    if display == "xpra":
        _check_display_env()
    # Without --display the guest's default decides, so offer the terminal
    # too; the daemon closes it under xpra (protocol.check_request_fds).
    fds = [] if display == "xpra" else [0, 1, 2]

    with _Signals((signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)) as signals:
        _say(f"connecting to {path}")
        with _connect(path) as sock:
            _say("starting container")
            reply, rfds = _call(sock, request, fds, signals)
        with _adopt_control(rfds) as control:
            mode = reply.get("display")
            if mode == "none":
                return _run_terminal(control, signals)
            if mode == "xpra":
                runtime_dir = reply.get("runtime_dir")
                if not isinstance(runtime_dir, str) or not runtime_dir.startswith("/"):
                    raise _Fail("the daemon sent no valid runtime directory")
                return _run_xpra(control, signals, runtime_dir, app, profile)
            raise _Fail(f"the daemon replied with an unknown display {mode!r}")


def _run_terminal(control: socket.socket, signals: _Signals) -> int:
    """Wait for the app's exit status; forward the first SIGINT/SIGTERM to it
    (the app runs in its own session, so Ctrl-C on the terminal reaches only
    us), and give up on the second."""
    forwarded = False
    with selectors.DefaultSelector() as sel:
        sel.register(control, selectors.EVENT_READ)
        sel.register(signals.reader, selectors.EVENT_READ)
        while True:
            ready = {key.fileobj for key, _ in sel.select()}
            # Events first: an exit status already sent beats a late signal.
            if control in ready:
                event = _next_event(control)
                if event is None:
                    raise _Fail("the container stopped without reporting the app's exit status")
                if event["event"] == "exit":
                    return int(event["status"])
            if signals.reader in ready:
                for signum in signals.take():
                    if signum not in (signal.SIGINT, signal.SIGTERM):
                        continue
                    if forwarded:
                        return 128 + signum
                    forwarded = True
                    # If the container is already gone, its EOF follows.
                    try:  # contextlib.suppress would cost 2 ms of imports per launch
                        protocol.send_packet(control, protocol.signal_message(signum))
                    except OSError:
                        pass


def _check_display_env() -> None:
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise _Fail("cannot show the app: neither DISPLAY nor WAYLAND_DISPLAY is set")


def _run_xpra(
    control: socket.socket, signals: _Signals, runtime_dir: str, app: str, profile: str
) -> int:
    _check_display_env()
    _say("waiting for display")
    with selectors.DefaultSelector() as sel:
        sel.register(control, selectors.EVENT_READ)
        sel.register(signals.reader, selectors.EVENT_READ)

        # Attaching before the window is mapped can leave it black for good.
        while True:
            ready = {key.fileobj for key, _ in sel.select()}
            if control in ready:
                event = _next_event(control)
                if event is None:
                    raise _Fail("the container stopped before the app's window appeared")
                if event["event"] == "exit":
                    _say(f"the app exited with status {event['status']} before its window appeared")
                    return int(event["status"])
                if event["event"] == "display_ready":
                    break
            if signals.reader in ready:
                for signum in signals.take():
                    if signum in (signal.SIGINT, signal.SIGTERM):
                        return 128 + signum

        argv = [
            "xpra", "attach", f"{runtime_dir}/xpra/xpra", "--opengl=no",
            f"--session-name={app}/{profile}", f"--mmap={runtime_dir}/xpra/mmap/xpra",
        ]
        child: subprocess.Popen[bytes] | None = None
        retry_at = 0.0
        try:
            while True:
                if child is None and time.monotonic() >= retry_at:
                    child = _start_attach(argv)
                timeout = None if child is not None else max(0.0, retry_at - time.monotonic())
                ready = {key.fileobj for key, _ in sel.select(timeout)}
                if control in ready:
                    event = _next_event(control)
                    if event is None:
                        raise _Fail("the container stopped without reporting the app's exit status")
                    if event["event"] == "exit":
                        return int(event["status"])
                if signals.reader in ready:
                    for signum in signals.take():
                        if signum in (signal.SIGINT, signal.SIGTERM):
                            return 128 + signum
                if child is not None:
                    rc = child.poll()
                    if rc == 0:
                        # The user detached: stop the container (closing control
                        # does), unless the app is already reporting its exit.
                        child = None
                        status = _late_exit_status(control, EXIT_EVENT_GRACE_SECONDS)
                        return 0 if status is None else status
                    if rc is not None:
                        child = None
                        retry_at = time.monotonic() + ATTACH_RETRY_SECONDS
        finally:
            if child is not None:
                _stop_child(child)


def _late_exit_status(control: socket.socket, timeout: float) -> int | None:
    """The app's exit status if the daemon reports it within *timeout*."""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(control, selectors.EVENT_READ)
        while sel.select(max(0.0, deadline - time.monotonic())):
            event = _next_event(control)
            if event is None:
                return None
            if event["event"] == "exit":
                return int(event["status"])
    return None


_prctl: Callable[..., int] | None = None


def _start_attach(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start xpra attach with a parent-death signal, so it never outlives us."""
    global _prctl
    import ctypes
    import subprocess

    if _prctl is None:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl = _prctl
    # Built before fork: the child should only make the call.
    prctl_args = [ctypes.c_ulong(v) for v in (PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)]
    parent = os.getpid()

    def set_pdeathsig() -> None:
        # Runs in the child between fork and exec.
        if prctl(*prctl_args) != 0:
            os._exit(127)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(127)

    try:
        return subprocess.Popen(argv, preexec_fn=set_pdeathsig)
    except OSError as e:
        raise _Fail(f"cannot run xpra: {e.strerror or e}") from None


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    import subprocess

    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(ATTACH_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _list(path: str) -> int:
    request = _encode("list", {})
    with _connect(path) as sock:
        reply, rfds = _call(sock, request, [], None)
    _close_all(rfds)
    apps = reply.get("apps")
    if not isinstance(apps, list) or not all(isinstance(a, dict) for a in apps):
        raise _Fail("the daemon sent an invalid list of apps")
    keys = ("guest", "app_name", "profile", "display", "pid")
    rows = [["GUEST", "APP", "PROFILE", "DISPLAY", "PID"]]
    rows += [[str(a.get(k, "")) for k in keys] for a in apps]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
    try:
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        sys.stdout.flush()
    except BrokenPipeError:
        # stdout went away (say, `list | head`); keep the exit-time flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _stop(path: str, app: str, profile: str) -> int:
    request = _encode("stop", {"app_name": app, "profile": profile})
    with _connect(path) as sock:
        _reply, rfds = _call(sock, request, [], None)
    _close_all(rfds)
    return 0


# -- command line -------------------------------------------------------------


def _ensure_stdio() -> None:
    # A closed 0/1/2 would be reused by the next socket, which would then be
    # passed to the app as its stdin/stdout/stderr.
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


HELP = f"""usage: {USAGE}

Launch an app in a packxd container, list your apps, or stop one.

options:
  -h, --help            show this help message and exit
  --socket PATH         the daemon's socket (default {protocol.DEFAULT_SOCKET})
  --display {{xpra,none}}
                        xpra: a window on your display; none: the app runs on
                        this terminal (default: the guest's setting)
"""


class _Usage(Exception):
    """A command-line mistake: printed under the usage, exit status 2."""


def _parse_args(argv: list[str]) -> tuple[dict[str, str], list[str], list[str] | None]:
    """Splits argv into options, words and the arguments after ``--`` (None
    without ``--``). Options may come before, between or after the words.

    By hand rather than with argparse, whose import and parser cost ~5 ms of
    every launch (it pulls in shutil, bz2, lzma, gettext and locale).
    """
    options: dict[str, str] = {}
    words: list[str] = []
    extra: list[str] | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            extra = argv[i:]
            break
        if arg in ("-h", "--help"):
            options["help"] = ""
            continue
        if not arg.startswith("-") or arg == "-":
            words.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in ("--socket", "--display"):
            raise _Usage(f"unrecognized argument: {arg}")
        if not eq:
            if i == len(argv):
                raise _Usage(f"argument {name}: expected one argument")
            value = argv[i]
            i += 1
        if name in options:
            raise _Usage(f"argument {name}: given twice")
        options[name] = value
    display = options.get("--display")
    if display is not None and display not in protocol.DISPLAYS:
        choices = ", ".join(repr(d) for d in protocol.DISPLAYS)
        raise _Usage(f"argument --display: invalid choice: {display!r} (choose from {choices})")
    return options, words, extra


def _run(argv: list[str]) -> int:
    options, words, extra = _parse_args(argv)
    if "help" in options:
        sys.stdout.write(HELP)
        return 0
    path = options.get("--socket", protocol.DEFAULT_SOCKET)
    display = options.get("--display")
    if words == ["list"] or (len(words) == 3 and words[0] == "stop"):
        if display is not None:
            raise _Usage("--display only applies to launching an app")
        if extra is not None:
            raise _Usage(f"{words[0]} takes no arguments after --")
        if words[0] == "list":
            return _list(path)
        return _stop(path, words[1], words[2])
    if len(words) < 4:
        raise _Usage('expected GUEST APP PROFILE APP_BIN, "list" or "stop APP PROFILE"')
    guest, app, profile, app_bin = words[:4]
    return _spawn(path, guest, app, profile, app_bin, words[4:] + (extra or []), display)


def main(argv: list[str] | None = None) -> int:
    _ensure_stdio()
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except _Usage as e:
        sys.stderr.write(f"usage: {USAGE}\n{PROG}: error: {e}\n")
        return 2
    except _Fail as e:
        _say(str(e))
        return 1
    except _Interrupted as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except OSError as e:
        _say(f"lost the connection to the daemon: {e.strerror or e}")
        return 1


def _exit(status: int) -> None:
    """Exits without the interpreter's teardown, ~3 ms of every launch: by
    now every socket is closed and every child stopped."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        status = status or 1
    os._exit(status)


if __name__ == "__main__":
    _exit(main())
