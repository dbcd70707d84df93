"""Thin ctypes bindings to Linux calls that Python 3.11's ``os`` lacks.

Everything is resolved at import time: these functions run in children that
may already have pivoted into an empty root or dropped privileges, where
importing or ``dlopen`` would fail. Failures raise
``OSError(errno, strerror[, path])``.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import signal
from collections.abc import Callable
from typing import Any

import prctl

_Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]
_CFn = Callable[..., Any]

__all__ = [
    "AT_EMPTY_PATH",
    "AT_FDCWD",
    "AT_RECURSIVE",
    "CAP_NAMES",
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWTIME",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MNT_EXPIRE",
    "MNT_FORCE",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOEXEC",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "MOVE_MOUNT_F_EMPTY_PATH",
    "MS_BIND",
    "MS_DIRSYNC",
    "MS_LAZYTIME",
    "MS_MANDLOCK",
    "MS_MOVE",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_NOSYMFOLLOW",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SILENT",
    "MS_SLAVE",
    "MS_STRICTATIME",
    "MS_SYNCHRONOUS",
    "MS_UNBINDABLE",
    "OPEN_TREE_CLOEXEC",
    "OPEN_TREE_CLONE",
    "SECBIT_KEEP_CAPS",
    "SECBIT_KEEP_CAPS_LOCKED",
    "SECBIT_NOROOT",
    "SECBIT_NOROOT_LOCKED",
    "SECBIT_NO_CAP_AMBIENT_RAISE",
    "SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED",
    "SECBIT_NO_SETUID_FIXUP",
    "SECBIT_NO_SETUID_FIXUP_LOCKED",
    "UMOUNT_NOFOLLOW",
    "cap_drop_bound",
    "cap_number",
    "cap_reset_ambient",
    "cap_set_ambient",
    "cap_set_proc",
    "clone_fork",
    "close_range",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "pivot_root",
    "set_dumpable",
    "set_no_new_privs",
    "set_pdeathsig",
    "set_securebits",
    "setdomainname",
    "sethostname",
    "setns",
    "umount",
    "umount2",
    "unshare",
]

# <linux/sched.h>
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# <linux/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_FORCE = 1
MNT_DETACH = 2
MNT_EXPIRE = 4
UMOUNT_NOFOLLOW = 8

# <linux/securebits.h>
SECBIT_NOROOT = 1 << 0
SECBIT_NOROOT_LOCKED = 1 << 1
SECBIT_NO_SETUID_FIXUP = 1 << 2
SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 3
SECBIT_KEEP_CAPS = 1 << 4
SECBIT_KEEP_CAPS_LOCKED = 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE = 1 << 6
SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 7

# <linux/prctl.h>
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_CAP_AMBIENT_LOWER = 3
_PR_CAP_AMBIENT_CLEAR_ALL = 4

# <linux/capability.h>, in number order; our own table because python-prctl
# stops at CAP_BPF.
CAP_NAMES: tuple[str, ...] = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill",
    "setgid", "setuid", "setpcap", "linux_immutable", "net_bind_service",
    "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control",
    "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)
_CAP_BY_NAME = {name: number for number, name in enumerate(CAP_NAMES)}

_SYSCALLS = {
    # machine: (pivot_root, close_range)
    "x86_64": (155, 436),
    "aarch64": (41, 436),
    "arm64": (41, 436),
}
_SYS_PIVOT_ROOT, _SYS_CLOSE_RANGE = _SYSCALLS.get(os.uname().machine, (-1, 436))


def _load_libc() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return ctypes.CDLL(None, use_errno=True)


_libc = _load_libc()
_c_int, _c_long, _c_ulong = ctypes.c_int, ctypes.c_long, ctypes.c_ulong
_c_char_p, _c_void_p, _c_size_t = ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t


def _bind(lib: ctypes.CDLL, name: str, restype: type, *argtypes: type) -> _CFn:
    # A fresh prototype per binding, so two bindings of the variadic
    # ``syscall`` or ``prctl`` keep their own argtypes.
    proto = ctypes.CFUNCTYPE(restype, *argtypes, use_errno=True)
    return proto((name, lib))


_unshare = _bind(_libc, "unshare", _c_int, _c_int)
_setns = _bind(_libc, "setns", _c_int, _c_int, _c_int)
_mount = _bind(_libc, "mount", _c_int, _c_char_p, _c_char_p, _c_char_p, _c_ulong, _c_char_p)
_umount = _bind(_libc, "umount", _c_int, _c_char_p)
_umount2 = _bind(_libc, "umount2", _c_int, _c_char_p, _c_int)
_sethostname = _bind(_libc, "sethostname", _c_int, _c_char_p, _c_size_t)
_setdomainname = _bind(_libc, "setdomainname", _c_int, _c_char_p, _c_size_t)
_sys_pivot_root = _bind(_libc, "syscall", _c_long, _c_long, _c_char_p, _c_char_p)
_sys_close_range = _bind(_libc, "syscall", _c_long, _c_long, ctypes.c_uint, ctypes.c_uint,
                         ctypes.c_uint)
_prctl5 = _bind(_libc, "prctl", _c_int, _c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong)


def _load_libcap() -> tuple[_CFn, _CFn, _CFn] | None:
    try:
        lib = ctypes.CDLL("libcap.so.2", use_errno=True)
    except OSError:
        return None
    return (_bind(lib, "cap_from_text", _c_void_p, _c_char_p),
            _bind(lib, "cap_set_proc", _c_int, _c_void_p),
            _bind(lib, "cap_free", _c_int, _c_void_p))


_libcap = _load_libcap()


def _raise(path: _Path | None = None) -> None:
    err = ctypes.get_errno()
    if path is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), os.fsdecode(path))


def _check(ret: int, path: _Path | None = None) -> int:
    if ret == -1:
        _raise(path)
    return ret


def _opt(path: _Path | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    """unshare(2). The process must be single-threaded for CLONE_NEWUSER."""
    _check(_unshare(flags))


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2); affects the calling thread only."""
    _check(_setns(fd, nstype))


def mount(source: _Path | None, target: _Path, fstype: str | bytes | None, flags: int,
          data: str | bytes | None = None) -> None:
    """mount(2)."""
    _check(_mount(_opt(source), os.fsencode(target), _opt(fstype), flags, _opt(data)), target)


def umount(target: _Path) -> None:
    """umount(2)."""
    _check(_umount(os.fsencode(target)), target)


def umount2(target: _Path, flags: int) -> None:
    """umount2(2), e.g. with MNT_DETACH."""
    _check(_umount2(os.fsencode(target), flags), target)


def pivot_root(new_root: _Path, put_old: _Path) -> None:
    """pivot_root(2); glibc has no wrapper, so this is the raw syscall."""
    if _SYS_PIVOT_ROOT < 0:
        raise OSError(_errno.ENOSYS, os.strerror(_errno.ENOSYS), os.fsdecode(new_root))
    _check(_sys_pivot_root(_SYS_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)),
           new_root)


def sethostname(name: str | bytes) -> None:
    """sethostname(2) in the current UTS namespace."""
    raw = os.fsencode(name)
    _check(_sethostname(raw, len(raw)))


def setdomainname(name: str | bytes) -> None:
    """setdomainname(2) in the current UTS namespace."""
    raw = os.fsencode(name)
    _check(_setdomainname(raw, len(raw)))


# The new mount API (Linux 5.2 and 5.12; one syscall number on every arch).
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_sys_open_tree = _bind(_libc, "syscall", _c_long, _c_long, _c_int, _c_char_p, ctypes.c_uint)
_sys_move_mount = _bind(_libc, "syscall", _c_long, _c_long, _c_int, _c_char_p, _c_int,
                        _c_char_p, ctypes.c_uint)
_sys_mount_setattr = _bind(_libc, "syscall", _c_long, _c_long, _c_int, _c_char_p,
                           ctypes.c_uint, ctypes.POINTER(_MountAttr), _c_size_t)


def open_tree(dirfd: int, path: _Path, flags: int) -> int:
    """open_tree(2): with OPEN_TREE_CLONE, a detached copy of a mount tree as an fd.

    A detached tree can be attached with ``move_mount`` in another mount
    namespace, which a bind mount by path cannot do.
    """
    return _check(_sys_open_tree(_SYS_OPEN_TREE, dirfd, os.fsencode(path), flags), path)


def move_mount(from_dirfd: int, from_path: _Path, to_dirfd: int, to_path: _Path,
               flags: int) -> None:
    """move_mount(2)."""
    _check(_sys_move_mount(_SYS_MOVE_MOUNT, from_dirfd, os.fsencode(from_path), to_dirfd,
                           os.fsencode(to_path), flags), to_path)


def mount_setattr(dirfd: int, path: _Path, flags: int, attr_set: int,
                  attr_clr: int = 0) -> None:
    """mount_setattr(2), e.g. AT_RECURSIVE with MOUNT_ATTR_RDONLY."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(_sys_mount_setattr(_SYS_MOUNT_SETATTR, dirfd, os.fsencode(path), flags,
                              ctypes.byref(attr), ctypes.sizeof(attr)), path)


# clone(2) as fork(2) does it, but with namespace flags: the child starts in
# its new namespaces (as PID 1 of a new pid namespace) without a second fork.
# Called through PyDLL so the GIL stays held across the syscall, wrapped in
# the interpreter's own fork hooks, with a NULL stack so that the child
# returns from the syscall exactly like a forked child. The caller must be
# single-threaded (the supervisor is).
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "arm64": 220}.get(os.uname().machine, -1)
_pyapi = ctypes.pythonapi
_py_syscall = ctypes.PyDLL(None, use_errno=True).syscall
_py_syscall.restype = _c_long
_py_syscall.argtypes = [_c_long, _c_ulong, _c_void_p, _c_void_p, _c_void_p, _c_ulong]
_SIGCHLD = int(signal.SIGCHLD)


def clone_fork(flags: int) -> int:
    """Forks into new namespaces (``CLONE_NEW*`` flags); returns 0 in the child."""
    if _SYS_CLONE < 0:
        raise OSError(_errno.ENOSYS, "clone: unsupported architecture")
    _pyapi.PyOS_BeforeFork()
    ctypes.set_errno(0)
    pid = _py_syscall(_SYS_CLONE, flags | _SIGCHLD, None, None, None, 0)
    if pid == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        err = err or _errno.EINVAL  # never report a failed clone as success
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


_UINT_MAX = 0xFFFFFFFF


def close_range(first: int, last: int = _UINT_MAX, flags: int = 0) -> None:
    """close_range(2); falls back to closing what /proc/self/fd lists."""
    ret = _sys_close_range(_SYS_CLOSE_RANGE, first, min(last, _UINT_MAX), flags)
    if ret == 0:
        return
    if ctypes.get_errno() != _errno.ENOSYS or flags:
        _raise()
    # Listing opens a descriptor of its own; closing it again is harmless.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if first <= fd <= last:
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != _errno.EBADF:
                    raise


def cap_number(cap: int | str) -> int:
    """Capability number from 12, "CAP_NET_ADMIN", "cap_net_admin" or "net_admin"."""
    if isinstance(cap, int):
        if 0 <= cap < 64:
            return cap
        raise ValueError(f"invalid capability number {cap}")
    name = cap.lower()
    name = name.removeprefix("cap_")
    try:
        return _CAP_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown capability {cap!r}") from None


def _prctl_call(fn: Callable[..., object], *args: object) -> None:
    # python-prctl rejects some bad arguments with ValueError itself;
    # report them as the kernel would.
    try:
        fn(*args)
    except ValueError:
        raise OSError(_errno.EINVAL, os.strerror(_errno.EINVAL)) from None


def set_pdeathsig(sig: int) -> None:
    """PR_SET_PDEATHSIG: signal sent when the parent thread dies (0 clears it)."""
    if not 0 <= sig <= signal.SIGRTMAX:
        raise OSError(_errno.EINVAL, os.strerror(_errno.EINVAL))
    _prctl_call(prctl.set_pdeathsig, sig)


def set_dumpable(flag: bool | int) -> None:
    """PR_SET_DUMPABLE. Needed e.g. to write /proc/self/*_map after setuid."""
    _prctl_call(prctl.set_dumpable, int(flag))


def cap_drop_bound(cap: int | str) -> None:
    """PR_CAPBSET_DROP for one capability."""
    _prctl_call(prctl.capbset_drop, cap_number(cap))


def set_securebits(bits: int) -> None:
    """PR_SET_SECUREBITS (SECBIT_* mask)."""
    # Not python-prctl: it rejects the NO_CAP_AMBIENT_RAISE bits.
    _check(_prctl5(_PR_SET_SECUREBITS, bits, 0, 0, 0))


def cap_set_ambient(cap: int | str, raise_: bool) -> None:
    """PR_CAP_AMBIENT raise or lower; python-prctl has no ambient API."""
    op = _PR_CAP_AMBIENT_RAISE if raise_ else _PR_CAP_AMBIENT_LOWER
    _check(_prctl5(_PR_CAP_AMBIENT, op, cap_number(cap), 0, 0))


def cap_reset_ambient() -> None:
    """PR_CAP_AMBIENT_CLEAR_ALL."""
    _check(_prctl5(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS; irreversible, inherited across fork and execve."""
    _check(_prctl5(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))


def cap_set_proc(text: str | bytes) -> None:
    """Set the process capability sets from cap_from_text(3) syntax, e.g. "cap_net_admin=ep"."""
    if _libcap is None:
        raise OSError(_errno.ENOSYS, "libcap.so.2 is not available")
    from_text, set_proc, free = _libcap
    caps = from_text(os.fsencode(text))
    if not caps:
        _raise()
    try:
        _check(set_proc(caps))
    finally:
        free(caps)
