"""The supervisor: a single-threaded process that forks every subprocess actor.

Each process that spawns subprocess actors has one supervisor, forked from it
while it still has no thread (``pactors.run`` forks it first thing). The
supervisor never runs an event loop and never unpickles anything: requests
are small JSON headers with descriptors. Because children are forked from its
warm, frozen image, a spawn costs a fork, not an interpreter start.

Duties:
- fork children on request, reply with the pid and a pidfd;
- reap every child and orphan (it is a child subreaper), and report each
  actor's exit status to its spawner;
- when the spawner's connection closes, SIGKILL the children it did not
  detach, wait for the rest, then exit.

The child's side of a spawn lives in ``_child``.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from typing import Any, NoReturn

import prctl

from . import _child, _linux, _wire

_REPORT = struct.Struct("<ii")  # (errno, pid), child to supervisor
MAX_REQUEST = 4096

# stdio actions in a spawn request
STDIO_SHARE = "share"
STDIO_NULL = "null"
STDIO_FD = "fd"


def start() -> tuple[socket.socket, int]:
    """Forks a supervisor for this process; returns its socket and pid.

    The caller must have no other thread: fork would copy it half-way.
    """
    if threading.active_count() > 1:
        raise RuntimeError(
            "pactors cannot fork its supervisor: this process already runs threads. "
            "Call pactors.run() at program start, and spawn subprocess actors from an "
            "actor before it starts threads")
    ours, theirs = _wire.seqpacket_pair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            # A fresh context: nothing of the forking task's context variables
            # (current actor, async library) reaches actors forked from here.
            contextvars.Context().run(_main, theirs)
        except BaseException:
            # A bug: say so, since every actor dies with us.
            traceback.print_exc()
            os._exit(70)
        finally:
            os._exit(0)
    theirs.close()
    return ours, pid


def _preload() -> None:
    """Imports what every actor needs, once, so that forks start warm.

    Actors may also run after pivot_root into an empty root, where no module
    can be imported any more.
    """
    import asyncio.selector_events
    import asyncio.unix_events
    import linecache  # noqa: F401
    import pickle  # noqa: F401

    import anyio._backends._asyncio
    import cloudpickle  # noqa: F401

    from . import _runtime, vm  # noqa: F401

    # One throwaway event loop: the lazy state it creates (and the pages it
    # touches) then live in the image every actor is forked from.
    anyio.run(anyio.sleep, 0)
    asyncio.events._set_running_loop(None)


class _Child:
    __slots__ = ("detached",)

    def __init__(self) -> None:
        self.detached = False


def _main(sock: socket.socket) -> NoReturn:
    # Keep only stdio and the control socket.
    os.dup2(sock.fileno(), 3)
    sock.detach()
    _linux.close_range(4)
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    asyncio.events._set_running_loop(None)  # we may be forked from inside an event loop
    _preload()

    prctl.set_child_subreaper(1)
    prctl.set_name("pactors-sup")
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # Ctrl-C reaches the whole process group; the supervisor finishes its
    # work when its spawner's connection closes instead.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    gc.freeze()  # keep the heap pages shared with every child we fork

    sup = _Supervisor(sock)
    sock_fd = sock.fileno()
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    registered = True
    poller.register(wake_r, select.POLLIN)
    while sup.connected or sup.children:
        for fd, _ in poller.poll():
            if fd == wake_r:
                try:
                    while os.read(wake_r, 256):
                        pass
                except BlockingIOError:
                    pass
            elif sup.connected:
                sup.serve_one()
        sup.reap()
        if not sup.connected and registered:
            # Gone while serving or while reporting: stop polling a closed fd.
            poller.unregister(sock_fd)
            registered = False
    os._exit(0)


class _Supervisor:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connected = True
        self.writable = True
        self.children: dict[int, _Child] = {}  # keyed by the pid we reap
        self.pidfd = os.pidfd_open(os.getpid())
        # A warm spare for plain spawns: (pid, control socket), made after
        # the first plain spawn and after each use.
        self.spare: tuple[int, socket.socket] | None = None

    def serve_one(self) -> bool:
        """Handles one request; returns False when the spawner is gone."""
        while True:
            try:
                data, ancdata, _flags, _ = self.sock.recvmsg(
                    MAX_REQUEST, socket.CMSG_SPACE(8 * 4), socket.MSG_CMSG_CLOEXEC)
                break
            except InterruptedError:
                return True
            except ConnectionResetError:
                # The spawner closed with our reports unread; Linux says so
                # once, ahead of what it had still sent us (a detach, say).
                continue
            except OSError:
                data, ancdata = b"", []
                break
        fds: list[int] = []
        for level, ctype, cdata in ancdata:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                fds.extend(struct.unpack(f"{len(cdata) // 4}i", cdata[:len(cdata) // 4 * 4]))
        if not data:
            _wire.close_all(fds)
            self.disconnect()
            return False
        try:
            req = json.loads(data)
            op = req["op"]
            if op == "spawn":
                self.spawn(req, fds)
            elif op == "detach":
                child = self.children.get(int(req["pid"]))
                if child is not None:
                    child.detached = True
        except Exception as e:  # a bug in our own client: report, keep serving
            self.send({"id": req.get("id") if isinstance(req, dict) else None,
                       "errno": errno.EINVAL, "message": f"bad supervisor request: {e}"})
        finally:
            _wire.close_all(fds)
        return True

    def send(self, obj: dict[str, Any], fds: list[int] = []) -> None:  # noqa: B006
        if not self.connected or not self.writable:
            return
        data = json.dumps(obj).encode()
        while True:
            try:
                _wire._sendmsg(self.sock, data, fds)
                return
            except BlockingIOError:
                # The spawner reads its reports concurrently with its requests.
                select.select([], [self.sock], [])
            except InterruptedError:
                continue
            except OSError:
                # The spawner is gone, but what it sent before going (a detach,
                # say) is still queued: the read side disconnects at its end.
                self.writable = False
                return

    def spawn(self, req: dict[str, Any], fds: list[int]) -> None:
        flags = int(req["flags"])
        stdio: list[str] = list(req["stdio"])
        inbox_fd = fds[0]
        it = iter(fds[1:])
        stdio_fds = [next(it) if action == STDIO_FD else -1 for action in stdio]
        warm = bool(req.get("warm")) and not flags
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = self._hand_to_spare(report_w, fds, stdio) if warm else 0
        if not pid:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                # Straight into the new namespaces: as PID 1 of a new pid
                # namespace, the child needs no second fork.
                pid = _linux.clone_fork(flags) if flags else os.fork()
            except OSError as e:
                os.close(report_r)
                os.close(report_w)
                self.send({"id": req["id"], "errno": e.errno,
                           "message": f"creating the process failed: {e.strerror}"})
                return
            if pid == 0:
                _child.bootstrap(self.pidfd, report_w, inbox_fd, stdio, stdio_fds, flags)
        self._finish_spawn(req, pid, report_r, report_w)
        if warm and self.spare is None:
            self._make_spare()

    def _hand_to_spare(self, report_w: int, fds: list[int], stdio: list[str]) -> int:
        """Gives a plain spawn to the warm spare; returns its pid, or 0."""
        if self.spare is None:
            return 0
        pid, ctrl = self.spare
        self.spare = None
        try:
            _wire._sendmsg(ctrl, json.dumps({"stdio": stdio}).encode(), [report_w, *fds])
        except OSError:  # it died: fork as usual
            return 0
        finally:
            ctrl.close()
        return pid

    def _make_spare(self) -> None:
        ours, theirs = _wire.seqpacket_pair()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            ours.close()
            _child.spare(theirs.fileno(), self.pidfd)
        theirs.close()
        self.spare = (pid, ours)

    def _finish_spawn(self, req: dict[str, Any], pid: int, report_r: int,
                      report_w: int) -> None:
        os.close(report_w)
        report = b""
        while len(report) < _REPORT.size:
            try:
                chunk = os.read(report_r, _REPORT.size - len(report))
            except InterruptedError:
                continue
            if not chunk:
                break
            report += chunk
        os.close(report_r)
        err, _ = _REPORT.unpack(report) if len(report) == _REPORT.size else (errno.ECHILD, 0)
        if err:
            os.waitpid(pid, 0)
            self.send({"id": req["id"], "errno": err, "message": "spawning the actor failed"})
            return
        # Not reaped before we have its pidfd: only we reap our children.
        pidfd = os.pidfd_open(pid)
        try:
            self.children[pid] = _Child()
            self.send({"id": req["id"], "errno": 0, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            if self.spare is not None and self.spare[0] == pid:
                self.spare[1].close()
                self.spare = None
            child = self.children.pop(pid, None)
            if child is not None:
                code = os.waitstatus_to_exitcode(status)
                self.send({"op": "exit", "pid": pid,
                           "status": 128 - code if code < 0 else code})

    def disconnect(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self.sock.close()
        if self.spare is not None:
            pid, ctrl = self.spare
            ctrl.close()  # the spare sees EOF and exits; we reap it like a child
            self.children[pid] = _Child()
            self.spare = None
        for pid, child in self.children.items():
            if not child.detached:
                # Explicitly: an init script that changes credentials clears
                # the child's parent-death signal until it is set again.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
