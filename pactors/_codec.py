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


def encode(msg: Any, classify: Callable[[Any], str | None]) -> tuple[bytes, list[Any]]:
    """Encodes ``msg`` and returns the bytes and the handles in wire order.

    ``classify(value)`` returns ``HANDLE_FD`` or ``HANDLE_ADDRESS`` for values
    that travel as descriptors, and None for anything else.
    """
    out = bytearray()
    handles: list[Any] = []
    seen: set[int] = set()

    def put(value: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
        if value is None:
            out.append(T_NONE)
        elif value is True:
            out.append(T_TRUE)
        elif value is False:
            out.append(T_FALSE)
        elif type(value) is int:
            if -(1 << 63) <= value < (1 << 63):
                out.append(T_INT)
                out.extend(_I64.pack(value))
            else:
                raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
                if len(raw) > MAX_INT_BYTES:
                    raise MessageError("integer too large to send")
                out.append(T_BIGINT)
                out.extend(_U32.pack(len(raw)))
                out.extend(raw)
        elif type(value) is float:
            out.append(T_FLOAT)
            out.extend(_F64.pack(value))
        elif type(value) is str:
            raw = value.encode("utf-8", "surrogatepass")
            out.append(T_STR)
            out.extend(_U32.pack(len(raw)))
            out.extend(raw)
        elif type(value) in (bytes, bytearray, memoryview):
            raw = bytes(value)
            out.append(T_BYTES)
            out.extend(_U32.pack(len(raw)))
            out.extend(raw)
        elif type(value) in (list, tuple):
            if id(value) in seen:
                raise MessageError("message contains a reference cycle")
            seen.add(id(value))
            out.append(T_LIST if type(value) is list else T_TUPLE)
            out.extend(_U32.pack(len(value)))
            for item in value:
                put(item, depth + 1)
            seen.discard(id(value))
        elif type(value) is dict:
            if id(value) in seen:
                raise MessageError("message contains a reference cycle")
            seen.add(id(value))
            out.append(T_DICT)
            out.extend(_U32.pack(len(value)))
            for key, item in value.items():
                if type(key) is not str:
                    raise MessageError(
                        f"dict keys must be str, not {type(key).__name__} ({key!r:.40})")
                raw = key.encode("utf-8", "surrogatepass")
                out.extend(_U32.pack(len(raw)))
                out.extend(raw)
                put(item, depth + 1)
            seen.discard(id(value))
        else:
            kind = classify(value)
            if kind is None:
                raise MessageError(
                    f"cannot send a value of type {type(value).__name__}: messages carry "
                    "None, bool, int, float, str, bytes, list, tuple, dict, Fd and addresses")
            if len(handles) >= MAX_FDS:
                raise MessageError(f"a message carries at most {MAX_FDS} descriptors")
            out.append(T_FD if kind == HANDLE_FD else T_ADDRESS)
            out.extend(_U32.pack(len(handles)))
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
    view = memoryview(data)
    end = len(view)
    pos = 0
    used = [False] * nfds

    def need(n: int) -> None:
        if pos + n > end:
            raise MessageError("truncated message")

    def u32() -> int:
        nonlocal pos
        need(4)
        (value,) = _U32.unpack_from(view, pos)
        pos += 4
        return int(value)

    def raw(n: int) -> memoryview:
        nonlocal pos
        need(n)
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    def text(n: int) -> str:
        try:
            return str(raw(n), "utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise MessageError(f"invalid UTF-8 in message: {e.reason}") from None

    def get(depth: int) -> Any:
        nonlocal pos
        if depth > MAX_DEPTH:
            raise MessageError(f"message nests deeper than {MAX_DEPTH} levels")
        need(1)
        tag = view[pos]
        pos += 1
        if tag == T_NONE:
            return None
        if tag == T_TRUE:
            return True
        if tag == T_FALSE:
            return False
        if tag == T_INT:
            need(8)
            (value,) = _I64.unpack_from(view, pos)
            pos += 8
            return value
        if tag == T_BIGINT:
            n = u32()
            if n > MAX_INT_BYTES:
                raise MessageError("integer too large")
            return int.from_bytes(raw(n), "little", signed=True)
        if tag == T_FLOAT:
            need(8)
            (fvalue,) = _F64.unpack_from(view, pos)
            pos += 8
            return fvalue
        if tag == T_STR:
            return text(u32())
        if tag == T_BYTES:
            return bytes(raw(u32()))
        if tag in (T_LIST, T_TUPLE):
            count = u32()
            if count > end - pos:  # every item takes at least one byte
                raise MessageError("truncated message")
            items = [get(depth + 1) for _ in range(count)]
            return items if tag == T_LIST else tuple(items)
        if tag == T_DICT:
            count = u32()
            if count > end - pos:
                raise MessageError("truncated message")
            result: dict[str, Any] = {}
            for _ in range(count):
                key = text(u32())
                if key in result:
                    raise MessageError(f"duplicate dict key {key!r:.40}")
                result[key] = get(depth + 1)
            return result
        if tag in (T_FD, T_ADDRESS):
            index = u32()
            if index >= nfds or used[index]:
                raise MessageError("message names a descriptor it does not carry")
            used[index] = True
            return make_handle(HANDLE_FD if tag == T_FD else HANDLE_ADDRESS, index)
        raise MessageError(f"unknown type tag 0x{tag:02x}")

    value = get(0)
    if pos != end:
        raise MessageError("trailing bytes after message")
    if not all(used):
        raise MessageError("message carries descriptors it does not name")
    return value
