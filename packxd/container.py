"""The container, as a list of setup operations executed in order.

The daemon builds the list here from the validated config and request; the
init script (``INIT_SCRIPT``, a constant) receives the operations over its
``arg`` socket, one datagram each, and executes them with ``errexit`` set.
No user string is ever formatted into the script: every value travels as
data, every path as a plain argument, and every host directory as a mount
tree fd cloned from a directory opened without following symlinks.

Wire format of one operation: NUL-separated fields; the first is the
operation name, each other is a type letter and a value: ``i`` int, ``s``
str, ``n`` None, ``f`` "the fd carried by this datagram". Operations are
batched, separated by RS (0x1e), into datagrams of at most one fd each.

Host directories reach the container as detached mount trees
(``open_tree(OPEN_TREE_CLONE)``, made read-only, nosuid and nodev
recursively by the daemon): a bind mount by path cannot take a mount from
the daemon's namespace, and a path could be swapped under us.
"""

from __future__ import annotations

import dataclasses

from pactors import _linux as L

from .config import Guest

NEW_ROOT = "/mnt"

INIT_SCRIPT = r"""
# The one sync point: uid and gid maps written (tmpfs needs them, kernel bug
# 183461). The seed's first sync point, which proves the daemon opened our
# own /proc files, is a pidfd check on the daemon's side.
C.read(arg, 1)
C.setresuid(0, 0, 0)
C.setresgid(0, 0, 0)

def write_file(path, mode, content):
    fd = C.open(path, C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW | C.O_CLOEXEC, mode)
    write_all(fd, content)
    C.close(fd)

OPS = {
    'mount': C.mount, 'umount2': C.umount2, 'mkdir': C.mkdir, 'mknod': C.mknod,
    'symlink': C.symlink, 'chown': C.chown, 'chmod': C.chmod, 'chdir': C.chdir,
    'pivot_root': C.pivot_root, 'chroot': C.chroot, 'umask': C.umask,
    'attach': lambda tree, target: C.move_mount(tree, '', C.AT_FDCWD, target,
                                                C.MOVE_MOUNT_F_EMPTY_PATH),
    'sethostname': C.sethostname, 'setdomainname': C.setdomainname,
    'setresuid': C.setresuid, 'setresgid': C.setresgid, 'setsid': C.setsid,
    'clear_groups': lambda: C.setgroups([]), 'no_new_privs': set_no_new_privs,
    'write_file': write_file,
}

done = False
while not done:
    data, fd = receive_with_fd(arg, 262144)
    for record in data.decode().split('\x1e'):
        fields = record.split('\0')
        if fields[0] == 'end':
            done = True
            break
        args = []
        for field in fields[1:]:
            kind, value = field[:1], field[1:]
            if kind == 'i':
                args.append(int(value))
            elif kind == 's':
                args.append(value)
            elif kind == 'n':
                args.append(None)
            elif kind == 'f' and fd is not None:
                args.append(fd)
            else:
                raise ValueError('bad field in operation ' + fields[0])
        OPS[fields[0]](*args)
    if fd is not None:
        C.close(fd)
"""


@dataclasses.dataclass(frozen=True)
class FdArg:
    """Stands for a host directory or file passed as an fd (the mount source)."""

    fd: int


Value = int | str | None | FdArg


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    args: tuple[Value, ...]

    def encode(self) -> tuple[bytes, int | None]:
        fields = [self.name]
        fd: int | None = None
        for value in self.args:
            if isinstance(value, FdArg):
                if fd is not None:
                    raise ValueError(f"{self.name}: one fd per operation")
                fd = value.fd
                fields.append("f")
            elif value is None:
                fields.append("n")
            elif isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError(f"{self.name}: bad argument {value!r}")
            elif isinstance(value, int):
                fields.append(f"i{value}")
            else:
                if "\0" in value or "\x1e" in value:
                    raise ValueError(f"{self.name}: NUL or RS in argument")
                fields.append(f"s{value}")
        return "\0".join(fields).encode(), fd


END = Op("end", ())


@dataclasses.dataclass(frozen=True)
class HostDirs:
    """Host directories the container mounts, each a detached mount tree fd."""

    usr: int
    home: int
    xpra: int | None = None
    etc_binds: tuple[tuple[str, int], ...] = ()  # (path in container, tree)
    binds: tuple[tuple[str, int, bool], ...] = ()  # (target, tree, is_dir)


def _mode(u: int, g: int, o: int) -> int:
    return (u << 6) | (g << 3) | o


def passwd(user: int) -> str:
    return (f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"user:x:{user}:{user}:user:/home/user:/bin/sh\n")


def group(user: int) -> str:
    return f"root:x:0:\nuser:x:{user}:\n"


def build(guest: Guest, dirs: HostDirs, *, resolv_conf: str | None) -> list[Op]:
    """The whole container setup, from a private mount tree to the dropped user."""
    user = guest.user
    root = NEW_ROOT
    ops: list[Op] = []
    made: set[str] = set()

    def op(name: str, *args: Value) -> None:
        ops.append(Op(name, args))

    def mkdir(path: str, mode: int) -> None:
        if path not in made:
            made.add(path)
            op("mkdir", root + path, mode)

    def attach(tree: int, target: str) -> None:
        op("attach", FdArg(tree), root + target)

    sticky = _mode(7, 7, 7) | 0o1000
    op("mount", None, "/", None, L.MS_PRIVATE | L.MS_REC, None)
    op("umask", 0)
    op("mount", None, root, "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=0755")
    mkdir("/proc", _mode(7, 5, 5))
    op("mount", None, root + "/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC, None)
    mkdir("/tmp", sticky)
    mkdir("/tmp/.X11-unix", sticky)
    mkdir("/run", _mode(7, 5, 5))
    mkdir("/run/user", _mode(7, 5, 5))
    mkdir(f"/run/user/{user}", _mode(7, 0, 0))
    op("chown", f"{root}/run/user/{user}", user, user)

    # /dev: the seed's nodes, devpts, shm, mqueue and the fd symlinks.
    mkdir("/dev", _mode(7, 5, 5))
    mkdir("/dev/pts", _mode(7, 5, 5))
    mkdir("/dev/shm", sticky)
    mkdir("/dev/mqueue", sticky)
    for target, link in (("/proc/self/fd", "fd"), ("/dev/pts/ptmx", "ptmx"),
                         ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"),
                         ("/proc/self/fd/2", "stderr")):
        op("symlink", target, f"{root}/dev/{link}")
    for node in ("full", "null", "random", "tty", "urandom", "zero"):
        op("mknod", f"{root}/dev/{node}", _mode(6, 6, 6), 0)
        op("mount", f"/dev/{node}", f"{root}/dev/{node}", None, L.MS_BIND, None)
    op("mount", None, root + "/dev/pts", "devpts", L.MS_NOSUID | L.MS_NOEXEC,
       f"newinstance,gid={user},mode=620,ptmxmode=0666")
    op("mount", None, root + "/dev/mqueue", "mqueue", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC,
       None)

    # /etc: only what a session needs.
    mkdir("/etc", _mode(7, 5, 5))
    op("write_file", root + "/etc/passwd", _mode(6, 4, 4), passwd(user))
    op("write_file", root + "/etc/group", _mode(6, 4, 4), group(user))
    op("write_file", root + "/etc/hosts", _mode(6, 4, 4),
       f"127.0.0.1\tlocalhost\n127.0.1.1\t{guest.hostname}\n::1\tlocalhost\n")
    op("write_file", root + "/etc/hostname", _mode(6, 4, 4), guest.hostname + "\n")
    if resolv_conf is not None:
        op("write_file", root + "/etc/resolv.conf", _mode(6, 4, 4), resolv_conf)
    for target, tree in dirs.etc_binds:
        mkdir(target, _mode(7, 5, 5))
        attach(tree, target)

    # The persistent home and the rootfs's /usr (read-only, no setuid).
    mkdir("/home", _mode(7, 5, 5))
    mkdir("/home/user", _mode(7, 5, 5))
    attach(dirs.home, "/home/user")
    mkdir("/usr", _mode(7, 5, 5))
    attach(dirs.usr, "/usr")
    for link, target in sorted(guest.root_symlinks.items()):
        op("symlink", target, root + link)
    for target, tree, is_dir in dirs.binds:
        parts = target.strip("/").split("/")
        for i in range(1, len(parts)):
            mkdir("/" + "/".join(parts[:i]), _mode(7, 5, 5))
        if is_dir:
            mkdir(target, _mode(7, 5, 5))
        else:
            op("mknod", root + target, _mode(6, 4, 4), 0)
        attach(tree, target)
    if dirs.xpra is not None:
        mkdir(f"/run/user/{user}/xpra", _mode(7, 0, 0))
        attach(dirs.xpra, f"/run/user/{user}/xpra")

    # pivot_root(".", "."), then detach the old root stacked underneath:
    # nothing of the host stays reachable and no /mnt is left behind.
    op("chdir", root)
    op("pivot_root", ".", ".")
    op("umount2", ".", L.MNT_DETACH)
    op("chdir", "/")
    op("sethostname", guest.hostname)
    op("setdomainname", guest.hostname)
    op("umask", 0o022)
    # Drop root for good: no setuid-gain on exec, no groups, the user's ids.
    op("no_new_privs")
    op("clear_groups")
    op("setresgid", user, user, user)
    op("setresuid", user, user, user)
    op("setsid")
    return ops


def session_environment(guest: Guest, *, display: str | None) -> dict[str, str]:
    """The app's environment: the guest's, plus what apps expect of a session."""
    env = dict(guest.environment)
    env.update(HOME="/home/user", USER="user", LOGNAME="user",
               XDG_RUNTIME_DIR=f"/run/user/{guest.user}")
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if display is not None:
        env["DISPLAY"] = display
    return env
