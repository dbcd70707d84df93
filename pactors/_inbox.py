"""Inboxes, channels, and the values a message may carry.

An inbox reads from any number of *sources*: one SEQPACKET socket per sender.
An address is a capability: encoding one mints a fresh socket pair, hands the
read end to the target inbox and sends the write end, so every holder has its
own one-way channel that it alone can close (Emilua's model).

An inbox watches its sources with one epoll descriptor, and reads only while
somebody is in ``receive()``: the sources' socket buffers are the flow control.
On pactors' own event loop (``_loop.ActorLoop``) a receiver blocks on that
descriptor directly while the loop has nothing else to do, which saves two
turns of the loop per message. Otherwise, under asyncio, the loop keeps
watching that descriptor between receives (``anyio.wait_readable`` would add
and remove it at each wait: two epoll_ctl calls and the selector's
bookkeeping, a third of a round trip).
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import socket
import stat
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel

from . import _codec, _wire
from ._errors import ChannelClosed, MessageError, NoSenders
from ._loop import ActorLoop

MAX_SOURCES = 4096
# A receiver that always finds a message waiting never waits; it lets the
# other tasks run after this many, so a peer that keeps the inbox full
# cannot hold up the rest of the process.
FAIRNESS_BATCH = 32


class Fd:
    """A file descriptor inside a message.

    Wrap a descriptor (an int or anything with ``fileno()``) to send it; the
    sender keeps its own copy. A received ``Fd`` is close-on-exec and owned by
    the receiver: use it as an int (``os.write(msg["fd"], ...)``), and call
    ``close()``, or ``detach()`` to take the raw descriptor. An owned ``Fd``
    that is garbage-collected is closed on a thread of pactors', not on the
    event loop: closing a peer's descriptor can block as long as the peer
    likes (``close()`` closes at once: the caller decides).
    """

    __slots__ = ("_fd", "_owned")

    def __init__(self, fd: int | Any) -> None:
        if isinstance(fd, Fd) or not isinstance(fd, int):
            fd = fd.fileno()
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"not a file descriptor: {fd!r}")
        self._fd: int = fd
        self._owned = False

    @classmethod
    def _adopt(cls, fd: int) -> Fd:
        obj = cls(fd)
        obj._owned = True
        return obj

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("Fd is closed or detached")
        return self._fd

    __index__ = fileno
    __int__ = fileno

    def detach(self) -> int:
        """Returns the descriptor and gives up ownership of it."""
        fd = self.fileno()
        self._fd = -1
        self._owned = False
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._owned:
            self._owned = False
            os.close(fd)

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._owned and self._fd >= 0:
            # Received from a peer: its close may block (see close_later).
            _wire.close_later([self._fd])

    def __repr__(self) -> str:
        state = "owned" if self._owned else "borrowed"
        return f"<pactors.Fd {self._fd} {state}>" if self._fd >= 0 else "<pactors.Fd closed>"


def _classify(value: Any) -> str | None:
    if isinstance(value, Fd):
        return _codec.HANDLE_FD
    if isinstance(value, (Channel, Inbox)):
        return _codec.HANDLE_ADDRESS
    return None


class Channel:
    """A one-way channel into an inbox: an actor's address as its holder sees it.

    ``await send(msg)`` returns once the kernel has queued the message; it is
    not a rendezvous. ``close()`` ends this channel only; other holders of the
    same inbox's address are unaffected. A channel is itself an address:
    putting it in a message gives the receiver a new channel of its own.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._lock = anyio.Lock(fast_acquire=True)

    @property
    def address(self) -> Channel:
        """The value to put in a message to give the receiver its own channel."""
        return self

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ChannelClosed("the channel is closed")
        return self._sock

    async def send(self, msg: Any) -> None:
        """Encodes ``msg`` and queues it for the inbox.

        Raises MessageError when ``msg`` cannot be sent, and ChannelClosed when
        the channel was closed or the inbox is gone.
        """
        data, handles = _codec.encode(msg, _classify)
        sock = self._sock
        if sock is not None and not self._lock.locked():
            # Nobody else sending on this channel: no lock needed unless the
            # socket is full (the lock keeps the waiters in order) or an
            # address must be minted (which awaits).
            ready_fds = _fd_numbers(handles)
            if ready_fds is not None:
                try:
                    _wire.send_message_nowait(sock, data, ready_fds)
                    return
                except BlockingIOError:
                    pass
                except OSError as e:
                    if _wire.is_disconnect(e):
                        self._on_disconnect()
                    raise
        async with self._lock:
            sock = self._socket()
            fds: list[int] = []
            minted: list[int] = []
            try:
                for handle in handles:
                    if isinstance(handle, Fd):
                        fds.append(_fd_number(handle))
                    else:
                        # Our own address: we already hold our lock.
                        fd = await (self._mint_locked() if handle is self else handle._mint())
                        minted.append(fd)
                        fds.append(fd)
                await self._send_frame(sock, _wire.MSG, data, fds)
            finally:
                _wire.close_all(minted)

    async def _send_frame(self, sock: socket.socket, kind: int, data: bytes,
                          fds: list[int]) -> None:
        try:
            await _wire.send_frame(sock, kind, data, fds)
        except anyio.ClosedResourceError:
            raise ChannelClosed("the channel was closed while sending") from None
        except OSError as e:
            if _wire.is_disconnect(e):
                self._on_disconnect()
            raise

    def _on_disconnect(self) -> None:
        raise ChannelClosed("the receiving inbox is gone (its actor ended or closed it)")

    async def _mint(self) -> int:
        """Creates a new sender for our inbox; returns its write end."""
        async with self._lock:
            return await self._mint_locked()

    async def _mint_locked(self) -> int:
        reader, writer = _wire.seqpacket_pair()
        try:
            reader.shutdown(socket.SHUT_WR)
            writer.shutdown(socket.SHUT_RD)
            await self._send_frame(self._socket(), _wire.NEW_SOURCE, b"", [reader.fileno()])
            return writer.detach()
        except BaseException:
            writer.close()
            raise
        finally:
            reader.close()

    def close(self) -> None:
        """Closes this channel. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if _in_async():
                anyio.notify_closing(sock)
            sock.close()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<pactors.Channel fd={self._sock.fileno() if self._sock else 'closed'}>"


def _in_async() -> bool:
    try:
        anyio.get_current_task()
        return True
    except anyio.NoEventLoopError:
        return False


class Inbox:
    """Where an actor receives its messages.

    ``receive()`` returns the next message from any sender. It raises
    ChannelClosed once the inbox is closed, and NoSenders when every sender is
    gone (nobody could ever send again). One receiver at a time: a second
    concurrent ``receive()`` raises RuntimeError.

    A malformed message closes the channel it came on, and only that one.
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = select.epoll(flags=select.EPOLL_CLOEXEC)
        self._sources: dict[int, socket.socket] = {}
        self._ready: collections.deque[int] = collections.deque()
        self._receiving = False
        self._unyielded = 0  # messages taken since this receiver last let others run
        self._buffer = _wire.receive_buffer()
        self._watcher: asyncio.AbstractEventLoop | None = None  # watching our epoll fd
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0  # channels closed because they sent malformed messages

    # Sources -----------------------------------------------------------

    def _add_source(self, sock: socket.socket) -> None:
        if self._epoll is None:
            sock.close()
            return
        if len(self._sources) >= MAX_SOURCES:
            sock.close()
            raise MessageError(f"inbox already has {MAX_SOURCES} senders")
        sock.setblocking(False)
        self._sources[sock.fileno()] = sock
        self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _drop_source(self, fd: int) -> None:
        sock = self._sources.pop(fd, None)
        if sock is not None:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            sock.close()

    def _adopt_source_fd(self, fd: int) -> None:
        """Adds a received descriptor as a source after checking what it is."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode):
                raise MessageError("new sender is not a socket")
            sock = socket.socket(fileno=fd)
        except BaseException:
            _wire.close_later([fd])
            raise
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            _wire.close_later([sock.detach()])
            raise MessageError("new sender is not a UNIX seqpacket socket")
        self._add_source(sock)

    @property
    def address(self) -> Inbox:
        """The value to put in a message so the receiver can send to this inbox."""
        return self

    async def _mint(self) -> int:
        if self._epoll is None:
            raise ChannelClosed("the inbox is closed")
        reader, writer = _wire.seqpacket_pair()
        reader.shutdown(socket.SHUT_WR)
        writer.shutdown(socket.SHUT_RD)
        self._add_source(reader)
        return writer.detach()

    def _new_local_channel(self) -> Channel:
        """A channel into this inbox for an actor in this process."""
        reader, writer = _wire.seqpacket_pair()
        self._add_source(reader)
        return Channel(writer)

    # Receiving ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._epoll is None

    async def receive(self) -> Any:
        """Waits for and returns the next message."""
        if self._receiving:
            raise RuntimeError("another task is already receiving on this inbox")
        self._receiving = True
        ready = self._ready
        buf = self._buffer
        try:
            if self._unyielded >= FAIRNESS_BATCH:
                # Before taking a message, so a cancellation here loses none.
                self._unyielded = 0
                await anyio.lowlevel.checkpoint()
            while True:
                if not ready:
                    ep = self._epoll
                    if ep is None:
                        raise ChannelClosed("the inbox is closed")
                    if not self._sources:
                        raise NoSenders("no senders left for this inbox: send its address "
                                        "to somebody before receiving on it")
                    if self._wait_if_idle(ep):
                        self._unyielded = 0  # nobody else was waiting to run
                    if not ready:
                        events = ep.poll(0)
                        if not events:
                            await self._wait_readable(ep)
                            self._unyielded = 0
                            continue
                        ready.extend([fd for fd, _ in events])
                fd = ready.popleft()
                sock = self._sources.get(fd)
                if sock is None:
                    continue
                try:
                    payload, received = _wire.recv_nowait(sock, buf)
                except BlockingIOError:
                    continue
                except OSError:
                    self.dropped += 1
                    self._drop_source(fd)
                    continue
                self._unyielded += 1
                if payload is not None:
                    try:  # most messages: no descriptors, no frame to build
                        return _codec.decode(payload, 0, _no_handles)
                    except MessageError:
                        self.dropped += 1
                        self._drop_source(fd)
                        continue
                found, msg = self._read_frame(fd, received)
                if found:
                    return msg
        finally:
            self._receiving = False

    def _wait_if_idle(self, ep: select.epoll) -> bool:
        """On pactors' loop, while it has nothing else to do, blocks until a
        source is readable; True then. With one source, that source is
        polled itself (no epoll to wake through) and queued in ``_ready``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if type(loop) is not ActorLoop:
            return False
        if len(self._sources) == 1:
            (fd,) = self._sources
            if loop.wait_readable_if_idle(fd):
                self._ready.append(fd)
                return True
            return False
        return loop.wait_readable_if_idle(ep.fileno())

    async def _wait_readable(self, ep: select.epoll) -> None:
        """Waits until a source may have something; returns early if closed."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: the portable way
            try:
                await anyio.wait_readable(ep.fileno())
            except anyio.ClosedResourceError:
                pass
            return
        if self._watcher is not loop:
            self._unwatch()
            loop.add_reader(ep.fileno(), self._on_readable)
            self._watcher = loop
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            # Nobody receives now: stop watching, or the level-triggered
            # loop would call us on every iteration until somebody does.
            self._unwatch()
        elif not waiter.done():
            waiter.set_result(None)

    def _unwatch(self) -> None:
        loop, self._watcher = self._watcher, None
        if loop is not None and self._epoll is not None and not loop.is_closed():
            loop.remove_reader(self._epoll.fileno())

    def _read_frame(self, fd: int, received: tuple[int, list[Any], int]) -> tuple[bool, Any]:
        """Handles any frame but a plain message: (True, message) or (False, None)."""
        try:
            frame = _wire.parse(self._buffer, *received)
        except MessageError:
            self.dropped += 1
            self._drop_source(fd)
            return False, None
        if frame is None:
            self._drop_source(fd)
            return False, None
        try:
            if frame.kind == _wire.NEW_SOURCE:
                if len(frame.fds) != 1 or frame.payload:
                    raise MessageError("malformed new-sender frame")
                if len(self._sources) >= MAX_SOURCES:
                    # Refuse the new sender, not the one asking for it.
                    frame.close_fds()
                    return False, None
                self._adopt_source_fd(frame.fds.pop())
                return False, None
            if frame.kind != _wire.MSG:
                raise MessageError(f"unexpected frame kind {frame.kind}")
            return True, decode_message(frame)
        except MessageError:
            frame.close_fds()
            self.dropped += 1
            self._drop_source(fd)
            return False, None

    def close(self) -> None:
        """Closes the inbox and every sender's channel. Idempotent."""
        if self._epoll is None:
            return
        self._unwatch()
        ep, self._epoll = self._epoll, None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # the receiver sees the inbox closed
        elif _in_async():
            anyio.notify_closing(ep.fileno())
        for sock in self._sources.values():
            sock.close()
        self._sources.clear()
        self._ready.clear()
        ep.close()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.receive()
            except (ChannelClosed, NoSenders):
                return

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._sources)} senders"
        return f"<pactors.Inbox {state}>"


def decode_message(frame: _wire.Frame) -> Any:
    """Decodes a MSG frame, taking ownership of its descriptors."""
    fds = frame.fds
    if not fds:  # most messages: the codec never asks for a handle then
        return _codec.decode(frame.payload, 0, _no_handles)
    made: list[Fd | _ChannelRef] = []

    def make_handle(kind: str, index: int) -> Any:
        if kind == _codec.HANDLE_FD:
            fd_obj = Fd._adopt(fds[index])
            made.append(fd_obj)
            return fd_obj
        try:
            sock = socket.socket(fileno=fds[index])
        except OSError:
            raise MessageError("address is not a socket") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.detach()
            raise MessageError("address is not a UNIX seqpacket socket")
        channel = Channel(sock)
        made.append(_ChannelRef(channel))
        return channel

    try:
        value = _codec.decode(frame.payload, len(fds), make_handle)
    except MessageError:
        for obj in made:
            obj.detach()
        raise
    frame.fds = []
    return value


def _fd_number(handle: Fd) -> int:
    """The descriptor an ``Fd`` in a message names, checked open: sendmsg
    would fail with EBADF, which reads as "the receiver is gone"."""
    fd = handle.fileno()
    try:
        os.fstat(fd)
    except OSError:
        raise MessageError(f"Fd {fd} is not an open file descriptor") from None
    return fd


def _fd_numbers(handles: list[Any]) -> list[int] | None:
    """The descriptors of ``handles`` if all are ``Fd`` (checked open), else None."""
    if not handles:  # most messages
        return handles
    for handle in handles:
        if not isinstance(handle, Fd):
            return None
    return [_fd_number(handle) for handle in handles]


def _no_handles(kind: str, index: int) -> Any:
    raise AssertionError("the codec named a descriptor the frame does not carry")


class _ChannelRef:
    """Lets a half-decoded channel give its descriptor back on failure."""

    __slots__ = ("channel",)

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def detach(self) -> int:
        sock = self.channel._sock
        self.channel._sock = None
        return sock.detach() if sock is not None else -1
