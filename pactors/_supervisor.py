"""The supervisor: a single-threaded process that forks every subprocess actor.

Each process that spawns subprocess actors has one supervisor, forked from it
while it still has no thread (``pactors.run`` forks it first thing). The
supervisor never runs an event loop and never unpickles anything: requests
are small JSON headers with descriptors. Because children are forked from its
warm, frozen image, a spawn costs a fork, not an interpreter start.

Duties:
- fork children on request, reply with the pid and a pidfd; keep warm spares
  (forked or cloned ahead of time, one per set of clone flags) to take the
  next spawn of their kind;
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
import sys
import threading
import traceback
from typing import Any, NoReturn

import prctl

from . import _child, _linux, _loop, _wire

MAX_REQUEST = 4096
MAX_SPARES = 4

# stdio actions in a spawn request
STDIO_SHARE = "share"
STDIO_NULL = "null"
STDIO_FD = "fd"


def start() -> tuple[socket.socket, int]:
    """Forks a supervisor for this process; returns its socket and pid.

    The caller must have no other thread: fork would copy it half-way.
    """
    # pactors' own closer thread may run (see _wire.close_later): it holds
    # nothing the child needs, and the child never uses it.
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and t.name != _wire.CLOSER_THREAD]
    if others:
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
    anyio.run(anyio.sleep, 0, backend_options=_loop.backend_options("asyncio"))
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
    _child.enter_supervisor_signals(wake_w)
    gc.freeze()  # keep the heap pages shared with every child we fork

    sup = _Supervisor(sock)
    sock_fd = sock.fileno()
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    registered = True
    poller.register(wake_r, select.POLLIN)
    try:
        # POLLPRI once our mount table changes (proc(5)); each poll re-arms it.
        mounts = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        mounts = -1  # no spares with a mount namespace then
    else:
        poller.register(mounts, select.POLLPRI)
        sup.watching_mounts = True
    while sup.connected or sup.children:
        ready = [fd for fd, _ in poller.poll()]
        if mounts in ready:  # before any spawn request that came with it
            sup.mounts_changed()
        for fd in ready:
            if fd == wake_r:
                try:
                    while os.read(wake_r, 256):
                        pass
                except BlockingIOError:
                    pass
            elif fd == sock_fd and sup.connected:
                sup.serve_one()
        sup.refill()
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
        # Warm spares by clone flags: (pid, control socket), made after the
        # second spawn with those flags and after each use.
        self.spares: dict[int, tuple[int, socket.socket]] = {}
        self.watching_mounts = False
        self.wanted: set[int] = set()  # flags of the spares to make
        self.used: set[int] = set()  # flags spawned with so far

    def serve_one(self) -> bool:
        """Handles one request; returns False when the spawner is gone."""
        while True:
            try:
                data, fds = _wire.recvmsg_fds(self.sock, MAX_REQUEST, 8)
                break
            except InterruptedError:
                return True
            except ConnectionResetError:
                # The spawner closed with our reports unread; Linux says so
                # once, ahead of what it had still sent us (a detach, say).
                continue
            except OSError:
                data, fds = b"", []
                break
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
        # The event-loop spare (flags 0) cannot run an init script first.
        key = flags if flags or not req.get("init") else None
        pid = self._hand_to_spare(key, fds, stdio) if key is not None else 0
        if not pid:
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                # Straight into the new namespaces: as PID 1 of a new pid
                # namespace, the child needs no second fork.
                pid = _linux.clone_fork(flags) if flags else os.fork()
            except OSError as e:
                self.send({"id": req["id"], "errno": e.errno,
                           "message": f"creating the process failed: {e.strerror}"})
                return
            if pid == 0:
                _child.bootstrap(self.pidfd, inbox_fd, stdio, stdio_fds, flags)
        # The reply does not wait for the child to set itself up: the
        # spawner can write its maps meanwhile. A child that fails from here
        # on exits, and its exit is reported like any other.
        pidfd = os.pidfd_open(pid)  # not reaped before this: only we reap our children
        try:
            self.children[pid] = _Child()
            self.send({"id": req["id"], "errno": 0, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)
        if key is not None and key not in self.spares:
            # Flags used once may never come again (a container worker makes
            # one container): spares only for flags used twice.
            if key in self.used:
                self.wanted.add(key)  # made once the request's descriptors are closed
            self.used.add(key)

    def refill(self) -> None:
        """Makes the spares spawns used up, with none of a request's
        descriptors open: a spare must not keep an inbox alive."""
        for key in self.wanted - self.spares.keys() if self.connected else ():
            self._make_spare(key)
        self.wanted.clear()

    def _hand_to_spare(self, key: int, fds: list[int], stdio: list[str]) -> int:
        """Gives a spawn to the warm spare made for its flags; returns its pid, or 0."""
        spare = self.spares.pop(key, None)
        if spare is None:
            return 0
        pid, ctrl = spare
        try:
            _wire._sendmsg(ctrl, json.dumps({"stdio": stdio}).encode(), fds)
        except OSError:  # it died (reaped unreported): fork as usual
            return 0
        finally:
            ctrl.close()
        return pid

    def _make_spare(self, flags: int) -> None:
        """Forks the next spare for ``flags``: with flags 0 it starts its
        event loop, otherwise it is cloned into fresh namespaces. Either way
        it then waits for a spawn to take over."""
        if flags & _linux.CLONE_NEWNS and not self.watching_mounts:
            return  # a stale copy of the mount table could go unnoticed
        if len(self.spares) >= MAX_SPARES:
            self._discard(next(iter(self.spares)))  # the least recently made
        ours, theirs = _wire.seqpacket_pair()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = _linux.clone_fork(flags) if flags else os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            ours.close()
            if flags:
                _child.ns_spare(theirs.fileno(), self.pidfd, flags)
            _child.spare(theirs.fileno(), self.pidfd)
        theirs.close()
        self.spares[flags] = (pid, ours)

    def _discard(self, key: int) -> None:
        _, ctrl = self.spares.pop(key)
        ctrl.close()  # it sees EOF and exits; reap() reaps it unreported

    def mounts_changed(self) -> None:
        """Our mount table changed: spares hold copies made before the change."""
        for key in [k for k in self.spares if k & _linux.CLONE_NEWNS]:
            self._discard(key)

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
            for key, (spare_pid, _) in list(self.spares.items()):
                if spare_pid == pid:
                    self._discard(key)
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
        for key in list(self.spares):
            self.children[self.spares[key][0]] = _Child()  # reaped before we exit
            self._discard(key)
        for pid, child in self.children.items():
            if not child.detached:
                # Explicitly: an init script that changes credentials clears
                # the child's parent-death signal until it is set again.
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
