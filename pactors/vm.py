"""Spawning actors: ``spawn_actor``, its options, and the ``Actor`` handle.

The name follows Emilua's ``spawn_vm``: an actor is a VM of its own, sharing
nothing with its spawner; messages are encoded even between actors of one
process.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import cloudpickle

from . import _linux, _supervisor, _wire
from ._errors import ActorError, ChannelClosed, InitError, MessageError, PactorsError
from ._inbox import Channel, Inbox, decode_message
from ._runtime import _context, _exception_fields, _exit_status, _run_actor_body

# "share", None, an int, a pactors.Fd or anything with fileno().
StdioSpec = Any
Entry = str | os.PathLike[str] | Callable[[Inbox], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Init:
    """An init script and the descriptor it gets as ``arg``.

    The script is Python source run in the child before the actor starts, with
    the syscall vocabulary described in docs/init-script.md. ``arg`` (an int,
    a socket or an ``Fd``) is sent to the child only; the parent keeps its own
    copy and should close it once the child has it.
    """

    script: str
    arg: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.script, str):
            raise TypeError(f"Init.script must be str, not {type(self.script).__name__}")
        if self.arg is not None:
            _fileno("Init.arg", self.arg)


@dataclasses.dataclass(frozen=True)
class Subprocess:
    """How to run a subprocess actor.

    ``stdin``/``stdout``/``stderr``: ``"share"`` (the program's own stdio, as
    it was when ``pactors.run`` started), a descriptor (int, ``Fd`` or an
    object with ``fileno()``), or None (/dev/null). ``environment`` becomes
    the child's whole environment (None: empty). ``newns_*`` unshare the named
    namespaces; ``init`` runs an init script before the actor.
    """

    stdin: StdioSpec = None
    stdout: StdioSpec = "share"
    stderr: StdioSpec = "share"
    environment: Mapping[str, str] | None = None
    newns_user: bool = False
    newns_mount: bool = False
    newns_pid: bool = False
    newns_net: bool = False
    newns_uts: bool = False
    newns_ipc: bool = False
    init: Init | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("stdin", "stdout", "stderr"):
            value = getattr(self, name)
            if value is not None and value != "share":
                if isinstance(value, str):
                    raise ValueError(f"Subprocess.{name} must be 'share', a descriptor or "
                                     f"None, not {value!r}")
                _fileno(f"Subprocess.{name}", value)
        if self.environment is not None:
            if not isinstance(self.environment, Mapping):
                raise TypeError("Subprocess.environment must be a dict of str to str")
            for key, val in self.environment.items():
                if not isinstance(key, str) or not isinstance(val, str):
                    raise TypeError(f"Subprocess.environment must map str to str; "
                                    f"got {key!r}: {val!r}")
                if not key or "=" in key or "\0" in key or "\0" in val:
                    raise ValueError(f"invalid environment variable {key!r}")
        for name in ("newns_user", "newns_mount", "newns_pid", "newns_net", "newns_uts",
                     "newns_ipc"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Subprocess.{name} must be a bool")
        if isinstance(self.init, Mapping):
            object.__setattr__(self, "init", _coerce(Init, self.init, "init"))
        if self.init is not None and not isinstance(self.init, Init):
            raise TypeError("Subprocess.init must be a pactors.Init or a dict")

    @property
    def clone_flags(self) -> int:
        return ((_linux.CLONE_NEWUSER if self.newns_user else 0)
                | (_linux.CLONE_NEWNS if self.newns_mount else 0)
                | (_linux.CLONE_NEWPID if self.newns_pid else 0)
                | (_linux.CLONE_NEWNET if self.newns_net else 0)
                | (_linux.CLONE_NEWUTS if self.newns_uts else 0)
                | (_linux.CLONE_NEWIPC if self.newns_ipc else 0))


def _coerce(cls: Any, value: Any, what: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a pactors.{cls.__name__} or a dict, "
                        f"not {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise TypeError(f"unknown {what} option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return cls(**value)


def _fileno(what: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a file descriptor, not a bool")
    try:
        fd = value if isinstance(value, int) else value.fileno()
    except (AttributeError, ValueError) as e:
        raise TypeError(f"{what} must be a file descriptor: {e}") from None
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"{what} is not an open file descriptor")
    try:
        os.fstat(fd)
    except OSError as e:
        raise OSError(e.errno, f"{what} (fd {fd}) is not an open file descriptor") from None
    return fd


def resolve_entry(entry: Any) -> Callable[[Inbox], Awaitable[Any]]:
    """The actor's entry point: the callable itself, or ``main`` of a module.

    A string with a "/" or ending in ".py" is a file path; otherwise it is a
    dotted module name.
    """
    if callable(entry):
        return entry  # type: ignore[no-any-return]
    name = os.fspath(entry)
    if "/" in name or name.endswith(".py"):
        with open(name, "rb") as f:
            source = f.read()
        namespace: dict[str, Any] = {"__name__": "__pactors_actor__", "__file__": name}
        exec(compile(source, name, "exec"), namespace)
        main = namespace.get("main")
    else:
        main = getattr(importlib.import_module(name), "main", None)
    if not callable(main):
        raise PactorsError(f"actor module {name!r} has no async main(inbox)")
    return main  # type: ignore[no-any-return]


class Actor:
    """A handle on a spawned actor.

    ``send`` queues a message for its inbox; ``wait`` returns its exit status
    (128+N when killed by signal N) or raises ``ActorError``/``InitError``;
    ``kill`` sends exactly the signal given; ``detach`` lets it outlive its
    spawner; ``address`` is what to put in a message to let others reach it.
    """

    def __init__(self, channel: Channel, *, pid: int | None = None,
                 pidfd: int | None = None) -> None:
        self._channel = channel
        self.child_pid = pid
        self._pidfd = pidfd
        # Subprocess actors report init and actor errors back on the channel.
        self._status_sock: socket.socket | None = (
            socket.socket(fileno=os.dup(channel._socket().fileno())) if pid else None)
        self._done = anyio.Event()
        self._status: int | None = None
        self._error: BaseException | None = None
        self._scope: anyio.CancelScope | None = None if pid else anyio.CancelScope()
        self._detached = False
        self._spawner: Any = None  # the _ActorContext whose children we are
        self._supervisor: Any = None

    @property
    def address(self) -> Channel:
        return self._channel

    @property
    def pidfd(self) -> int | None:
        """A pidfd of the actor's process, or None (in-process, or it has exited).

        While the pidfd is not readable the process runs, so ``child_pid``
        still names it: files opened under ``/proc/<child_pid>`` before that
        check are the actor's own.
        """
        return self._pidfd

    async def send(self, msg: Any) -> None:
        """Queues ``msg`` for the actor's inbox.

        Raises InitError if the actor's init script failed, ChannelClosed if
        the actor is gone or this handle was closed, MessageError for a value
        that cannot be sent.
        """
        try:
            await self._channel.send(msg)
        except ChannelClosed:
            self._raise_reported()
            who = f"actor (pid {self.child_pid})" if self.child_pid else "actor"
            if self._channel.closed:
                raise
            raise ChannelClosed(f"{who} has exited; its inbox is gone") from None

    def close(self) -> None:
        """Closes this handle's channel; the actor sees its sender go."""
        sock = self._channel._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._channel.close()

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """Sends ``signum`` to the actor, and nothing else.

        For an in-process actor any signal cancels it and ``wait`` returns 128+N.
        """
        if self._done.is_set():
            return
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass
        elif self._scope is not None:
            self._status = 128 + int(signum)
            self._scope.cancel()

    def detach(self) -> None:
        """Lets the actor outlive its spawner."""
        self._detached = True
        self._leave_spawner()
        if self._supervisor is not None and self.child_pid:
            self._supervisor.notify({"op": "detach", "pid": self.child_pid})

    async def wait(self) -> int:
        """Waits for the actor to end; returns its exit status.

        Raises InitError when its init script failed and ActorError when an
        exception escaped its main.
        """
        await self._done.wait()
        self._raise_reported()
        if self._error is not None:
            raise self._error
        assert self._status is not None
        return self._status

    def _raise_reported(self) -> None:
        """Raises an error the child reported on the channel, if any."""
        if isinstance(self._error, (InitError, ActorError)):
            raise self._error
        sock = self._status_sock
        if sock is None:
            return
        while True:
            try:
                frame = _wire.recv_frame_nowait(sock)
            except (BlockingIOError, OSError, MessageError):
                return
            if frame is None:
                return
            if frame.kind not in (_wire.INIT_ERROR, _wire.ACTOR_ERROR):
                frame.close_fds()
                continue
            try:
                fields = decode_message(frame)
            except MessageError:
                frame.close_fds()
                continue
            if not isinstance(fields, dict):
                continue
            if frame.kind == _wire.INIT_ERROR:
                self._error = InitError(**{k: fields.get(k) for k in InitError.FIELDS})
            else:
                self._error = ActorError(str(fields.get("type")), str(fields.get("message")),
                                         str(fields.get("traceback")))
            raise self._error

    def _on_exit(self, status: int) -> None:
        self._status = status
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        # The child's reports are queued by now: keep them, free the socket.
        try:
            self._raise_reported()
        except (InitError, ActorError):
            pass
        if self._status_sock is not None:
            self._status_sock.close()
            self._status_sock = None
        self._finish()

    def _finish(self) -> None:
        self._leave_spawner()
        self._done.set()

    def _leave_spawner(self) -> None:
        """No longer one of the children its spawner kills when it ends."""
        if self._spawner is not None:
            try:
                self._spawner.children.remove(self)
            except ValueError:
                pass
            self._spawner = None

    def _kill_on_parent_exit(self) -> None:
        if not self._detached:
            self.kill(signal.SIGKILL)
            if self._scope is not None:
                self._scope.cancel()

    async def _run_in_process(self, runtime: Any, inbox: Inbox,
                              func: Callable[[Inbox], Awaitable[Any]]) -> None:
        assert self._scope is not None
        try:
            with self._scope:
                result = await _run_actor_body(runtime, inbox, func)
                self._status = _exit_status(result)
        except Exception as e:
            fields = _exception_fields(e)
            self._error = ActorError(fields["type"], fields["message"], fields["traceback"])
            self._status = 1
        finally:
            if self._status is None:
                self._status = 128 + signal.SIGKILL
            self._finish()

    def __repr__(self) -> str:
        where = f"pid {self.child_pid}" if self.child_pid else "in-process"
        return f"<pactors.Actor {where}>"

    def __del__(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
        if self._status_sock is not None:
            self._status_sock.close()


async def spawn_actor(module: Entry, *, subprocess: Subprocess | Mapping[str, Any] | None = None
                      ) -> Actor:
    """Starts an actor and returns its handle as soon as it exists.

    ``module`` is a dotted module name, a path to a ``.py`` file or an async
    callable; the actor runs ``main(inbox)`` of the module, or the callable.
    Without ``subprocess`` the actor is a task of this process. With it, the
    actor is a new process forked from the supervisor; ``child_pid`` is valid
    on return, while its init script may still be waiting at a sync point.

    Spawn failures raise OSError with the errno.
    """
    ctx = _context()
    if subprocess is None:
        func = resolve_entry(module)
        reader, writer = _wire.seqpacket_pair()
        inbox = Inbox()
        inbox._add_source(reader)
        actor = Actor(Channel(writer))
        actor._spawner = ctx
        ctx.children.append(actor)
        ctx.runtime.tg.start_soon(actor._run_in_process, ctx.runtime, inbox, func,
                                  name=f"pactors actor {module!r}")
        return actor

    spec = _coerce(Subprocess, subprocess, "subprocess")
    supervisor = ctx.runtime.supervisor()
    if callable(module):
        body: dict[str, Any] = {"module": None, "callable": cloudpickle.dumps(module)}
    elif isinstance(module, (str, os.PathLike)):
        body = {"module": os.fspath(module), "callable": None}
    else:
        raise TypeError(f"module must be a module name, a path or an async callable, "
                        f"not {type(module).__name__}")
    script = spec.init.script.encode() if spec.init is not None else b""
    body.update(
        environment=dict(spec.environment) if spec.environment is not None else None,
        has_script=spec.init is not None,
        has_init_arg=spec.init is not None and spec.init.arg is not None,
        stderr_shared=spec.stderr == "share",
    )
    head = pickle.dumps(body)
    payload = struct.pack("<I", len(head)) + head + script

    stdio: list[str] = []
    stdio_fds: list[int] = []
    for name in ("stdin", "stdout", "stderr"):
        value = getattr(spec, name)
        if value == "share":
            stdio.append(_supervisor.STDIO_SHARE)
        elif value is None:
            stdio.append(_supervisor.STDIO_NULL)
        else:
            stdio.append(_supervisor.STDIO_FD)
            stdio_fds.append(_fileno(f"Subprocess.{name}", value))

    ours, theirs = _wire.seqpacket_pair()
    try:
        init_fds = [_fileno("Init.arg", spec.init.arg)] if body["has_init_arg"] else []
        # The body goes straight to the child: the supervisor never sees the
        # init script, its arg or the pickled callable.
        await _wire.send_frame(ours, _wire.BODY, payload, init_fds)
        # Once asked, the supervisor forks: a cancelled caller must still get
        # the handle registered, so that the child is not left running unowned.
        with anyio.CancelScope(shield=True):
            reply, fds = await supervisor.request(
                {"op": "spawn", "flags": spec.clone_flags, "stdio": stdio,
                 "init": spec.init is not None},
                [theirs.fileno(), *stdio_fds])
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    if reply.get("errno"):
        _wire.close_all(fds)
        ours.close()
        err = int(reply["errno"])
        raise OSError(err, f"{os.strerror(err)}: {reply.get('message', 'spawn failed')}")
    if len(fds) != 1:
        _wire.close_all(fds)
        ours.close()
        raise PactorsError("the supervisor's spawn reply carried no pidfd")
    actor = Actor(Channel(ours), pid=int(reply["pid"]), pidfd=fds[0])
    actor._supervisor = supervisor
    actor._spawner = ctx
    ctx.children.append(actor)
    supervisor.on_exit(int(reply["pid"]), actor._on_exit)
    try:
        await anyio.lowlevel.checkpoint_if_cancelled()
    except BaseException:
        actor.kill()  # cancelled while spawning: nobody will hold the handle
        raise
    return actor
