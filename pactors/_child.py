"""A subprocess actor's life, from the supervisor's fork to ``os._exit``.

Order, each step checked:

1. the supervisor clones the child straight into its new namespaces
   (``_linux.clone_fork``): in a new PID namespace it is PID 1 at once.
2. parent-death signal; stdio as requested; the inbox on fd 3; every other
   descriptor closed; signal dispositions reset.
3. read the body the parent queued on the inbox: what to run, the
   environment, the init script and its ``arg``.
4. run the init script; on failure report an InitError to the parent.
5. close every descriptor but 0-2 and the inbox; zero the body.
6. as PID 1, fork the actor (PID 2) and reap until it exits.
7. set the environment, load the entry point, run it under anyio, and exit
   with its status; an exception is reported to the parent as plain data.

The supervisor answers ``spawn_actor`` right after step 1, so the spawner
writes its maps while steps 2 and 3 run. Nothing here imports modules after
step 4: the init script may have pivot_root'ed into an empty tmpfs.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn, ParamSpec

import anyio
import cloudpickle
import prctl

from . import _codec, _linux, _loop, _wire
from ._errors import InitError
from .subprocess_init import InitScriptFailure, run_init_script

INBOX_FD = 3
ACTOR_NAME = "pactors-actor"  # the supervisor's own name would mislead ps
SPARE_NAME = "pactors-spare"

# Signals PID 1 forwards to the actor (Emilua's set).
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                     signal.SIGUSR2)


def _default_dispositions() -> None:
    """Gives every signal the disposition a fresh interpreter gives it."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if sig == signal.SIGINT:
            wanted: Any = signal.default_int_handler
        elif sig in (signal.SIGPIPE, signal.SIGXFSZ):
            wanted = signal.SIG_IGN
        else:
            wanted = signal.SIG_DFL
        try:
            if signal.getsignal(sig) is not wanted:  # only touch what differs
                signal.signal(sig, wanted)
        except (OSError, ValueError):
            pass


# Sent by a terminal to its whole process group.
SUPERVISOR_BLOCKED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def enter_supervisor_signals(wake_w: int) -> None:
    """The supervisor's signal settings: a fresh interpreter's dispositions,
    whatever its spawner had set; SIGCHLD to the wakeup fd; and what a
    terminal sends blocked, since the supervisor ends when its spawner's
    connection closes. Blocked, not ignored: a child inherits the mask, so
    a signal sent to it before ``_leave_supervisor_signals`` waits instead
    of being lost."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_BLOCKED)  # from the start
    _default_dispositions()
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.pthread_sigmask(signal.SIG_SETMASK, SUPERVISOR_BLOCKED)  # and only these


def _leave_supervisor_signals() -> None:
    """Undoes ``enter_supervisor_signals`` in a child, which then has a fresh
    interpreter's signal dispositions and an empty mask; cheaper than
    ``_default_dispositions`` in every child."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _alive(pidfd: int) -> bool:
    return not select.select([pidfd], [], [], 0)[0]


_P = ParamSpec("_P")


def _child_life(fn: Callable[_P, object]) -> Callable[_P, NoReturn]:
    """Marks a forked child's whole life: it never returns into the
    supervisor's code. An exception ends it with a traceback and status 1
    (a bug: say so), Ctrl-C before the actor's loop with 128+SIGINT."""

    @functools.wraps(fn)
    def life(*args: _P.args, **kwargs: _P.kwargs) -> NoReturn:
        try:
            fn(*args, **kwargs)
        except KeyboardInterrupt:
            os._exit(128 + signal.SIGINT)
        except BaseException:
            try:
                traceback.print_exc()
            finally:
                os._exit(1)
        os._exit(1)

    return life


def _start(sup_pidfd: int, name: str) -> None:
    """First thing in every fork: die with the supervisor, and say what we are."""
    global _parent_pid
    _parent_pid = os.getppid()  # 0 in a new pid namespace
    prctl.set_pdeathsig(signal.SIGKILL)
    prctl.set_name(name)
    if not _alive(sup_pidfd):
        os._exit(1)


def _keep_gate(flags: int) -> None:
    global _parent_gate
    if flags & _linux.CLONE_NEWPID:
        _parent_gate = _GATE_FD  # getppid() cannot name the supervisor here
    else:
        os.close(_GATE_FD)


@_child_life
def bootstrap(sup_pidfd: int, inbox_fd: int, stdio: list[str], stdio_fds: list[int],
              flags: int) -> None:
    """Runs in the supervisor's fork, already in its new namespaces."""
    _start(sup_pidfd, ACTOR_NAME)
    os.dup2(sup_pidfd, _GATE_FD)
    _setup_fds(inbox_fd, stdio, stdio_fds)
    _linux.close_range(_GATE_FD + 1)
    _keep_gate(flags)
    _leave_supervisor_signals()  # a signal sent since the fork is delivered here
    _run()


@_child_life
def ns_spare(ctrl_fd: int, sup_pidfd: int, flags: int) -> None:
    """A warm spare for spawns into new namespaces, cloned into fresh ones
    ahead of time: the next spawn with the same flags costs neither the
    clone nor the steps of ``bootstrap`` before its init script.

    Its namespaces are made when it is: the supervisor discards it if its
    mount table changes meanwhile (the hostname it copied is not watched).
    """
    _start(sup_pidfd, SPARE_NAME)
    os.dup2(ctrl_fd, _NS_SPARE_CTRL_FD)
    os.dup2(sup_pidfd, _GATE_FD)
    _linux.close_range(3, _NS_SPARE_CTRL_FD - 1)
    _linux.close_range(_NS_SPARE_CTRL_FD + 1, _GATE_FD - 1)
    _linux.close_range(_GATE_FD + 1)
    _keep_gate(flags)
    _leave_supervisor_signals()
    ctrl = socket.socket(fileno=_NS_SPARE_CTRL_FD)
    data, fds = _wire.recvmsg_fds(ctrl, 4096, 8)
    ctrl.close()
    if not data:  # the supervisor is done with us
        os._exit(0)
    prctl.set_name(ACTOR_NAME)
    _setup_fds(*_order(data, fds))
    _run()


_NS_SPARE_CTRL_FD = 100  # until the spawn it takes over arrives


def _order(data: bytes, fds: list[int]) -> tuple[int, list[str], list[int]]:
    """A spare's order from the supervisor: the inbox, the stdio actions and
    the descriptors of those that are "fd"."""
    stdio: list[str] = json.loads(data)["stdio"]
    inbox_fd, rest = fds[0], iter(fds[1:])
    return inbox_fd, stdio, [next(rest) if action == "fd" else -1 for action in stdio]


_GATE_FD = 105  # the supervisor's pidfd: readable once the supervisor has died


@_child_life
def spare(ctrl_fd: int, sup_pidfd: int) -> None:
    """A warm spare: forked ahead of time, already running its event loop.

    The supervisor hands it the next plain spawn (no namespaces, no init
    script), which then costs neither a fork nor an event loop's start.
    """
    _start(sup_pidfd, SPARE_NAME)
    # Keep stdio and the control socket (fd 4); hold fd 3 for the inbox so
    # that the event loop's own descriptors land above it.
    os.dup2(ctrl_fd, _SPARE_CTRL_FD)
    _linux.close_range(_SPARE_CTRL_FD + 1)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(null, INBOX_FD)
    os.close(null)
    _leave_supervisor_signals()
    status = anyio.run(_spare_main, backend_options=_loop.backend_options("asyncio"))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


_SPARE_CTRL_FD = 4


async def _spare_main() -> int:
    ctrl = socket.socket(fileno=_SPARE_CTRL_FD)
    ctrl.setblocking(False)
    while True:
        try:
            data, fds = _wire.recvmsg_fds(ctrl, 4096, 8)
            break
        except BlockingIOError:
            await anyio.wait_readable(ctrl)
    ctrl.close()
    if not data:  # the supervisor is done with us
        _wire.close_all(fds)
        return 0
    prctl.set_name(ACTOR_NAME)
    inbox_fd, stdio, stdio_fds = _order(data, fds)
    _place_stdio(stdio, stdio_fds)
    os.dup2(inbox_fd, INBOX_FD)
    os.set_inheritable(INBOX_FD, False)
    _wire.close_all([inbox_fd, *(fd for fd in stdio_fds if fd >= 0)])

    inbox = socket.socket(fileno=INBOX_FD)
    while True:
        try:
            frame = _wire.recv_frame_nowait(inbox)
            break
        except BlockingIOError:
            await anyio.wait_readable(inbox)
    inbox.detach()
    if frame is None or frame.kind != _wire.BODY:
        return 1
    body, _ = _parse_body(frame)
    entry = cloudpickle.loads(body["callable"]) if body.get("callable") else body["module"]
    frame.payload[:] = bytes(len(frame.payload))
    global _status_fd
    _status_fd = os.dup(INBOX_FD)
    from . import _runtime
    return await _runtime.process_actor(entry, body["environment"], INBOX_FD, _report)


def _setup_fds(inbox_fd: int, stdio: list[str], stdio_fds: list[int]) -> None:
    """Puts stdio on 0-2 and the inbox on 3, and closes 3-99 otherwise."""
    # Park what we keep above the range we rearrange, then close the rest.
    os.dup2(inbox_fd, 101)
    for i, fd in enumerate(stdio_fds):
        if fd >= 0:
            os.dup2(fd, 102 + i)
    _linux.close_range(3, 99)
    for i, fd in enumerate(stdio_fds):
        if fd >= 0:
            stdio_fds[i] = 102 + i
    _place_stdio(stdio, stdio_fds)
    for fd in stdio_fds:
        if fd >= 0:
            os.close(fd)
    os.dup2(101, INBOX_FD)
    os.close(101)
    os.set_inheritable(INBOX_FD, False)


def _place_stdio(stdio: list[str], stdio_fds: list[int]) -> None:
    """Puts the requested descriptors on 0, 1 and 2, and rebinds sys.std*."""
    for i, action in enumerate(stdio):
        if action == "fd":
            os.dup2(stdio_fds[i], i)
        elif action == "null":
            null = os.open(os.devnull, os.O_RDWR)
            if null != i:
                os.dup2(null, i)
                os.close(null)
    # The supervisor's sys.std* may wrap descriptors that no longer exist here.
    sys.stdin = open(0, closefd=False, errors="surrogateescape")  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1, closefd=False,  # noqa: SIM115
                      errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False,  # noqa: SIM115
                      errors="backslashreplace")


_parent_pid = 0  # the supervisor
_parent_gate = -1  # in a new pid namespace, where getppid() says 0


def _rearm_parent_death_signal() -> None:
    """Sets the parent-death signal, and exits if the parent is already gone.

    A fork clears the signal, and so does an init script that changes
    credentials: it is set again after each.
    """
    prctl.set_pdeathsig(signal.SIGKILL)
    if _parent_gate >= 0:
        try:
            gone = bool(select.select([_parent_gate], [], [], 0)[0])
        except (OSError, ValueError):  # the script closed it: nothing to check
            gone = False
    else:
        gone = os.getppid() != _parent_pid
    if gone:
        os._exit(1)


_status_fd = INBOX_FD


def _report(kind: int, fields: dict[str, Any]) -> None:
    """Sends an error report to the parent on the spawn channel."""
    data, _ = _codec.encode(fields, lambda _: None)
    sock = socket.socket(fileno=_status_fd)
    try:
        sock.setblocking(True)
        _wire.send_frame_blocking(sock, kind, data)
    except OSError:
        pass
    finally:
        sock.detach()


def _run() -> NoReturn:
    inbox = socket.socket(fileno=INBOX_FD)
    inbox.setblocking(True)
    frame = _wire.recv_frame_blocking(inbox)
    inbox.detach()
    if frame is None or frame.kind != _wire.BODY:
        os._exit(1)
    body, script = _parse_body(frame)
    init_arg = frame.fds[0] if body["has_init_arg"] else None

    entry: Any = None
    if body.get("callable") is not None:
        entry = cloudpickle.loads(body["callable"])
    body.pop("callable", None)

    if script is not None:
        try:
            run_init_script(script, init_arg)
        except InitScriptFailure as failure:
            if body["stderr_shared"]:
                print(f"pactors: {InitError(**failure.fields)}", file=sys.stderr, flush=True)
            _report(_wire.INIT_ERROR, failure.fields)
            os._exit(1)
        _rearm_parent_death_signal()
    # The init script's descriptors, `arg` included, die here.
    _linux.close_range(INBOX_FD + 1)
    frame.payload[:] = bytes(len(frame.payload))
    del frame

    if os.getpid() == 1:
        _pid1()

    # The actor closes its inbox when main ends; errors still need a way out.
    global _status_fd
    _status_fd = os.dup(INBOX_FD)
    from . import _runtime  # imported by the supervisor already
    status = _runtime.run_process_actor(entry if entry is not None else body["module"],
                                        body["environment"], INBOX_FD, _report)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _parse_body(frame: _wire.Frame) -> tuple[dict[str, Any], bytearray | None]:
    (head_len,) = struct.unpack_from("<I", frame.payload)
    body: dict[str, Any] = pickle.loads(frame.payload[4:4 + head_len])
    script = frame.payload[4 + head_len:] if body["has_script"] else None
    return body, script


def _pid1() -> None:
    """Stays PID 1 of the namespace: forward signals, reap, exit with the actor.

    Returns only in the forked actor (PID 2).
    """
    actor = 0
    pending: list[signal.Signals] = []

    def forward(signum: int, _frame: object) -> None:
        if actor:
            os.kill(actor, signum)
        else:
            pending.append(signal.Signals(signum))

    old = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    handlers = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return
    actor = pid
    os.close(INBOX_FD)  # the actor alone holds the inbox, so it sees EOF alone
    # Nor does PID 1 keep the stdio it never uses: a pipe given as the
    # actor's stdout reaches EOF once the actor and its programs are done
    # with it, not only once the namespace is torn down.
    _linux.close_range(0, 2)
    prctl.set_name("pactors-init")
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    for sig in pending:
        os.kill(actor, sig)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(1)
        if pid == actor:
            code = os.waitstatus_to_exitcode(status)
            os._exit(128 - code if code < 0 else code)
