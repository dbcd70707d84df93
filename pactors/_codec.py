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


def encode(msg: Any, classify: Callable[[Any], str | None]) -> tuple[bytes, list[Any]]:
    """Encodes ``msg`` and returns the bytes and the handles in wire order.

    ``classify(value)`` returns ``HANDLE_FD`` or ``HANDLE_ADDRESS`` for values
    that travel as descriptors, and None for anything else.
    """
    # Written for speed (every message goes through here): one function,
    # branches by exact type in order of frequency, tag and length packed
    # together.
    out = bytearray()
    ext = out.extend
    tag_u32 = _TAG_U32.pack
    handles: list[Any] = []
    seen: set[int] = set()

    def put(value: Any, depth: int) -> None:
        t = type(value)
        if t is str:
            raw = value.encode("utf-8", "surrogatepass")
            ext(tag_u32(T_STR, len(raw)))
            ext(raw)
        elif t is int:
            if _I64_MIN <= value <= _I64_MAX:
                ext(_TAG_I64.pack(T_INT, value))
            else:
                raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                if len(raw) > MAX_INT_BYTES:
                    raise MessageError("integer too large to send")
                out.extend(_TAG_U32.pack(T_BIGINT, len(raw)))
                out.extend(raw)
        elif t is dict:
            if value and depth >= MAX_DEPTH:
                raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
            if id(value) in seen:
                raise MessageError("message contains a reference cycle")
            seen.add(id(value))
            ext(tag_u32(T_DICT, len(value)))
            for key, item in value.items():
                if type(key) is not str:
                    raise MessageError(
                        f"dict keys must be str, not {type(key).__name__} ({key!r:.40})")
                raw = key.encode("utf-8", "surrogatepass")
                ext(_U32.pack(len(raw)))
                ext(raw)
                put(item, depth + 1)
            seen.discard(id(value))
        elif value is None:
            out.append(T_NONE)
        elif t is bool:
            out.append(T_TRUE if value else T_FALSE)
        elif t is list or t is tuple:
            if value and depth >= MAX_DEPTH:
                raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
            if id(value) in seen:
                raise MessageError("message contains a reference cycle")
            seen.add(id(value))
            out.extend(_TAG_U32.pack(T_LIST if t is list else T_TUPLE, len(value)))
            for item in value:
                put(item, depth + 1)
            seen.discard(id(value))
        elif t is float:
            out.extend(_TAG_F64.pack(T_FLOAT, value))
        elif t is bytes or t is bytearray or t is memoryview:
            raw = value if t is not memoryview else value.tobytes()
            out.extend(_TAG_U32.pack(T_BYTES, len(raw)))
            out.extend(raw)
        else:
            kind = classify(value)
            if kind is None:
                raise MessageError(
                    f"cannot send a value of type {t.__name__}: messages carry "
                    "None, bool, int, float, str, bytes, list, tuple, dict, Fd and addresses")
            if len(handles) >= MAX_FDS:
                raise MessageError(f"a message carries at most {MAX_FDS} descriptors")
            out.extend(_TAG_U32.pack(T_FD if kind == HANDLE_FD else T_ADDRESS, len(handles)))
            handles.append(value)
        if len(out) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message larger than {MAX_MESSAGE_BYTES} bytes")

    put(msg, 0)
    return bytes(out), handles


def decode(data: bytes | bytearray | memoryview, nfds: int,
           make_handle: Callable[[str, int], Any]) -> Any:
    """Decodes one message whose frame carried ``nfds`` descriptors.

    ``make_handle(kind, index)`` builds the object for descriptor ``index``.
    Raises MessageError on any malformation, including a descriptor that is
    named twice or never.
    """
    buf = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    end = len(buf)
    pos = 0
    used = [False] * nfds
    u32 = _U32.unpack_from

    def text(n: int) -> str:
        nonlocal pos
        if pos + n > end:
            raise MessageError("truncated message")
        try:
            value = str(buf[pos:pos + n], "utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise MessageError(f"invalid UTF-8 in message: {e.reason}") from None
        pos += n
        return value

    def get(depth: int) -> Any:
        nonlocal pos
        if depth > MAX_DEPTH:
            raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
        if pos >= end:
            raise MessageError("truncated message")
        tag = buf[pos]
        pos += 1
        # Tags with a u32 first: strings, containers, handles.
        if tag in _U32_TAGS:
            if pos + 4 > end:
                raise MessageError("truncated message")
            (n,) = u32(buf, pos)
            pos += 4
            if tag == T_STR:
                return text(n)
            if tag == T_DICT:
                if n > end - pos:  # every entry takes at least one byte
                    raise MessageError("truncated message")
                result: dict[str, Any] = {}
                for _ in range(n):
                    if pos + 4 > end:
                        raise MessageError("truncated message")
                    (klen,) = u32(buf, pos)
                    pos += 4
                    key = text(klen)
                    if key in result:
                        raise MessageError(f"duplicate dict key {key!r:.40}")
                    result[key] = get(depth + 1)
                return result
            if tag in (T_LIST, T_TUPLE):
                if n > end - pos:  # every item takes at least one byte
                    raise MessageError("truncated message")
                items = [get(depth + 1) for _ in range(n)]
                return items if tag == T_LIST else tuple(items)
            if tag == T_BYTES:
                if pos + n > end:
                    raise MessageError("truncated message")
                pos += n
                return bytes(buf[pos - n:pos])
            if tag == T_BIGINT:
                if n > MAX_INT_BYTES:
                    raise MessageError("integer too large")
                if pos + n > end:
                    raise MessageError("truncated message")
                pos += n
                return int.from_bytes(buf[pos - n:pos], "little", signed=True)
            # T_FD, T_ADDRESS
            if n >= nfds or used[n]:
                raise MessageError("message names a descriptor it does not carry")
            used[n] = True
            return make_handle(HANDLE_FD if tag == T_FD else HANDLE_ADDRESS, n)
        if tag in (T_INT, T_FLOAT):
            if pos + 8 > end:
                raise MessageError("truncated message")
            (number,) = (_I64 if tag == T_INT else _F64).unpack_from(buf, pos)
            pos += 8
            return number
        if tag == T_NONE:
            return None
        if tag == T_TRUE:
            return True
        if tag == T_FALSE:
            return False
        raise MessageError(f"unknown type tag 0x{tag:02x}")

    value = get(0)
    if pos != end:
        raise MessageError("trailing bytes after message")
    if not all(used):
        raise MessageError("message carries descriptors it does not name")
    return value


_U32_TAGS = frozenset((T_STR, T_DICT, T_LIST, T_TUPLE, T_BYTES, T_BIGINT, T_FD, T_ADDRESS))
