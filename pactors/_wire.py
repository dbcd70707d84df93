"""Frames over AF_UNIX SOCK_SEQPACKET sockets, with descriptors.

A frame is one datagram: a kind byte, a flag byte, the payload, and up to
``MAX_FDS`` descriptors in SCM_RIGHTS. A payload larger than ``INLINE_MAX``
travels in a sealed memfd sent as the first descriptor, so the limit on a
message does not depend on socket buffer sizes.

Receiving always uses MSG_CMSG_CLOEXEC, and treats MSG_TRUNC and MSG_CTRUNC
as errors: anyio's own fd passing silently drops both (see
python-building-blocks.md, section 3).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import struct
import threading
from typing import Any

import anyio

from ._codec import MAX_FDS, MAX_MESSAGE_BYTES
from ._errors import MessageError

# Frame kinds.
MSG = 1  # a message for the inbox
NEW_SOURCE = 2  # the one descriptor is a new sender socket for this inbox
BODY = 3  # parent to child at spawn: what to run (the only pickled frame)
INIT_ERROR = 4  # child to parent: the init script failed
ACTOR_ERROR = 5  # child to parent: an exception escaped main

_F_SPILL = 1

INLINE_MAX = 64 * 1024
_HEADER = struct.Struct("<BB")
_HEADERS = {kind: _HEADER.pack(kind, 0) for kind in (MSG, NEW_SOURCE, BODY, INIT_ERROR,
                                                      ACTOR_ERROR)}
_SPILL = struct.Struct("<BBQ")
_REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_RECV_BUFSIZE = _SPILL.size + INLINE_MAX
_ANCBUFSIZE = socket.CMSG_SPACE((MAX_FDS + 1) * 4)
# Plain ints: or-ing the socket module's IntFlag members runs enum code,
# a microsecond a time on every message.
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)


class Frame:
    __slots__ = ("fds", "kind", "payload")

    def __init__(self, kind: int, payload: bytearray, fds: list[int]) -> None:
        self.kind = kind
        self.payload = payload
        self.fds = fds

    def close_fds(self) -> None:
        close_later(self.fds)
        self.fds = []


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


CLOSER_THREAD = "pactors-closer"
_closer = threading.Condition(threading.Lock())
_to_close: list[int] = []  # what the closer thread has yet to close
_closer_pid = 0  # the process whose closer thread runs now, or 0


def close_later(fds: list[int]) -> None:
    """Closes descriptors that a peer sent, on a thread of ours.

    Closing one can block for as long as its sender likes (a TCP socket with
    SO_LINGER and unsent data, a file on a FUSE mount that never answers),
    so never on the event loop. The thread ends once nothing is left to
    close: a process that has nothing to close runs no thread.
    """
    global _closer_pid
    if not fds:
        return
    with _closer:
        _to_close.extend(fds)
        if _closer_pid == os.getpid():
            return
        _closer_pid = os.getpid()  # after a fork, the parent's thread is not ours
    threading.Thread(target=_close_pending, name=CLOSER_THREAD, daemon=True).start()


def _close_pending() -> None:
    global _closer_pid
    while True:
        with _closer:
            fds = list(_to_close)
            _to_close.clear()
            if not fds:
                _closer_pid = 0
                _closer.notify_all()
                return
        close_all(fds)


def wait_closed(timeout: float | None = None) -> bool:
    """Waits until every descriptor given to ``close_later`` is closed;
    False if ``timeout`` (seconds) ran out first."""
    with _closer:
        return _closer.wait_for(lambda: _closer_pid != os.getpid(), timeout)


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of close-on-exec SEQPACKET sockets."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


class _Packed:
    """A frame ready to send: the datagram and its descriptors. Used as a
    context manager, which closes the memfd a large payload spilled into."""

    __slots__ = ("_memfd", "data", "fds")

    def __init__(self, kind: int, payload: bytes | bytearray | memoryview,
                 fds: list[int]) -> None:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(payload)} bytes exceeds the limit of "
                               f"{MAX_MESSAGE_BYTES} bytes")
        if len(fds) > MAX_FDS:
            raise MessageError(
                f"a message carries at most {MAX_FDS} descriptors, not {len(fds)}")
        self._memfd: int | None = None
        if len(payload) <= INLINE_MAX:
            self.data, self.fds = _HEADERS[kind] + payload, fds
            return
        memfd = os.memfd_create("pactors-msg", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(memfd, view):]
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(memfd)
            raise
        self._memfd = memfd
        self.data, self.fds = _SPILL.pack(kind, _F_SPILL, len(payload)), [memfd, *fds]

    def __enter__(self) -> _Packed:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._memfd is not None:
            os.close(self._memfd)


def _sendmsg(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if not fds:  # most frames: no list of buffers, no ancillary data
        sock.send(data, _SEND_FLAGS)
        return
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                 _SEND_FLAGS)


def send_frame_blocking(sock: socket.socket, kind: int, payload: bytes | bytearray,
                        fds: list[int] = []) -> None:  # noqa: B006 - never mutated
    with _Packed(kind, payload, fds) as frame:
        while True:
            try:
                _sendmsg(sock, frame.data, frame.fds)
                return
            except BlockingIOError:
                select.select([], [sock], [])


_MSG_HEADER = _HEADERS[MSG]


def send_message_nowait(sock: socket.socket, payload: bytes,
                        fds: list[int] = []) -> None:  # noqa: B006 - never mutated
    """Sends a message frame; BlockingIOError when the socket is full."""
    if not fds and len(payload) <= INLINE_MAX:  # most: one send(2), nothing to build
        sock.send(_MSG_HEADER + payload, _SEND_FLAGS)
        return
    with _Packed(MSG, payload, fds) as frame:
        _sendmsg(sock, frame.data, frame.fds)


async def send_frame(sock: socket.socket, kind: int, payload: bytes | bytearray,
                     fds: list[int] = []) -> None:  # noqa: B006 - never mutated
    """Sends one frame, waiting while the socket is full."""
    with _Packed(kind, payload, fds) as frame:
        while True:
            try:
                _sendmsg(sock, frame.data, frame.fds)
                return
            except BlockingIOError:
                await anyio.wait_writable(sock)


def _unspill(memfd: int, length: int) -> bytearray:
    if length > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {length} bytes exceeds the limit")
    st = os.fstat(memfd)
    seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    if (seals & _REQUIRED_SEALS) != _REQUIRED_SEALS or st.st_size != length:
        raise MessageError("message spill file is not a sealed memfd of the stated size")
    buf = bytearray(length)
    view = memoryview(buf)
    offset = 0
    while offset < length:
        n = os.preadv(memfd, [view[offset:]], offset)
        if n <= 0:
            raise MessageError("message spill file is short")
        offset += n
    return buf


def rights(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in recvmsg's ancillary data (SCM_RIGHTS)."""
    fds: list[int] = []
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(cdata[:len(cdata) - len(cdata) % arr.itemsize])
            fds.extend(arr)
    return fds


def recvmsg_fds(sock: socket.socket, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """One recvmsg on a control socket: the data and the descriptors it carried.

    A truncated packet (more than ``bufsize`` bytes or ``maxfds``
    descriptors) raises EMSGSIZE, its descriptors closed.
    """
    data, ancdata, flags, _ = sock.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * 4),
                                           socket.MSG_CMSG_CLOEXEC)
    fds = rights(ancdata)
    if flags & _TRUNCATED:
        close_all(fds)
        raise OSError(errno.EMSGSIZE, "control message truncated")
    return data, fds


def receive_buffer() -> bytearray:
    """A buffer for ``recv_nowait`` to reuse across calls."""
    return bytearray(_RECV_BUFSIZE)


def recv_nowait(sock: socket.socket, buf: bytearray) -> tuple[bytearray | None,
                                                              tuple[int, list[Any], int]]:
    """One recvmsg into ``buf``: the payload if it is a whole message frame
    with no descriptors (most are), else None; and what recvmsg returned (the
    byte count, the ancillary data and the flags), for ``parse``.

    Raises BlockingIOError when no frame is queued.
    """
    while True:
        try:
            nbytes, ancdata, flags, _ = sock.recvmsg_into([buf], _ANCBUFSIZE, _RECV_FLAGS)
            break
        except ConnectionResetError:
            # The peer closed with our messages unread. Linux reports that
            # once, ahead of what the peer had queued for us: read on.
            continue
    if (nbytes >= _HEADER.size and not ancdata and not flags & _TRUNCATED
            and buf[0] == MSG and not buf[1]):
        return buf[_HEADER.size:nbytes], (nbytes, ancdata, flags)
    return None, (nbytes, ancdata, flags)


def parse(buf: bytearray, nbytes: int, ancdata: list[Any], flags: int) -> Frame | None:
    """The frame in what ``recv_nowait`` received; None at end of stream.

    Raises MessageError when the frame is malformed, truncated or carries
    too many descriptors; its descriptors are closed then.
    """
    fds = rights(ancdata)
    try:
        if flags & _TRUNCATED:
            raise MessageError("message truncated: too large or too many descriptors")
        if nbytes == 0 and not fds:
            return None
        if nbytes < _HEADER.size:
            raise MessageError("runt frame")
        kind, fflags = _HEADER.unpack_from(buf)
        if fflags & _F_SPILL:
            if nbytes != _SPILL.size or not fds:
                raise MessageError("malformed spilled frame")
            (length,) = struct.unpack_from("<Q", buf, _HEADER.size)
            memfd = fds.pop(0)
            try:
                payload = _unspill(memfd, length)
            except BaseException:
                close_later([memfd])  # the peer's, and not necessarily a memfd
                raise
            os.close(memfd)  # a sealed memfd, checked: its close cannot block
        elif fflags:
            raise MessageError("unknown frame flags")
        else:
            payload = buf[_HEADER.size:nbytes]
        if len(fds) > MAX_FDS:
            raise MessageError(f"frame carries more than {MAX_FDS} descriptors")
        return Frame(kind, payload, fds)
    except BaseException:
        close_later(fds)
        raise


def recv_frame_nowait(sock: socket.socket, buf: bytearray | None = None) -> Frame | None:
    """Receives one frame without blocking (``recv_nowait``, then ``parse``)."""
    if buf is None:
        buf = receive_buffer()
    return parse(buf, *recv_nowait(sock, buf)[1])


def recv_frame_blocking(sock: socket.socket) -> Frame | None:
    while True:
        try:
            return recv_frame_nowait(sock)
        except BlockingIOError:
            select.select([sock], [], [])
        except InterruptedError:
            continue


def is_disconnect(exc: OSError) -> bool:
    return exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)
