"""The vocabulary of an init script: the ``C`` namespace and the global helpers.

Port of Emilua's ``init_hookstate`` (emilua ``src/linux/ipc_actor/sys_bindings.cpp``).
Everything is imported here, at module import time: the script may pivot into
an empty root or drop privileges before its next call, after which importing
fails.
"""

from __future__ import annotations

import array
import builtins
import errno as _errno
import os
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

from pactors import _linux

SCRIPT_FILENAME = "<init script>"

_ARG_REPR_MAX = 60
_ARGS_REPR_MAX = 300


class CallFailed(BaseException):
    """A ``C`` call failed while ``errexit`` was set; unwinds the script.

    A BaseException so that ``except Exception`` in the script does not stop it;
    the failure is recorded in ``ScriptState`` before this is raised anyway.
    """


class ScriptState:
    """Per-run state shared by the wrappers: the script's globals and the first failure."""

    def __init__(self) -> None:
        self.globals: dict[str, Any] = {}
        self.failure: dict[str, object] | None = None

    def errexit(self) -> bool:
        # Read at call time: the script toggles it with ``errexit = False``.
        return bool(self.globals.get("errexit", True))


def script_line(frame: FrameType | None) -> int | None:
    """Line of the innermost script frame at or above ``frame``."""
    while frame is not None:
        if frame.f_code.co_filename == SCRIPT_FILENAME:
            return frame.f_lineno
        frame = frame.f_back
    return None


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, f"E{err}")


def _short(value: object, limit: int) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_args(args: tuple[object, ...]) -> str:
    return _short_join(_short(a, _ARG_REPR_MAX) for a in args)


def _short_join(parts: Iterator[str]) -> str:
    text = ", ".join(parts)
    return text if len(text) <= _ARGS_REPR_MAX else text[: _ARGS_REPR_MAX - 3] + "..."


def empty_failure() -> dict[str, object]:
    return {"kind": "exception", "message": "", "function": None, "arguments": None,
            "errno": None, "errno_name": None, "strerror": None, "line": None}


def _wrap(state: ScriptState, name: str, fn: Callable[..., object]) -> Callable[..., object]:
    """Apply the errexit rules to ``fn``: raise on failure, or return ``(result, errno)``."""

    def call(*args: object) -> object:
        if state.failure is not None:
            # The script swallowed an errexit failure with a bare except; stop again.
            raise CallFailed(state.failure["function"])
        errexit = state.errexit()
        try:
            result = fn(*args)
        except OSError as exc:
            if exc.errno is None:
                raise
            if not errexit:
                return (None, exc.errno)
            failure = empty_failure()
            failure.update(kind="call", function=name, arguments=short_args(args),
                           errno=exc.errno, errno_name=errno_name(exc.errno),
                           strerror=os.strerror(exc.errno),
                           line=script_line(sys._getframe(1)))
            failure["message"] = (f"C.{name}({failure['arguments']}) failed: "
                                  f"{failure['errno_name']} ({failure['strerror']})")
            state.failure = failure
            raise CallFailed(name) from None
        return result if errexit else (result, 0)

    call.__name__ = call.__qualname__ = name
    return call


class CNamespace:
    """The script's ``C``: attributes only, unknown names raise AttributeError."""

    __slots__ = ("_items",)
    _items: dict[str, object]

    def __init__(self, items: Mapping[str, object]) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getattr__(self, name: str) -> object:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(f"C has no attribute {name!r}", name=name, obj=self) from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"C is read-only (assigning {name!r})")

    def __dir__(self) -> list[str]:
        return sorted(self._items)

    def __repr__(self) -> str:
        return "<init script C namespace>"


def _data(data: str | bytes) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"expected str or bytes, got {type(data).__name__}")


# --- C functions -------------------------------------------------------------

def _read(fd: int, n: int) -> bytes:
    return os.read(fd, n)


def _write(fd: int, data: str | bytes) -> int:
    return os.write(fd, _data(data))


def _open(path: str, flags: int, mode: int = 0) -> int:
    fd = os.open(path, flags, mode)
    # Python adds O_CLOEXEC to every open; the script asks for it explicitly
    # when it wants it (fds may be meant for execve).
    if not flags & os.O_CLOEXEC:
        os.set_inheritable(fd, True)
    return fd


def _mknod(path: str, mode: int, dev: int = 0) -> None:
    os.mknod(path, mode, dev)


def _umask(mask: int) -> int:
    return os.umask(mask)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _linux.mount(source, target, fstype, flags, data)


def _setsid() -> int:
    os.setsid()
    return os.getsid(0)


def _setgroups(groups: list[int]) -> None:
    os.setgroups(list(groups))


def _setns(fd: int, nstype: int = 0) -> None:
    _linux.setns(fd, nstype)


def _execve(path: str, argv: list[str], envp: dict[str, str]) -> None:
    # Output the script printed would otherwise die with the old image.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os.execve(path, list(argv), dict(envp))


def _set_dumpable(flag: bool | int) -> None:
    _linux.set_dumpable(flag)


_C_FUNCTIONS: dict[str, Callable[..., object]] = {
    "read": _read,
    "write": _write,
    "open": _open,
    "close": os.close,
    "mkdir": os.mkdir,
    "mknod": _mknod,
    "symlink": os.symlink,
    "link": os.link,
    "chown": os.chown,
    "chmod": os.chmod,
    "chdir": os.chdir,
    "chroot": os.chroot,
    "mount": _mount,
    "umount": _linux.umount,
    "umount2": _linux.umount2,
    "pivot_root": _linux.pivot_root,
    "move_mount": _linux.move_mount,
    "mount_setattr": _linux.mount_setattr,
    "sethostname": _linux.sethostname,
    "setdomainname": _linux.setdomainname,
    "setsid": _setsid,
    "setpgid": os.setpgid,
    "setresuid": os.setresuid,
    "setresgid": os.setresgid,
    "setgroups": _setgroups,
    "unshare": _linux.unshare,
    "setns": _setns,
    "execve": _execve,
    "set_dumpable": _set_dumpable,
    "set_pdeathsig": _linux.set_pdeathsig,
    "cap_drop_bound": _linux.cap_drop_bound,
    "cap_set_ambient": _linux.cap_set_ambient,
    "cap_reset_ambient": _linux.cap_reset_ambient,
    "cap_set_secbits": _linux.set_securebits,
    "cap_set_proc": _linux.cap_set_proc,
}

_O_NAMES = ("CLOEXEC", "CREAT", "RDONLY", "WRONLY", "RDWR", "DIRECTORY", "EXCL", "NOCTTY",
            "NOFOLLOW", "TMPFILE", "TRUNC", "APPEND", "NONBLOCK", "PATH", "SYNC", "DSYNC",
            "NOATIME", "DIRECT", "LARGEFILE", "ASYNC")


def _constants() -> dict[str, int]:
    consts: dict[str, int] = {}
    for name in _O_NAMES:
        value = getattr(os, "O_" + name, None)
        if isinstance(value, int):
            consts["O_" + name] = value
    for name in dir(stat):
        value = getattr(stat, name)
        # stat also has S_IS*() and S_IMODE()/S_IFMT() functions; keep the ints.
        if name.startswith("S_I") and isinstance(value, int):
            consts[name] = value
    consts["S_IFMT"] = 0o170000
    for name in _linux.__all__:
        if name.startswith(("MS_", "MNT_", "UMOUNT_", "CLONE_NEW", "SECBIT_", "AT_",
                            "MOVE_MOUNT_", "MOUNT_ATTR_")):
            consts[name] = getattr(_linux, name)
    for name in dir(_errno):
        value = getattr(_errno, name)
        if name.startswith("E") and isinstance(value, int):
            consts[name] = value
    return consts


_C_CONSTANTS = _constants()


# --- global helpers ----------------------------------------------------------

def _borrow_socket(fd: int) -> socket.socket:
    # Raises ENOTSOCK for a non-socket, which is the failure we want reported.
    return socket.socket(fileno=fd)


def _send_with_fd(fd: int, data: str | bytes, fd_to_send: int | None) -> int:
    sock = _borrow_socket(fd)
    try:
        ancillary = []
        if fd_to_send is not None:
            ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [fd_to_send])))
        return sock.sendmsg([_data(data)], ancillary)
    finally:
        sock.detach()


_FD_SIZE = array.array("i").itemsize


def _receive_with_fd(fd: int, bufsize: int) -> tuple[bytes, int | None]:
    sock = _borrow_socket(fd)
    try:
        data, ancdata, flags, _addr = sock.recvmsg(
            bufsize, socket.CMSG_SPACE(_FD_SIZE), socket.MSG_CMSG_CLOEXEC)
    finally:
        sock.detach()
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for received in fds:
            os.close(received)
        raise OSError(_errno.EMSGSIZE, os.strerror(_errno.EMSGSIZE))
    return data, (fds[0] if fds else None)


def _write_all(fd: int, data: str | bytes) -> int:
    view = memoryview(_data(data))
    total = len(view)
    while view:
        view = view[os.write(fd, view):]
    return total


def _mode(u: int, g: int, o: int) -> int:
    return (u << 6) | (g << 3) | o


_SAFE_BUILTINS = (
    "True", "False", "None", "abs", "all", "any", "bin", "bool", "bytearray", "bytes", "chr",
    "dict", "divmod", "enumerate", "filter", "float", "format", "frozenset", "hex", "int",
    "isinstance", "iter", "len", "list", "map", "max", "min", "next", "oct", "ord", "pow",
    "print", "range", "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum",
    "tuple", "zip",
    "ArithmeticError", "AssertionError", "AttributeError", "Exception", "FileExistsError",
    "FileNotFoundError", "IndexError", "KeyError", "LookupError", "NameError",
    "NotImplementedError", "OSError", "PermissionError", "RuntimeError", "StopIteration",
    "TypeError", "ValueError", "ZeroDivisionError",
)
_BUILTINS: dict[str, object] = {name: getattr(builtins, name) for name in _SAFE_BUILTINS}


def build_globals(state: ScriptState, arg: int | None) -> dict[str, Any]:
    """Fill ``state.globals`` with the script environment and return it."""
    items: dict[str, object] = dict(_C_CONSTANTS)
    for name, fn in _C_FUNCTIONS.items():
        items[name] = _wrap(state, name, fn)
    # umask cannot fail; as in Emilua it returns the old mask, never a pair.
    items["umask"] = _umask
    g = state.globals
    g.clear()
    g.update(
        __builtins__=dict(_BUILTINS),
        C=CNamespace(items),
        arg=arg,
        mode=_mode,
        errexit=True,
        send_with_fd=_wrap(state, "send_with_fd", _send_with_fd),
        receive_with_fd=_wrap(state, "receive_with_fd", _receive_with_fd),
        write_all=_wrap(state, "write_all", _write_all),
        set_no_new_privs=_wrap(state, "set_no_new_privs", _linux.set_no_new_privs),
    )
    return g
