"""The wire protocol between the packxd client and daemon.

The daemon listens on a UNIX SOCK_SEQPACKET socket. Each request is one packet:
a UTF-8 JSON object ``{"request": NAME, "arguments": {...}}`` with fds attached
by SCM_RIGHTS. Each reply is ``{"result": "ok", ...}`` or
``{"result": "error", "error": SENTENCE}``. The ok reply to ``spawn_linux_app``
carries one fd, the control socket, on which the daemon sends events
(``{"event": "display_ready"}``, ``{"event": "exit", "status": N}``) and the
client may send ``{"signal": N}`` for the daemon to forward to the app.

The client imports this module on every launch, so it uses only cheap
standard-library modules: no ``typing`` or ``dataclasses`` at run time, and
``json`` (3 ms with ``re``) only once a request is on its way: requests are
validated and written without it (see ``encode_request``).
"""

from __future__ import annotations

import array
import socket

from ._text import kind as _kind
from ._text import show

# Not typing.TYPE_CHECKING: importing typing costs the client milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any, NoReturn

__all__ = [
    "DEFAULT_SOCKET",
    "DISPLAYS",
    "MAX_EVENT_BYTES",
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_FDS",
    "REQUESTS",
    "ProtocolError",
    "Request",
    "check_request_fds",
    "display_ready_event",
    "encode_reply",
    "encode_request",
    "error_reply",
    "exit_event",
    "ok_reply",
    "parse_event",
    "parse_reply",
    "parse_request",
    "parse_signal_message",
    "recv_packet",
    "send_packet",
    "signal_message",
    "validate_name",
]

DEFAULT_SOCKET = "/run/packxd.socket"
MAX_REQUEST_BYTES = 65536
MAX_REQUEST_FDS = 3
# A list reply grows with the caller's apps; still far below the AF_UNIX
# datagram limit (the default socket send buffer, about 208 KiB).
MAX_REPLY_BYTES = 131072
MAX_EVENT_BYTES = 4096
MAX_APP_BIN_CHARS = 4096
MAX_ARGS = 256
MAX_ARG_CHARS = 4096
STDIO_FDS = 3

DISPLAYS = ("xpra", "none")
REQUESTS = ("spawn_linux_app", "list", "stop")
# What a client may ask the daemon to deliver to its app: SIGHUP, SIGINT,
# SIGQUIT, SIGTERM. Nothing that could stop or confuse the container's init.
FORWARDABLE_SIGNALS = frozenset({1, 2, 3, 15})

_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_CHARS = _ALNUM | frozenset("._-")
NAME_RULE = 'use 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit'

# request name -> (required arguments, optional arguments)
_SCHEMA: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "spawn_linux_app": (("guest_name", "app_name", "profile", "app_bin"), ("args", "display")),
    "list": ((), ()),
    "stop": (("app_name", "profile"), ()),
}


class ProtocolError(ValueError):
    """A malformed packet; ``str()`` is a sentence fit for the user."""


class Request:
    """A validated request. (A plain class: ``dataclasses`` imports ``inspect``,
    which costs the client about 5 ms per launch.)"""

    __slots__ = ("arguments", "name")

    def __init__(self, name: str, arguments: dict[str, Any]) -> None:
        self.name = name
        self.arguments = arguments

    def __repr__(self) -> str:
        return f"Request(name={self.name!r}, arguments={self.arguments!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (self.name, self.arguments) == (other.name, other.arguments)


# -- helpers ------------------------------------------------------------------


def _show(value: object, limit: int = 60) -> str:
    return show(value, limit)


def _fail(message: str) -> NoReturn:
    raise ProtocolError(message)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            _fail(f"the key {_show(k)} appears twice")
        out[k] = v
    return out


def _reject_constant(name: str) -> NoReturn:
    _fail(f"{name} is not a JSON value")


def _load_object(data: bytes, limit: int, what: str) -> dict[str, Any]:
    """Decode one bounded JSON object packet."""
    if len(data) > limit:
        _fail(f"the {what} is larger than {limit} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _fail(f"the {what} is not valid UTF-8")
    import json

    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except ProtocolError as e:
        _fail(f"the {what} is not valid: {e}")
    except RecursionError:
        _fail(f"the {what} is nested too deeply")
    except ValueError:
        _fail(f"the {what} is not valid JSON")
    if not isinstance(obj, dict):
        _fail(f"the {what} must be a JSON object, not {_kind(obj)}")
    return obj


def _text(kind: str, value: object, limit: int) -> str:
    """A string the daemon can hand to the OS: bounded, no NUL, valid UTF-8."""
    if not isinstance(value, str):
        _fail(f"{kind} must be a string, not {_kind(value)}")
    if len(value) > limit:
        _fail(f"{kind} is longer than {limit} characters")
    if "\0" in value:
        _fail(f"{kind} must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"{kind} is not valid UTF-8")
    return value


def validate_name(kind: str, value: object) -> str:
    """Check a guest, app or profile name; these become path components."""
    if not isinstance(value, str):
        _fail(f"{kind} must be a string, not {_kind(value)}")
    if (not 1 <= len(value) <= 64 or value[0] not in _ALNUM
            or not _NAME_CHARS.issuperset(value)):
        _fail(f"{kind} {_show(value)} is invalid: {NAME_RULE}")
    return value


# -- requests -----------------------------------------------------------------


def parse_request(data: bytes) -> Request:
    """Validate one request packet; raise :class:`ProtocolError` if it is bad."""
    if not data:
        _fail("the request is empty")
    return _check_request(_load_object(data, MAX_REQUEST_BYTES, "request"))


def _check_request(obj: dict[str, Any]) -> Request:
    for k in obj:
        if k not in ("request", "arguments"):
            _fail(f'the request has an unknown key {_show(k)}; use "request" and "arguments"')
    if "request" not in obj:
        _fail('the request has no "request" key')
    name = obj["request"]
    if not isinstance(name, str):
        _fail(f"request must be a string, not {_kind(name)}")
    if name not in _SCHEMA:
        _fail(f"unknown request {_show(name)}; use {', '.join(REQUESTS[:-1])} or {REQUESTS[-1]}")
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        _fail(f"arguments must be a JSON object, not {_kind(args)}")
    required, optional = _SCHEMA[name]
    for k in args:
        if k not in required and k not in optional:
            _fail(f"{name} does not take an argument {_show(k)}")
    for k in required:
        if k not in args:
            _fail(f'{name} needs the argument "{k}"')

    out: dict[str, Any] = {}
    for k in ("guest_name", "app_name", "profile"):
        if k in args:
            out[k] = validate_name(k, args[k])
    if name == "spawn_linux_app":
        app_bin = _text("app_bin", args["app_bin"], MAX_APP_BIN_CHARS)
        if not app_bin:
            _fail("app_bin must not be empty")
        out["app_bin"] = app_bin
        argv = args.get("args", [])
        if not isinstance(argv, list):
            _fail(f"args must be an array of strings, not {_kind(argv)}")
        if len(argv) > MAX_ARGS:
            _fail(f"args has {len(argv)} items; at most {MAX_ARGS} are allowed")
        out["args"] = [_text(f"args[{i}]", a, MAX_ARG_CHARS) for i, a in enumerate(argv)]
        display = args.get("display")
        if display is not None and display not in DISPLAYS:
            _fail(f'display {_show(display)} is invalid: use "xpra" or "none"')
        out["display"] = display
    return Request(name, out)


def encode_request(name: str, arguments: Mapping[str, Any]) -> bytes:
    """Encode a request, validating it exactly as the daemon will."""
    obj = {"request": name, "arguments": dict(arguments)}
    _check_request(obj)
    data = _dumps(obj).encode("ascii")
    if len(data) > MAX_REQUEST_BYTES:
        _fail(f"the request is larger than {MAX_REQUEST_BYTES} bytes")
    return data


def _dumps(value: object) -> str:
    """JSON text for what a checked request holds, exactly as
    ``json.dumps(value, ensure_ascii=True, separators=(",", ":"))`` writes it,
    with the standard library's own string escaper."""
    if isinstance(value, str):
        return _escape(value)
    if value is None:  # "display": None
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_dumps(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(_escape(k) + ":" + _dumps(v) for k, v in value.items()) + "}"
    raise TypeError(f"a request holds no {type(value).__name__}")


try:  # json.encoder's C escaper, without importing json
    from _json import encode_basestring_ascii as _escape
except ImportError:  # not CPython
    from json.encoder import py_encode_basestring_ascii as _escape


def prepare_replies() -> None:
    """Imports what reading replies takes: for the client to call once its
    request is sent, while the daemon works."""
    import json  # noqa: F401


def check_request_fds(request: Request, nfds: int, display: str) -> None:
    """Check the fds attached to *request*, given the effective *display*
    (the request's, or the guest's default when the request has none).

    Terminal mode needs exactly the client's stdin, stdout and stderr. A client
    that leaves ``display`` to the guest's default cannot know which it gets,
    so it sends its stdio and the daemon closes them under xpra.
    """
    if request.name != "spawn_linux_app":
        if nfds:
            _fail(f"{request.name} takes no file descriptors, but {nfds} were attached")
        return
    requested = request.arguments.get("display")
    if display == "none":
        if nfds != STDIO_FDS:
            _fail(
                'display "none" needs the client\'s stdin, stdout and stderr attached '
                f"(3 file descriptors), but {nfds} were attached"
            )
    elif requested is not None and nfds:
        _fail(f"display {_show(display)} takes no file descriptors, but {nfds} were attached")
    elif nfds not in (0, STDIO_FDS):
        _fail(f"expected 0 or 3 file descriptors, but {nfds} were attached")


# -- replies ------------------------------------------------------------------


def encode_reply(obj: Mapping[str, Any]) -> bytes:
    """Encode a reply; ASCII-only so odd strings (say, file names) cannot fail."""
    import json

    data = json.dumps(dict(obj), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    out = data.encode()
    if len(out) > MAX_REPLY_BYTES:
        raise ValueError(f"reply of {len(out)} bytes exceeds {MAX_REPLY_BYTES}")
    return out


def ok_reply(fields: Mapping[str, Any] | None = None) -> bytes:
    return encode_reply({"result": "ok", **(fields or {})})


def error_reply(message: str) -> bytes:
    return encode_reply({"result": "error", "error": message})


def parse_reply(data: bytes) -> dict[str, Any]:
    """Validate a reply from the daemon: an ok reply, or an error with a message."""
    obj = _load_object(data, MAX_REPLY_BYTES, "reply")
    result = obj.get("result")
    if result == "error":
        if not isinstance(obj.get("error"), str):
            _fail("the error reply has no message")
    elif result != "ok":
        _fail(f"the reply has an invalid result {_show(result)}")
    return obj


# -- control socket -----------------------------------------------------------


def display_ready_event() -> bytes:
    return b'{"event":"display_ready"}'


def exit_event(status: int) -> bytes:
    import json

    return json.dumps({"event": "exit", "status": status}, separators=(",", ":")).encode()


def parse_event(data: bytes) -> dict[str, Any]:
    """Validate an event from the daemon. Unknown events pass through so an
    older client can ignore newer ones."""
    obj = _load_object(data, MAX_EVENT_BYTES, "event")
    event = obj.get("event")
    if not isinstance(event, str):
        _fail('the event has no "event" name')
    if event == "exit":
        status = obj.get("status")
        if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 255:
            _fail(f"the exit event has an invalid status {_show(status)}")
    return obj


def signal_message(signum: int) -> bytes:
    import json

    return json.dumps({"signal": signum}, separators=(",", ":")).encode()


def parse_signal_message(data: bytes) -> int:
    """For the daemon: the signal a client asks to deliver to its app."""
    obj = _load_object(data, MAX_EVENT_BYTES, "control message")
    if set(obj) != {"signal"}:
        _fail('the control message must be {"signal": N}')
    signum = obj["signal"]
    if type(signum) is not int or signum not in FORWARDABLE_SIGNALS:
        _fail(f"signal {_show(signum)} cannot be forwarded; use 1, 2, 3 or 15")
    return signum


# -- packets ------------------------------------------------------------------


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        socket.close(fd)


def recv_packet(
    sock: socket.socket, maxfds: int, maxbytes: int = MAX_REQUEST_BYTES,
    discard: Callable[[list[int]], None] | None = None,
) -> tuple[bytes, list[int]]:
    """Receive one packet and its SCM_RIGHTS fds (close-on-exec).

    The socket must not have SO_PASSCRED set: its credentials message would
    not fit and the packet would be refused. Returns ``(b"", [])`` at end of
    stream. A packet longer than *maxbytes* or
    with more than *maxfds* fds raises :class:`ProtocolError`, after closing
    every fd that did arrive so a hostile peer cannot make us leak them; with
    *discard*, they are handed to it instead (closing a peer's fd can block).
    """
    fd_size = array.array("i").itemsize
    # No room at all makes the kernel discard any fds and flag MSG_CTRUNC.
    ancsize = socket.CMSG_SPACE(maxfds * fd_size) if maxfds else 0
    data, ancdata, flags, _addr = sock.recvmsg(maxbytes, ancsize, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % fd_size])
            fds.extend(a)
    if flags & socket.MSG_TRUNC:
        (discard or _close_fds)(fds)
        _fail(f"the packet is larger than {maxbytes} bytes")
    # CMSG_SPACE rounds up, so a few fds more than asked for can still fit:
    # count them rather than rely on MSG_CTRUNC alone.
    if flags & socket.MSG_CTRUNC or len(fds) > maxfds:
        (discard or _close_fds)(fds)
        _fail(
            f"too many file descriptors were attached (at most {maxfds})"
            if maxfds else "file descriptors were attached where none are expected"
        )
    if not data:
        # SEQPACKET end of stream (an empty packet is treated the same).
        (discard or _close_fds)(fds)
        return b"", []
    return data, fds


def send_packet(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """Send one packet, with *fds* attached by SCM_RIGHTS."""
    fdlist = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fdlist))] if fdlist else []
    sent = sock.sendmsg([data], anc)
    if sent != len(data):
        # Cannot happen on SOCK_SEQPACKET (packets are atomic); never ignore it.
        raise OSError(f"short send: {sent} of {len(data)} bytes")
