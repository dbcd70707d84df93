"""The message codec: a small structural format that never runs code.

Messages cross trust boundaries (a container's actor talks to a root daemon),
so decoding only ever builds None, bool, int, float, str, bytes, list, tuple
and dict (str keys), plus two kinds of handle that stand for file descriptors
carried beside the bytes with SCM_RIGHTS: ``Fd`` and actor addresses.

Layout: one tag byte per value, lengths and counts as little-endian u32.
A handle is its tag and the index of its descriptor in the SCM_RIGHTS array.
Every descriptor must be named exactly once, so none can be left unowned.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from ._errors import MessageError

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_FDS = 64
MAX_DEPTH = 64
MAX_INT_BYTES = 1024

_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")

T_NONE = 0x4E  # N
T_TRUE = 0x54  # T
T_FALSE = 0x46  # F
T_INT = 0x69  # i: int64
T_BIGINT = 0x49  # I: length-prefixed two's complement
T_FLOAT = 0x66  # f
T_STR = 0x73  # s
T_BYTES = 0x62  # b
T_LIST = 0x6C  # l
T_TUPLE = 0x74  # t
T_DICT = 0x64  # d
T_FD = 0x44  # D
T_ADDRESS = 0x41  # A

HANDLE_FD = "fd"
HANDLE_ADDRESS = "address"


_TAG_U32 = struct.Struct("<BI")
_TAG_I64 = struct.Struct("<Bq")
_TAG_F64 = struct.Struct("<Bd")
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


class _Encoding:
    __slots__ = ("classify", "handles", "out", "seen")

    def __init__(self, classify: Callable[[Any], str | None]) -> None:
        self.out = bytearray()
        self.handles: list[Any] = []
        self.seen: set[int] = set()
        self.classify = classify


def encode(msg: Any, classify: Callable[[Any], str | None]) -> tuple[bytes, list[Any]]:
    """Encodes ``msg`` and returns the bytes and the handles in wire order.

    ``classify(value)`` returns ``HANDLE_FD`` or ``HANDLE_ADDRESS`` for values
    that travel as descriptors, and None for anything else.
    """
    state = _Encoding(classify)
    _put(state, msg, 0)
    return bytes(state.out), state.handles


# Written for speed (every message goes through here): module-level
# functions on a slotted state rather than closures made at each call,
# branches by exact type in order of frequency, tags packed with lengths.

def _put(state: _Encoding, value: Any, depth: int) -> None:
    out = state.out
    t = type(value)
    if t is str:
        raw = value.encode("utf-8", "surrogatepass")
        out += _TAG_U32.pack(T_STR, len(raw))
        out += raw
    elif t is int:
        if _I64_MIN <= value <= _I64_MAX:
            out += _TAG_I64.pack(T_INT, value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(raw) > MAX_INT_BYTES:
                raise MessageError("integer too large to send")
            out += _TAG_U32.pack(T_BIGINT, len(raw))
            out += raw
    elif t is dict:
        _enter(state, value, depth)
        out += _TAG_U32.pack(T_DICT, len(value))
        for key, item in value.items():
            if type(key) is not str:
                raise MessageError(
                    f"dict keys must be str, not {type(key).__name__} ({key!r:.40})")
            raw = key.encode("utf-8", "surrogatepass")
            out += _U32.pack(len(raw))
            out += raw
            _put(state, item, depth + 1)
        state.seen.discard(id(value))
    elif value is None:
        out.append(T_NONE)
    elif t is bool:
        out.append(T_TRUE if value else T_FALSE)
    elif t is list or t is tuple:
        _enter(state, value, depth)
        out += _TAG_U32.pack(T_LIST if t is list else T_TUPLE, len(value))
        for item in value:
            _put(state, item, depth + 1)
        state.seen.discard(id(value))
    elif t is float:
        out += _TAG_F64.pack(T_FLOAT, value)
    elif t is bytes or t is bytearray or t is memoryview:
        raw = value if t is not memoryview else value.tobytes()
        out += _TAG_U32.pack(T_BYTES, len(raw))
        out += raw
    else:
        kind = state.classify(value)
        if kind is None:
            raise MessageError(
                f"cannot send a value of type {t.__name__}: messages carry "
                "None, bool, int, float, str, bytes, list, tuple, dict, Fd and addresses")
        if len(state.handles) >= MAX_FDS:
            raise MessageError(f"a message carries at most {MAX_FDS} descriptors")
        out += _TAG_U32.pack(T_FD if kind == HANDLE_FD else T_ADDRESS, len(state.handles))
        state.handles.append(value)
    if len(out) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message larger than {MAX_MESSAGE_BYTES} bytes")


def _enter(state: _Encoding, container: Any, depth: int) -> None:
    if container and depth >= MAX_DEPTH:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
    if id(container) in state.seen:
        raise MessageError("message contains a reference cycle")
    state.seen.add(id(container))


class _Decoding:
    __slots__ = ("buf", "end", "make_handle", "nfds", "pos", "used")

    def __init__(self, buf: bytes | bytearray, nfds: int,
                 make_handle: Callable[[str, int], Any]) -> None:
        self.buf = buf
        self.end = len(buf)
        self.pos = 0
        self.nfds = nfds
        self.used = [False] * nfds
        self.make_handle = make_handle


def decode(data: bytes | bytearray | memoryview, nfds: int,
           make_handle: Callable[[str, int], Any]) -> Any:
    """Decodes one message whose frame carried ``nfds`` descriptors.

    ``make_handle(kind, index)`` builds the object for descriptor ``index``.
    Raises MessageError on any malformation, including a descriptor that is
    named twice or never.
    """
    state = _Decoding(data if isinstance(data, (bytes, bytearray)) else bytes(data), nfds,
                      make_handle)
    value = _get(state, 0)
    if state.pos != state.end:
        raise MessageError("trailing bytes after message")
    if not all(state.used):
        raise MessageError("message carries descriptors it does not name")
    return value


def _u32(state: _Decoding) -> int:
    pos = state.pos
    if pos + 4 > state.end:
        raise MessageError("truncated message")
    state.pos = pos + 4
    return int(_U32.unpack_from(state.buf, pos)[0])


def _raw(state: _Decoding, n: int) -> bytes | bytearray:
    pos = state.pos
    if pos + n > state.end:
        raise MessageError("truncated message")
    state.pos = pos + n
    return state.buf[pos:pos + n]


def _text(state: _Decoding) -> str:
    raw = _raw(state, _u32(state))
    try:
        return str(raw, "utf-8", "surrogatepass")
    except UnicodeDecodeError as e:
        raise MessageError(f"invalid UTF-8 in message: {e.reason}") from None


def _get(state: _Decoding, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
    pos = state.pos
    if pos >= state.end:
        raise MessageError("truncated message")
    tag = state.buf[pos]
    state.pos = pos + 1
    if tag == T_STR:
        return _text(state)
    if tag in (T_INT, T_FLOAT):
        pos = state.pos
        if pos + 8 > state.end:
            raise MessageError("truncated message")
        state.pos = pos + 8
        return (_I64 if tag == T_INT else _F64).unpack_from(state.buf, pos)[0]
    if tag == T_DICT:
        n = _u32(state)
        if n > state.end - state.pos:  # every entry takes at least one byte
            raise MessageError("truncated message")
        result: dict[str, Any] = {}
        for _ in range(n):
            key = _text(state)
            if key in result:
                raise MessageError(f"duplicate dict key {key!r:.40}")
            result[key] = _get(state, depth + 1)
        return result
    if tag in (T_LIST, T_TUPLE):
        n = _u32(state)
        if n > state.end - state.pos:  # every item takes at least one byte
            raise MessageError("truncated message")
        items = [_get(state, depth + 1) for _ in range(n)]
        return items if tag == T_LIST else tuple(items)
    if tag == T_NONE:
        return None
    if tag == T_TRUE:
        return True
    if tag == T_FALSE:
        return False
    if tag == T_BYTES:
        return bytes(_raw(state, _u32(state)))
    if tag == T_BIGINT:
        n = _u32(state)
        if n > MAX_INT_BYTES:
            raise MessageError("integer too large")
        return int.from_bytes(_raw(state, n), "little", signed=True)
    if tag in (T_FD, T_ADDRESS):
        index = _u32(state)
        if index >= state.nfds or state.used[index]:
            raise MessageError("message names a descriptor it does not carry")
        state.used[index] = True
        return state.make_handle(HANDLE_FD if tag == T_FD else HANDLE_ADDRESS, index)
    raise MessageError(f"unknown type tag 0x{tag:02x}")
