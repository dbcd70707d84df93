"""Path handling for the root daemon that never follows a symlink.

A caller owns directories the daemon works in (its persistent home, its
runtime directory), and a container's rootfs may be an untrusted image. Every
path is therefore walked one component at a time with O_NOFOLLOW from an fd
the daemon already trusts, and the result is handed on as an fd, not a path
(LXC CVE-2015-1335, flatpak CVE-2024-42472).
"""

from __future__ import annotations

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path is a symlink, not a directory, or owned by the wrong user."""


def _components(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise ValueError(f"path must not contain '..': {path!r}")
    return parts


def open_path(path: str, *, directory: bool = True) -> int:
    """Opens an absolute path without following any symlink; returns an fd.

    The last component may be a regular file when ``directory`` is False
    (the fd is then O_PATH). Raises UnsafePath (ELOOP) for a symlink.
    """
    parts = _components(path)
    fd = os.open("/", _DIR_FLAGS)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            flags = _DIR_FLAGS if (directory or not last) else (
                os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(e.errno, f"{path}: {'/'.join(parts[:i + 1])} is a "
                                     "symlink or not a directory") from None
                raise OSError(e.errno, f"{path}: {e.strerror}") from None
            os.close(fd)
            fd = nfd
            if not directory and last and stat.S_ISLNK(os.fstat(fd).st_mode):
                raise UnsafePath(errno.ELOOP, f"{path} is a symlink")
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure_dir(parent_fd: int, name: str, *, mode: int, uid: int, gid: int) -> int:
    """Opens directory ``name`` under ``parent_fd``, creating it if missing.

    A directory created here gets ``mode`` and ``uid``:``gid``; an existing
    one must already belong to ``uid`` and must not be a symlink, or
    UnsafePath is raised. Returns an fd of the directory.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad directory name {name!r}")
    created = False
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(e.errno, f"{name} is a symlink or not a directory") from None
        raise
    try:
        if created:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise UnsafePath(errno.EPERM, f"{name} belongs to uid {st.st_uid}, not {uid}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure_tree(path: str, levels: list[tuple[str, int, int, int]]) -> int:
    """Opens ``path`` (which must exist and be root's), then each level below it.

    ``levels`` lists (name, mode, uid, gid), outermost first. Returns the fd
    of the innermost directory.
    """
    fd = open_path(path)
    try:
        for name, mode, uid, gid in levels:
            nfd = ensure_dir(fd, name, mode=mode, uid=uid, gid=gid)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise
