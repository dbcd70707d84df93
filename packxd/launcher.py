"""Root-side work of one launch: directories, the container, its id maps.

Everything here runs as root in the daemon. It opens every host directory
the container mounts without following symlinks, spawns the container actor
with the constant init script, writes its uid/gid maps between the sync
points, brings its loopback up and streams it the setup operations.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import anyio

import pactors
from pactors import _linux as L

from . import container, safepath
from .config import Guest

_RTM_NEWLINK = 16
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_IFF_UP = 1
_LO_INDEX = 1
# What X clients read from the rootfs's /etc. Not /etc/xpra: its defaults
# start an Xsession wrapper around the app; our command line says it all.
ETC_BINDS = ("fonts", "X11")
STATE_DIR_MODE = 0o755


# Closing a descriptor a client sent can block for as long as the client
# likes (a TCP socket with SO_LINGER and a full buffer, a file on a FUSE
# mount that never answers FLUSH): never on the event loop, and only a few
# threads at a time.
_CLOSER = anyio.CapacityLimiter(4)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def close_untrusted(fds: list[int]) -> None:
    """Closes descriptors that came from a less trusted process, off the loop."""
    if fds:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close_all, list(fds), limiter=_CLOSER)


class LaunchError(Exception):
    """A launch failed; ``str()`` is a sentence for the user."""


def _opened(stack: ExitStack, fd: int) -> int:
    stack.callback(os.close, fd)
    return fd


def mount_tree(stack: ExitStack, fd: int, *, readonly: bool, recursive: bool = True) -> int:
    """A detached copy of the mount at ``fd``, nosuid and nodev (and read-only).

    The container attaches it with move_mount: a bind mount by path could
    neither take a mount from our namespace nor be trusted not to be swapped.
    """
    tree = _opened(stack, L.open_tree(
        fd, "", L.OPEN_TREE_CLONE | L.OPEN_TREE_CLOEXEC | L.AT_EMPTY_PATH
        | (L.AT_RECURSIVE if recursive else 0)))
    L.mount_setattr(tree, "", L.AT_EMPTY_PATH | L.AT_RECURSIVE,
                    L.MOUNT_ATTR_NOSUID | L.MOUNT_ATTR_NODEV
                    | (L.MOUNT_ATTR_RDONLY if readonly else 0))
    return tree


def prepare_state_dir(path: str) -> None:
    """Creates the daemon's state directory, or checks the existing one is root's."""
    os.makedirs(path, mode=STATE_DIR_MODE, exist_ok=True)
    fd = safepath.open_path(path)
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise LaunchError(f"{path} must belong to root and not be writable by others")
    finally:
        os.close(fd)


def open_home(stack: ExitStack, state_dir: str, caller_uid: int, uid: int, gid: int,
              app: str, profile: str) -> int:
    """``<state_dir>/<caller_uid>/<app>/<profile>``, owned by ``uid``:``gid``.

    The levels above the profile are root's, so the caller cannot swap them
    for symlinks; the profile itself is theirs.
    """
    home = _opened(stack, safepath.ensure_tree(state_dir, [
        (str(caller_uid), 0o711, 0, 0), (app, 0o711, 0, 0), (profile, 0o700, uid, gid)]))
    return mount_tree(stack, home, readonly=False, recursive=False)


def open_user_runtime(stack: ExitStack, uid: int, gid: int) -> bool:
    """Makes sure ``/run/user/<uid>`` exists and is the caller's, as logind would.

    Returns whether it had to create it (then ``remove_user_runtime`` may go).
    """
    fd = _opened(stack, safepath.open_path("/run"))
    fd = _opened(stack, safepath.ensure_dir(fd, "user", mode=0o755, uid=0, gid=0))
    missing = not os.path.lexists(f"/proc/self/fd/{fd}/{uid}")
    _opened(stack, safepath.ensure_dir(fd, str(uid), mode=0o700, uid=uid, gid=gid))
    return missing


def remove_user_runtime(uid: int) -> bool:
    """Removes ``/run/user/<uid>`` if it is empty; /run/user is root's, so the
    path cannot be redirected. Returns whether it is gone."""
    try:
        os.rmdir(f"/run/user/{uid}")
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def open_rootfs_dirs(stack: ExitStack, guest: Guest) -> tuple[int, tuple[tuple[str, int], ...]]:
    try:
        usr = mount_tree(stack, _opened(stack, safepath.open_path(
            os.path.join(guest.rootfs, "usr"))), readonly=True)
    except OSError as e:
        raise LaunchError(f"guest \"{guest.name}\": cannot use {guest.rootfs}/usr: "
                          f"{e.strerror}") from None
    etc: list[tuple[str, int]] = []
    for name in ETC_BINDS:
        try:
            fd = _opened(stack, safepath.open_path(os.path.join(guest.rootfs, "etc", name)))
        except OSError:
            continue  # absent or a symlink in the image: the container goes without
        etc.append((f"/etc/{name}", mount_tree(stack, fd, readonly=True)))
    return usr, tuple(etc)


def open_binds(stack: ExitStack, guest: Guest) -> tuple[tuple[str, int, bool], ...]:
    binds = []
    for bind in guest.binds:
        try:
            is_dir = stat.S_ISDIR(os.lstat(bind.source).st_mode)
            fd = _opened(stack, safepath.open_path(bind.source, directory=is_dir))
        except OSError as e:
            raise LaunchError(f"guest \"{guest.name}\": cannot bind {bind.source}: "
                              f"{e.strerror}") from None
        binds.append((bind.target, mount_tree(stack, fd, readonly=bind.readonly,
                                              recursive=is_dir), is_dir))
    return tuple(binds)


@contextmanager
def _proc_files(pid: int) -> Iterator[dict[str, int]]:
    with ExitStack() as stack:
        files = {}
        for name, flags in (("uid_map", os.O_WRONLY), ("setgroups", os.O_WRONLY),
                            ("gid_map", os.O_WRONLY), ("ns/user", os.O_RDONLY),
                            ("ns/net", os.O_RDONLY)):
            files[name] = _opened(stack, os.open(f"/proc/{pid}/{name}",
                                                 flags | os.O_CLOEXEC))
        yield files


def loopback_up(netns_fd: int) -> None:
    """Sets ``lo`` up in the network namespace ``netns_fd``, over rtnetlink.

    The seed runs ``ip link set lo up`` through system.spawn; one netlink
    request saves a fork and an exec per launch. pyroute2's synchronous API
    cannot run inside our event loop, so the request is built here: one
    RTM_NEWLINK with IFF_UP for interface index 1, which is lo in every
    namespace. The socket is created inside the namespace (setns on this
    thread only, and straight back: nothing else runs in between).
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        L.setns(netns_fd, L.CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 socket.NETLINK_ROUTE)
        finally:
            L.setns(own, L.CLONE_NEWNET)
    finally:
        os.close(own)
    with sock:
        # nlmsghdr, then ifinfomsg {family, type, index, flags, change}
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, _LO_INDEX, _IFF_UP, _IFF_UP)
        header = struct.pack("=IHHII", 16 + len(body), _RTM_NEWLINK,
                             _NLM_F_REQUEST | _NLM_F_ACK, 1, 0)
        sock.send(header + body)
        reply = sock.recv(4096)
    length, kind = struct.unpack_from("=IH", reply)
    if kind != _NLMSG_ERROR or length < 20:
        raise LaunchError("bringing up the container's loopback failed: bad netlink reply")
    (error,) = struct.unpack_from("=i", reply, 16)
    if error:
        raise LaunchError(f"bringing up the container's loopback failed: "
                          f"{os.strerror(-error)}")


async def _send_datagram(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    while True:
        try:
            socket.send_fds(sock, [data], fds) if fds else sock.send(data)
            return
        except BlockingIOError:
            await anyio.wait_writable(sock)


BATCH_BYTES = 128 * 1024


def encode_ops(ops: list[container.Op]) -> list[tuple[bytes, int | None]]:
    """The datagrams for the init script: batches of operations, one fd at most each."""
    batches: list[tuple[bytes, int | None]] = []
    records: list[bytes] = []
    batch_fd: int | None = None
    size = 0
    for op in [*ops, container.END]:
        data, fd = op.encode()
        if records and ((fd is not None and batch_fd is not None)
                        or size + len(data) > BATCH_BYTES):
            batches.append((b"\x1e".join(records), batch_fd))
            records, batch_fd, size = [], None, 0
        records.append(data)
        size += len(data) + 1
        if fd is not None:
            batch_fd = fd
    batches.append((b"\x1e".join(records), batch_fd))
    return batches


def close_op_fds(ops: list[tuple[bytes, int | None]]) -> None:
    for _, fd in ops:
        if fd is not None:
            os.close(fd)


async def start_container(ops: list[tuple[bytes, int | None]], *, user: int, caller_uid: int,
                          caller_gid: int, environment: dict[str, str],
                          stdio: tuple[object, object, object],
                          newns_net: bool = True) -> pactors.Actor:
    """Spawns the guest actor in new namespaces and sets its container up.

    ``ops`` are the encoded setup operations, END included. Returns once
    every one is queued; the init script runs them and then the guest actor
    starts. A failure raises LaunchError, with the init script's error when
    there is one.
    """
    host, init_sock = socket.socketpair(socket.AF_UNIX,
                                        socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with host:
        try:
            actor = await pactors.spawn_actor("packxd.actors.guest", subprocess=pactors.Subprocess(
                newns_user=True, newns_mount=True, newns_pid=True, newns_net=newns_net,
                newns_uts=True, newns_ipc=True,
                init=pactors.Init(container.INIT_SCRIPT, init_sock),
                stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], environment=environment))
        finally:
            init_sock.close()
        host.setblocking(False)
        try:
            assert actor.child_pid is not None
            with _proc_files(actor.child_pid) as proc:
                # The child still runs after we opened them (its pidfd is not
                # readable), so its pid was not reused: the files are its own.
                if actor.pidfd is None or select.select([actor.pidfd], [], [], 0)[0]:
                    raise LaunchError("the container died while starting")
                os.write(proc["uid_map"], f"0 0 1\n{user} {caller_uid} 1\n".encode())
                os.write(proc["setgroups"], b"allow")
                os.write(proc["gid_map"], f"0 0 1\n{user} {caller_gid} 1\n".encode())
                # the sync point: maps written
                await _send_datagram(host, b".", [])
                if newns_net:
                    loopback_up(proc["ns/net"])
            for data, fd in ops:
                await _send_datagram(host, data, [fd] if fd is not None else [])
        except Exception as e:
            actor.kill()
            try:
                await actor.wait()
            except pactors.InitError as init_error:
                raise LaunchError(f"setting up the container failed: {init_error}") from e
            if isinstance(e, OSError):
                raise LaunchError(f"the container died while starting ({e})") from e
            raise
        except BaseException:
            actor.kill()
            raise
    return actor
