"""The per-process runtime: actor contexts, the supervisor connection, ``run``.

Every process running pactors has one ``_Runtime``: a root task group that
hosts in-process actors and the supervisor reader, and a lazily forked
supervisor. Every actor (the program's ``main`` included) has an
``_ActorContext``: its inbox and the children it spawned, which are killed
when it ends unless detached.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from . import _loop, _supervisor, _wire
from ._errors import PactorsError
from ._inbox import Inbox

_current: contextvars.ContextVar[_ActorContext] = contextvars.ContextVar("pactors_actor")


class _ActorContext:
    def __init__(self, runtime: _Runtime, inbox: Inbox) -> None:
        self.runtime = runtime
        self.inbox = inbox
        self.children: list[Any] = []  # vm.Actor, kept until they end or detach

    def kill_children(self) -> None:
        for child in list(self.children):
            child._kill_on_parent_exit()
        self.children.clear()


def current_inbox() -> Inbox:
    """The inbox of the actor this task belongs to."""
    return _context().inbox


def _context() -> _ActorContext:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("not inside a pactors actor: start the program with "
                           "pactors.run(main)") from None


class _SupervisorClient:
    """This process's connection to its supervisor."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.pid = pid
        self._next_id = 0
        self._pending: dict[int, tuple[anyio.Event, list[Any]]] = {}
        self._exits: dict[int, Callable[[int], None]] = {}
        self._early_exits: dict[int, int] = {}
        self._lock = anyio.Lock()
        self.broken: str | None = None

    async def request(self, header: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any],
                                                                              list[int]]:
        if self.broken:
            raise PactorsError(f"the supervisor is gone: {self.broken}")
        self._next_id += 1
        rid = header["id"] = self._next_id
        event = anyio.Event()
        slot: list[Any] = []
        self._pending[rid] = (event, slot)
        try:
            async with self._lock:
                while True:
                    try:
                        _wire._sendmsg(self.sock, json.dumps(header).encode(), fds)
                        break
                    except BlockingIOError:
                        await anyio.wait_writable(self.sock)
            await event.wait()
        finally:
            self._pending.pop(rid, None)
        if not slot:
            raise PactorsError(f"the supervisor is gone: {self.broken}")
        reply, reply_fds = slot
        return reply, reply_fds

    def notify(self, header: dict[str, Any]) -> None:
        """Sends a request that has no reply."""
        try:
            _wire._sendmsg(self.sock, json.dumps(header).encode(), [])
        except OSError:
            pass

    def on_exit(self, pid: int, callback: Callable[[int], None]) -> None:
        if pid in self._early_exits:
            callback(self._early_exits.pop(pid))
        else:
            self._exits[pid] = callback

    async def serve(self) -> None:
        """Dispatches replies and exit reports until the supervisor goes."""
        try:
            while True:
                try:
                    data, fds = _wire.recvmsg_fds(self.sock, 4096, 4)
                except BlockingIOError:
                    try:
                        await anyio.wait_readable(self.sock)
                    except (anyio.ClosedResourceError, OSError):
                        self.broken = "this process closed its connection"
                        return
                    continue
                except ConnectionResetError:
                    continue  # reported ahead of what it still sent us: read on
                except OSError as e:
                    self.broken = f"its connection failed: {e.strerror}"
                    return
                if not data:
                    self.broken = "its connection closed"
                    return
                msg = json.loads(data)
                if msg.get("op") == "exit":
                    callback = self._exits.pop(msg["pid"], None)
                    if callback is not None:
                        callback(msg["status"])
                    else:
                        self._early_exits[msg["pid"]] = msg["status"]
                    continue
                pending = self._pending.get(msg.get("id"))
                if pending is None:
                    _wire.close_all(fds)
                    continue
                event, slot = pending
                slot.extend((msg, fds))
                event.set()
        finally:
            self.broken = self.broken or "its reader stopped"
            for event, _ in self._pending.values():
                event.set()
            for callback in self._exits.values():
                callback(-1)
            self._exits.clear()

    async def aclose(self, grace: float = 2.0) -> None:
        """Closes the connection and reaps the supervisor once it has exited.

        The supervisor SIGKILLs our undetached actors and exits when every
        detached one has; while detached actors outlive us, it is left running
        and is reaped when this process exits.
        """
        if self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace):
            try:
                while os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                    await anyio.sleep(0.005)
            except ChildProcessError:
                pass


class _Runtime:
    def __init__(self, tg: anyio.abc.TaskGroup) -> None:
        self.tg = tg
        self._supervisor: _SupervisorClient | None = None

    def adopt_supervisor(self, sock: socket.socket, pid: int) -> None:
        self._supervisor = _SupervisorClient(sock, pid)
        self.tg.start_soon(self._supervisor.serve, name="pactors supervisor reader")

    def supervisor(self) -> _SupervisorClient:
        if self._supervisor is None:
            sock, pid = _supervisor.start()
            self.adopt_supervisor(sock, pid)
        assert self._supervisor is not None
        return self._supervisor

    async def aclose(self) -> None:
        if self._supervisor is not None:
            await self._supervisor.aclose()


async def _run_actor_body(runtime: _Runtime, inbox: Inbox,
                          body: Callable[[Inbox], Awaitable[Any]]) -> Any:
    """Runs ``body(inbox)`` as an actor: its own context, its children killed after."""
    ctx = _ActorContext(runtime, inbox)
    token = _current.set(ctx)
    try:
        return await body(inbox)
    finally:
        _current.reset(token)
        ctx.kill_children()
        inbox.close()


def run(main: Callable[..., Awaitable[Any]], *args: Any, backend: str = "asyncio") -> Any:
    """Runs the program's ``main(*args)`` as the root actor and returns its result.

    Forks the supervisor first, before any thread or event loop exists, so
    that every subprocess actor is forked from a clean single-threaded image.
    """
    sup = _supervisor.start()

    async def root() -> Any:
        runtime: _Runtime | None = None
        try:
            async with anyio.create_task_group() as tg:
                runtime = _Runtime(tg)
                runtime.adopt_supervisor(*sup)
                try:
                    return await _run_actor_body(runtime, Inbox(), lambda _inbox: main(*args))
                finally:
                    tg.cancel_scope.cancel()
        finally:
            # After the task group: the supervisor reader has stopped by now.
            if runtime is not None:
                await runtime.aclose()

    try:
        return anyio.run(root, backend=backend,
                         backend_options=_loop.backend_options(backend))
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


def _exception_fields(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__qualname__,
        "message": str(exc)[:65536],
        "traceback": "".join(traceback.format_exception(exc))[-262144:],
    }


def run_process_actor(entry: Any, environment: dict[str, str] | None, inbox_fd: int,
                      report: Callable[[int, dict[str, Any]], None]) -> int:
    """The body of a subprocess actor after its init script; returns the exit status."""
    try:
        return anyio.run(process_actor, entry, environment, inbox_fd, report,
                         backend_options=_loop.backend_options("asyncio"))
    except BaseException as e:  # from the event loop itself
        return _error_status(e, report)


async def process_actor(entry: Any, environment: dict[str, str] | None, inbox_fd: int,
                        report: Callable[[int, dict[str, Any]], None]) -> int:
    """Runs a subprocess actor's main in the running event loop; returns its status.

    An exception escaping main is sent to the parent with ``report``.
    """
    from . import vm

    os.environ.clear()
    os.environ.update(environment or {})
    runtime: _Runtime | None = None
    try:
        func = vm.resolve_entry(entry)
        inbox = Inbox()
        inbox._add_source(socket.socket(fileno=inbox_fd))
        try:
            async with anyio.create_task_group() as tg:
                runtime = _Runtime(tg)
                try:
                    result = await _run_actor_body(runtime, inbox, func)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            if runtime is not None:
                await runtime.aclose()
        return _exit_status(result)
    except BaseException as e:
        if isinstance(_unwrap(e), asyncio.CancelledError):
            # Cancelled from outside: asyncio's runner does that on SIGINT,
            # and turns it into the KeyboardInterrupt run_process_actor reports.
            raise
        return _error_status(e, report)


def _error_status(exc: BaseException, report: Callable[[int, dict[str, Any]], None]) -> int:
    error = _unwrap(exc)
    if isinstance(error, SystemExit):  # as the interpreter itself treats it
        if error.code is None or isinstance(error.code, int):
            return int(error.code or 0) & 0xFF
        print(error.code, file=sys.stderr, flush=True)
        return 1
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    report(_wire.ACTOR_ERROR, _exception_fields(error))
    return 1


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _exit_status(result: Any) -> int:
    """An int returned by main is the exit status; anything else means 0."""
    if isinstance(result, int) and not isinstance(result, bool):
        return result & 0xFF
    return 0
