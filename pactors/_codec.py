"""The message codec: MessagePack that never runs code.

Messages cross trust boundaries (a container's actor talks to a root daemon),
so decoding only ever builds None, bool, int, float, str, bytes, list, tuple
and dict (str keys), plus two kinds of handle that stand for file descriptors
carried beside the bytes with SCM_RIGHTS: ``Fd`` and actor addresses.

The bytes are MessagePack (msgpack's C packer and unpacker), with four
extension types of ours: a handle is the index of its descriptor in the
SCM_RIGHTS array, a tuple is a nested message (MessagePack has only arrays),
and an int beyond 64 bits is its two's complement. Every descriptor must be
named exactly once, so none can be left unowned.

Before packing, one walk over the containers checks what MessagePack would
not: keys are str, nesting is at most ``MAX_DEPTH`` deep (so a reference
cycle fails too), and the message cannot be larger than the limit however
many times it repeats one value.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack

from ._errors import MessageError

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_FDS = 64
MAX_DEPTH = 64
MAX_INT_BYTES = 1024

EXT_FD = 1
EXT_ADDRESS = 2
EXT_TUPLE = 3
EXT_BIGINT = 4

HANDLE_FD = "fd"
HANDLE_ADDRESS = "address"

_INDEX = struct.Struct("<I")
_CONTAINERS = frozenset((dict, list, tuple))
_SIZED = frozenset((str, bytes, bytearray, memoryview))
_SCALARS = frozenset((type(None), bool, int, float))
_ALLOWED = ("None, bool, int, float, str, bytes, list, tuple, dict (str keys), "
            "Fd and addresses")


# Encoding ------------------------------------------------------------------

# A packer's first buffer (msgpack's default is 1 MiB): a tuple inside a
# message packs with a packer of its own while the outer one holds its buffer,
# and a fresh megabyte each time costs more than the rest of the message.
_PACKER_BUFFER = 4096


class _Encoding:
    """What the slow path's hook needs: the handles it found."""

    __slots__ = ("classify", "handles")

    def __init__(self, classify: Callable[[Any], str | None]) -> None:
        self.classify = classify
        self.handles: list[Any] = []

    def pack(self, value: Any) -> bytes:
        # surrogatepass: lone surrogates (os.fsdecode of a non-UTF-8 name)
        # travel too; the shared packer below makes them take this path.
        packer = msgpack.Packer(default=self.default, strict_types=True,
                                unicode_errors="surrogatepass", buf_size=_PACKER_BUFFER)
        return packer.pack(value)  # type: ignore[no-any-return]

    def default(self, value: Any) -> Any:
        """Called by the packer for what MessagePack has no type of its own for."""
        t = type(value)
        if t is tuple:
            return msgpack.ExtType(EXT_TUPLE, self.pack(list(value)))
        if t is int:  # beyond 64 bits
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) > MAX_INT_BYTES:
                raise MessageError("integer too large to send")
            return msgpack.ExtType(EXT_BIGINT, raw)
        kind = self.classify(value)
        if kind is None:
            raise MessageError(f"cannot send a value of type {t.__name__}: messages carry "
                               f"{_ALLOWED}")
        if len(self.handles) >= MAX_FDS:
            raise MessageError(f"a message carries at most {MAX_FDS} descriptors")
        code = EXT_FD if kind == HANDLE_FD else EXT_ADDRESS
        self.handles.append(value)
        return msgpack.ExtType(code, _INDEX.pack(len(self.handles) - 1))


# Messages with nothing but MessagePack's own types (most of them) go through
# one shared packer with no hook: it runs no Python code, so the GIL makes it
# safe to share between threads. The walk before packing finds the values it
# has no type for (tuples, handles...); those messages, and the rare one it
# refuses anyway (an int beyond 64 bits, a lone surrogate), take the packer
# with the hook. Trying the shared packer first would cost them an exception.
_PLAIN = msgpack.Packer(strict_types=True)


def encode(msg: Any, classify: Callable[[Any], str | None]) -> tuple[bytes, list[Any]]:
    """Encodes ``msg`` and returns the bytes and the handles in wire order.

    ``classify(value)`` returns ``HANDLE_FD`` or ``HANDLE_ADDRESS`` for values
    that travel as descriptors, and None for anything else.
    """
    others: list[Any] = []
    t = type(msg)
    if t in _CONTAINERS:
        _check(msg, 0, others)
    elif t not in _SIZED and t not in _SCALARS:
        others.append(msg)
    data: bytes | None = None
    handles: list[Any] = []
    try:
        if not others:
            try:
                data = _PLAIN.pack(msg)
            except (TypeError, OverflowError, UnicodeEncodeError):
                pass
        if data is None:
            state = _Encoding(classify)
            data = state.pack(msg)
            handles = state.handles
    except BufferError as e:  # a memoryview that is not contiguous
        raise MessageError(f"cannot send this memoryview: {e}") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    return data, handles


def _check(value: Any, depth: int, others: list[Any]) -> int:
    """Checks keys and depth; returns a lower bound of the encoded size, and
    adds to ``others`` what MessagePack has no type of its own for."""
    if depth >= MAX_DEPTH:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels "
                           "(or contains a reference cycle)")
    size = len(value)
    items = value
    if type(value) is dict:
        for key in value:
            if type(key) is not str:
                raise MessageError(
                    f"dict keys must be str, not {type(key).__name__} ({key!r:.40})")
            size += len(key)
        items = value.values()
    elif type(value) is tuple:
        others.append(value)
    for item in items:
        t = type(item)
        if t in _CONTAINERS:
            size += _check(item, depth + 1, others)
        elif t in _SIZED:
            size += len(item)
        elif t not in _SCALARS:
            others.append(item)
    if size > MAX_MESSAGE_BYTES:  # stops the walk of a list that repeats itself
        raise MessageError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    return size


# Decoding ------------------------------------------------------------------

class _Decoding:
    __slots__ = ("depth", "make_handle", "nfds", "used")

    def __init__(self, nfds: int, make_handle: Callable[[str, int], Any]) -> None:
        self.nfds = nfds
        self.used = [False] * nfds
        self.make_handle = make_handle
        self.depth = 0

    def unpack(self, data: Any) -> Any:
        return _unpack(data, self.ext)

    def ext(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            if self.depth >= MAX_DEPTH:  # each level recurses on the C stack
                raise MessageError(f"message nests deeper than {MAX_DEPTH} tuples")
            self.depth += 1
            items = self.unpack(data)
            self.depth -= 1
            if type(items) is not list:
                raise MessageError("malformed tuple")
            return tuple(items)
        if code in (EXT_FD, EXT_ADDRESS):
            if len(data) != _INDEX.size:
                raise MessageError("malformed descriptor reference")
            (index,) = _INDEX.unpack(data)
            if index >= self.nfds or self.used[index]:
                raise MessageError("message names a descriptor it does not carry")
            self.used[index] = True
            return self.make_handle(HANDLE_FD if code == EXT_FD else HANDLE_ADDRESS, index)
        if code == EXT_BIGINT:
            if not data or len(data) > MAX_INT_BYTES:
                raise MessageError("malformed or too large integer")
            return int.from_bytes(data, "little", signed=True)
        raise MessageError(f"unknown extension type {code}")


def _unpack(data: Any, ext_hook: Callable[[int, bytes], Any]) -> Any:
    return msgpack.unpackb(data, ext_hook=ext_hook, object_hook=_str_keys, raw=False,
                           strict_map_key=True, unicode_errors="surrogatepass", timestamp=2)


def _str_keys(value: dict[Any, Any]) -> dict[str, Any]:
    for key in value:
        if type(key) is not str:
            raise MessageError("dict keys must be str")
    return value


def _ext_needs_state(code: int, data: bytes) -> Any:
    raise _NeedsState


class _NeedsState(Exception):
    pass


def decode(data: bytes | bytearray | memoryview, nfds: int,
           make_handle: Callable[[str, int], Any]) -> Any:
    """Decodes one message whose frame carried ``nfds`` descriptors.

    ``make_handle(kind, index)`` builds the object for descriptor ``index``.
    Raises MessageError on any malformation, including a descriptor that is
    named twice or never.
    """
    try:
        if not nfds:
            try:  # most messages: no extension type, no state to keep
                return _unpack(data, _ext_needs_state)
            except _NeedsState:
                pass
        state = _Decoding(nfds, make_handle)
        value = state.unpack(data)
    except MessageError:
        raise
    except Exception as e:  # msgpack's errors, UnicodeDecodeError, unhashable keys...
        raise MessageError(f"malformed message: {type(e).__name__}: {e}"[:200]) from None
    if nfds and not all(state.used):
        raise MessageError("message carries descriptors it does not name")
    return value
