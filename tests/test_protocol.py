"""packxd.protocol: request validation, replies, events and packet framing."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator

import pytest

from packxd import protocol
from packxd.protocol import ProtocolError, Request, parse_request

NAME_RULE = 'use 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit'


def req(name: str, arguments: object = None, **extra: object) -> bytes:
    obj: dict[str, object] = {"request": name, **extra}
    if arguments is not None:
        obj["arguments"] = arguments
    return json.dumps(obj).encode()


def spawn_args(**over: object) -> dict[str, object]:
    args: dict[str, object] = {
        "guest_name": "web", "app_name": "firefox", "profile": "work", "app_bin": "firefox",
    }
    args.update(over)
    return args


def error_of(data: bytes) -> str:
    with pytest.raises(ProtocolError) as e:
        parse_request(data)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# -- good requests ------------------------------------------------------------


def test_spawn_defaults_are_normalized() -> None:
    r = parse_request(req("spawn_linux_app", spawn_args()))
    assert r == Request("spawn_linux_app", {
        "guest_name": "web", "app_name": "firefox", "profile": "work",
        "app_bin": "firefox", "args": [], "display": None,
    })


def test_spawn_with_args_and_display() -> None:
    r = parse_request(req("spawn_linux_app", spawn_args(
        args=["--new-window", "ü", ""], display="none", app_name="a.b_c-9")))
    assert r.arguments["args"] == ["--new-window", "ü", ""]
    assert r.arguments["display"] == "none"
    assert r.arguments["app_name"] == "a.b_c-9"


@pytest.mark.parametrize("arguments", [None, {}])
def test_list_without_arguments(arguments: object) -> None:
    assert parse_request(req("list", arguments)) == Request("list", {})


def test_stop() -> None:
    r = parse_request(req("stop", {"app_name": "xterm", "profile": "p1"}))
    assert r == Request("stop", {"app_name": "xterm", "profile": "p1"})


def test_max_name_length_is_accepted() -> None:
    assert protocol.validate_name("profile", "a" * 64) == "a" * 64


# -- bad requests -------------------------------------------------------------


@pytest.mark.parametrize("data", [b"\xff\xfe garbage", b"{not json", b"", b"\x00" * 10])
def test_garbage(data: bytes) -> None:
    msg = error_of(data)
    assert "request" in msg


def test_too_large() -> None:
    data = req("list", {}) + b" " * protocol.MAX_REQUEST_BYTES
    assert "larger than 65536 bytes" in error_of(data)


def test_deep_nesting_does_not_crash() -> None:
    assert "nested too deeply" in error_of(b"[" * 30000 + b"]" * 30000)


@pytest.mark.parametrize("data", [b"[]", b'"spawn_linux_app"', b"42", b"null"])
def test_non_object_json(data: bytes) -> None:
    assert "must be a JSON object" in error_of(data)


def test_unknown_request() -> None:
    msg = error_of(req("format_disk", {}))
    assert msg == 'unknown request "format_disk"; use spawn_linux_app, list or stop'


def test_request_not_a_string() -> None:
    assert error_of(json.dumps({"request": 1}).encode()) == "request must be a string, not a number"


def test_missing_request_key() -> None:
    assert 'no "request" key' in error_of(b'{"arguments": {}}')


def test_unknown_top_level_key() -> None:
    assert 'unknown key "extra"' in error_of(req("list", {}, extra=1))


def test_duplicate_key() -> None:
    msg = error_of(b'{"request": "list", "request": "stop"}')
    assert '"request" appears twice' in msg


def test_unknown_argument() -> None:
    msg = error_of(req("spawn_linux_app", spawn_args(uid=0)))
    assert msg == 'spawn_linux_app does not take an argument "uid"'
    assert "list does not take" in error_of(req("list", {"x": 1}))


@pytest.mark.parametrize("key", ["guest_name", "app_name", "profile", "app_bin"])
def test_missing_argument(key: str) -> None:
    args = spawn_args()
    del args[key]
    assert error_of(req("spawn_linux_app", args)) == f'spawn_linux_app needs the argument "{key}"'


def test_arguments_not_an_object() -> None:
    assert "arguments must be a JSON object, not an array" in error_of(req("list", []))


@pytest.mark.parametrize(
    ("value", "shown"),
    [("../x", '"../x"'), ("", '""'), ("..", '".."'), (".", '"."'), (".hidden", '".hidden"'),
     ("a/b", '"a/b"'), ("a b", '"a b"'), ("-x", '"-x"'), ("x\n", '"x\\n"'), ("é", '"\\u00e9"')],
)
def test_bad_app_name(value: str, shown: str) -> None:
    msg = error_of(req("spawn_linux_app", spawn_args(app_name=value)))
    assert msg == f"app_name {shown} is invalid: {NAME_RULE}"


def test_app_name_65_chars() -> None:
    msg = error_of(req("spawn_linux_app", spawn_args(app_name="a" * 65)))
    assert msg.startswith('app_name "aaaa') and msg.endswith(f"is invalid: {NAME_RULE}")


@pytest.mark.parametrize("key", ["guest_name", "profile"])
def test_bad_guest_and_profile(key: str) -> None:
    msg = error_of(req("spawn_linux_app", spawn_args(**{key: "../etc"})))
    assert msg == f'{key} "../etc" is invalid: {NAME_RULE}'


def test_name_not_a_string() -> None:
    assert error_of(req("stop", {"app_name": ["a"], "profile": "p"})) == (
        "app_name must be a string, not an array"
    )


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ("ls -l", "args must be an array of strings, not a string"),
        ({"a": 1}, "args must be an array of strings, not an object"),
        ([1], "args[0] must be a string, not a number"),
        (["ok", None], "args[1] must be a string, not null"),
        (["a\0b"], "args[0] must not contain a NUL character"),
        (["x" * 4097], "args[0] is longer than 4096 characters"),
        (["x"] * 257, "args has 257 items; at most 256 are allowed"),
        (["\ud800"], "args[0] is not valid UTF-8"),
    ],
)
def test_bad_args(args: object, reason: str) -> None:
    assert error_of(req("spawn_linux_app", spawn_args(args=args))) == reason


@pytest.mark.parametrize(
    ("app_bin", "reason"),
    [
        ("", "app_bin must not be empty"),
        (7, "app_bin must be a string, not a number"),
        ("/bin/x\0", "app_bin must not contain a NUL character"),
        ("/" + "b" * 4096, "app_bin is longer than 4096 characters"),
    ],
)
def test_bad_app_bin(app_bin: object, reason: str) -> None:
    assert error_of(req("spawn_linux_app", spawn_args(app_bin=app_bin))) == reason


@pytest.mark.parametrize("display", ["x11", "", 1, True])
def test_bad_display(display: object) -> None:
    msg = error_of(req("spawn_linux_app", spawn_args(display=display)))
    assert msg.startswith("display ") and msg.endswith('is invalid: use "xpra" or "none"')


def test_nan_is_rejected() -> None:
    assert "NaN is not a JSON value" in error_of(b'{"request": "list", "arguments": {"x": NaN}}')


# -- fds ----------------------------------------------------------------------


def test_check_request_fds() -> None:
    none = parse_request(req("spawn_linux_app", spawn_args(display="none")))
    xpra = parse_request(req("spawn_linux_app", spawn_args(display="xpra")))
    default = parse_request(req("spawn_linux_app", spawn_args()))
    listing = parse_request(req("list"))
    protocol.check_request_fds(none, 3, "none")
    protocol.check_request_fds(xpra, 0, "xpra")
    protocol.check_request_fds(default, 0, "xpra")
    protocol.check_request_fds(default, 3, "xpra")  # client could not know; daemon closes them
    protocol.check_request_fds(default, 3, "none")
    protocol.check_request_fds(listing, 0, "xpra")
    for r, n, d, text in [
        (none, 0, "none", 'display "none" needs the client\'s stdin, stdout and stderr'),
        (none, 2, "none", "but 2 were attached"),
        (default, 0, "none", 'display "none" needs'),
        (xpra, 3, "xpra", 'display "xpra" takes no file descriptors, but 3 were attached'),
        (default, 1, "xpra", "expected 0 or 3 file descriptors, but 1 were attached"),
        (listing, 1, "xpra", "list takes no file descriptors"),
    ]:
        with pytest.raises(ProtocolError, match=text.replace('"', '.').replace("(", ".")):
            protocol.check_request_fds(r, n, d)


# -- replies and events -------------------------------------------------------


def test_replies_round_trip() -> None:
    ok = protocol.ok_reply({"display": "xpra", "runtime_dir": "/run/user/1000/packxd/a/p"})
    assert protocol.parse_reply(ok) == {
        "result": "ok", "display": "xpra", "runtime_dir": "/run/user/1000/packxd/a/p"}
    err = protocol.error_reply('guest "web" is not in /etc/packxd.json')
    assert protocol.parse_reply(err)["error"] == 'guest "web" is not in /etc/packxd.json'
    # Odd strings (lone surrogates from file names) still encode.
    assert protocol.parse_reply(protocol.error_reply("bad \udcff name"))["result"] == "error"


@pytest.mark.parametrize(
    "data",
    [b"", b"nope", b"[]", b'{"result": "maybe"}', b'{"result": "error"}',
     b'{"result": "ok"' + b" " * protocol.MAX_REPLY_BYTES + b"}"],
)
def test_bad_replies(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_reply(data)


def test_encode_reply_is_bounded() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        protocol.encode_reply({"result": "ok", "x": "y" * protocol.MAX_REPLY_BYTES})


def test_events() -> None:
    assert protocol.parse_event(protocol.display_ready_event()) == {"event": "display_ready"}
    assert protocol.parse_event(protocol.exit_event(130)) == {"event": "exit", "status": 130}
    assert protocol.parse_event(b'{"event": "future"}') == {"event": "future"}
    for bad in [b'{"event": "exit"}', b'{"event": "exit", "status": 256}',
                b'{"event": "exit", "status": true}', b'{"status": 1}', b"x"]:
        with pytest.raises(ProtocolError):
            protocol.parse_event(bad)


def test_signal_messages() -> None:
    assert protocol.parse_signal_message(protocol.signal_message(2)) == 2
    assert protocol.parse_signal_message(protocol.signal_message(15)) == 15
    for bad in [b'{"signal": 9}', b'{"signal": 19}', b'{"signal": true}', b'{"signal": [2]}',
                b'{"signal": 2, "x": 1}', b"{}", b"junk"]:
        with pytest.raises(ProtocolError):
            protocol.parse_signal_message(bad)


def test_encode_request_validates() -> None:
    data = protocol.encode_request("stop", {"app_name": "a", "profile": "p"})
    assert parse_request(data) == Request("stop", {"app_name": "a", "profile": "p"})
    with pytest.raises(ProtocolError, match="app_name"):
        protocol.encode_request("stop", {"app_name": "../a", "profile": "p"})


# -- packets over a real socketpair -------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def pipes(n: int) -> list[int]:
    fds: list[int] = []
    for _ in range(n):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


def test_round_trip_with_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    mine = pipes(3)
    protocol.send_packet(a, b"hello", mine)
    data, fds = protocol.recv_packet(b, 3)
    try:
        assert data == b"hello"
        assert len(fds) == 3
        for fd in fds:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.fstat(fd).st_ino in {os.fstat(m).st_ino for m in mine}
    finally:
        for fd in fds + mine:
            os.close(fd)


def test_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert protocol.recv_packet(b, 3) == (b"", [])


def test_truncated_packet_is_an_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    mine = pipes(2)
    protocol.send_packet(a, b"x" * (protocol.MAX_REQUEST_BYTES + 1), mine)
    before = open_fds()
    with pytest.raises(ProtocolError, match="larger than 65536 bytes"):
        protocol.recv_packet(b, 3)
    assert open_fds() == before  # the two fds that arrived were closed
    # The socket is still usable for the next packet.
    protocol.send_packet(a, b"next")
    assert protocol.recv_packet(b, 3) == (b"next", [])
    for fd in mine:
        os.close(fd)


@pytest.mark.parametrize(("sent", "maxfds"), [(4, 3), (5, 3), (8, 3), (1, 0), (2, 1)])
def test_too_many_fds_is_an_error(
    pair: tuple[socket.socket, socket.socket], sent: int, maxfds: int
) -> None:
    # 4 fds still fit in CMSG_SPACE(3 fds) (it rounds up), so this checks the
    # explicit count as well as MSG_CTRUNC.
    a, b = pair
    mine = pipes(sent)
    protocol.send_packet(a, b"req", mine)
    before = open_fds()
    with pytest.raises(ProtocolError, match="file descriptors"):
        protocol.recv_packet(b, maxfds)
    assert open_fds() == before
    for fd in mine:
        os.close(fd)


def test_requests_are_written_as_json_dumps_writes_them() -> None:
    """The client writes requests without the json module (it sends before
    importing it); the bytes must be json.dumps's, for every string."""
    import random

    rng = random.Random(7)
    alphabet = [chr(c) for c in range(0x80)] + ["\u00e9", "\u2028", "\U0001f600", "\ufeff"]
    for _ in range(2000):
        args = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
                for _ in range(rng.randrange(4))]
        args = [a.replace("\0", "") for a in args]
        arguments = {"guest_name": "g", "app_name": "a.b", "profile": "p-1", "app_bin": "/x",
                     "args": args, "display": rng.choice(["xpra", "none"])}
        data = protocol.encode_request("spawn_linux_app", arguments)
        assert data == json.dumps({"request": "spawn_linux_app", "arguments": arguments},
                                  ensure_ascii=True, separators=(",", ":")).encode()
        assert parse_request(data).arguments["args"] == args
    for name, arguments in (("list", {}), ("stop", {"app_name": "a", "profile": "p"})):
        assert protocol.encode_request(name, arguments) == json.dumps(
            {"request": name, "arguments": arguments}, separators=(",", ":")).encode()
