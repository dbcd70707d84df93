"""The handler actor: one per client connection, in the daemon's process.

It authorizes the peer by SO_PEERCRED, then serves requests until the
client hangs up and every app it launched has ended. A launch lives in the
handler's task group: it starts the container (``launcher``), replies with
the control socket, relays events and signals, and reports the exit status.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import struct
import sys
import time
import traceback
from contextlib import ExitStack
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

import pactors

from .. import container, launcher, network, protocol, safepath
from .._text import printable
from ..config import Config, Guest, Veth
from ..launcher import LaunchError, close_untrusted
from . import userrundir
from .guest import XPRA_DISPLAY

START_TIMEOUT = 60.0
MAX_CONNECTIONS = 1024
MAX_CONNECTIONS_PER_UID = 64
STOP_WATCHDOG = 15.0  # after a stop request: the guest gives SIGKILL at 10 s
# xpra's output (and the app's, which xpra passes on) in our log, per launch:
MAX_OUTPUT_LINES = 200
MAX_OUTPUT_LINE = 300  # characters
OUTPUT_GRACE = 2.0  # seconds to read what is left once the container is gone
TEARDOWN_WAIT = 10.0  # how long a relaunch waits for the same app's teardown
REFUSED_LINGER = 5.0  # how long a refused client has to send its request


def log(message: str) -> None:
    print(f"packxd: {message}", file=sys.stderr, flush=True)


NOBODY = 65534


@dataclasses.dataclass(frozen=True)
class Caller:
    pid: int
    uid: int
    gid: int

    @property
    def run_ids(self) -> tuple[int, int]:
        """The host ids the app runs as: the caller's, and never root's.

        Root may launch apps, but mapping the container's user to host root
        would give the app real root over host files: root's apps run as nobody.
        """
        return (NOBODY, NOBODY) if self.uid == 0 else (self.uid, self.gid)


@dataclasses.dataclass
class Launch:
    caller: Caller
    guest: str
    app: str
    profile: str
    display: str
    worker: pactors.Actor | None = None  # root, parent of the container
    container: pactors.Channel | None = None  # the guest actor's inbox
    pid: int = 0  # the container's PID 1, as the host sees it
    app_exited: bool = False  # the client has the app's status; teardown follows
    ended: anyio.Event = dataclasses.field(default_factory=anyio.Event)  # out of running

    def info(self) -> dict[str, Any]:
        return {"guest": self.guest, "app_name": self.app, "profile": self.profile,
                "display": self.display, "pid": self.pid}

    async def stop(self) -> None:
        if self.container is not None:
            try:
                await self.container.send({"stop": True})
            except pactors.PactorsError:
                pass


@dataclasses.dataclass
class Daemon:
    """What every handler shares: the config and the running launches."""

    config: Config
    config_path: str
    state_dir: str
    running: dict[tuple[int, str, str], Launch] = dataclasses.field(default_factory=dict)
    # One guest network is created at a time, as the seed's mutex does.
    network_lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)
    # The /run/user/<uid> directories this daemon created (for xpra).
    made_rundirs: set[int] = dataclasses.field(default_factory=set)
    # Open client connections per uid: a bound on what any one user may hold.
    connections: dict[int, int] = dataclasses.field(default_factory=dict)


def peer_credentials(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Caller(pid, uid, gid)


async def _recv(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    # Let the other tasks run first, every time: a packet waiting is taken
    # without a wait, and a client that keeps its socket full must not keep
    # the daemon from serving everybody else. First, so that a cancellation
    # here loses no packet.
    await anyio.lowlevel.checkpoint()
    rejected: list[int] = []
    try:
        while True:
            try:
                return protocol.recv_packet(sock, maxfds, discard=rejected.extend)
            except BlockingIOError:
                await anyio.wait_readable(sock)
    finally:
        await close_untrusted(rejected)


async def _send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    while True:
        try:
            protocol.send_packet(sock, data, fds or [])
            return
        except BlockingIOError:
            await anyio.wait_writable(sock)


def handler(daemon: Daemon) -> Any:
    """The handler actor's entry point, bound to the daemon's shared state."""

    async def main(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        inbox.close()
        sock = socket.socket(fileno=msg["conn"].detach())
        sock.setblocking(False)
        uid = peer_credentials(sock).uid
        daemon.connections[uid] = daemon.connections.get(uid, 0) + 1
        try:
            if (daemon.connections[uid] > MAX_CONNECTIONS_PER_UID
                    or sum(daemon.connections.values()) > MAX_CONNECTIONS):
                log(f"refused a connection of uid {uid}: too many connections")
                try:
                    protocol.send_packet(sock, protocol.error_reply(
                        "packxd has too many connections; try again later"))
                except OSError:
                    pass
            else:
                await _serve(daemon, sock)
        finally:
            daemon.connections[uid] -= 1
            if not daemon.connections[uid]:
                del daemon.connections[uid]
            # Unread requests may still carry the client's descriptors.
            anyio.notify_closing(sock)
            await close_untrusted([sock.detach()])

    return main


async def _serve(daemon: Daemon, sock: socket.socket) -> None:
    caller = peer_credentials(sock)
    if caller.uid != 0 and caller.uid not in daemon.config.permit_uids:
        log(f"refused uid {caller.uid} (pid {caller.pid}): not in permit_users")
        try:
            await _send(sock, protocol.error_reply(f"uid {caller.uid} is not permitted to use "
                                                   "packxd"))
        except OSError:
            return
        # Close only once the client has sent its request (or hung up): its
        # send to a closed socket fails with EPIPE before it reads our reply.
        with anyio.move_on_after(REFUSED_LINGER):
            try:
                _, fds = await _recv(sock, protocol.MAX_REQUEST_FDS)
            except (protocol.ProtocolError, OSError):
                fds = []
            await close_untrusted(fds)
        return
    async with anyio.create_task_group() as tg:
        while True:
            try:
                data, fds = await _recv(sock, protocol.MAX_REQUEST_FDS)
            except protocol.ProtocolError as e:
                await _reply_error(sock, str(e))
                continue
            except OSError:
                break
            if not data:
                break
            try:
                await _dispatch(daemon, caller, sock, tg, data, fds)
            except protocol.ProtocolError as e:
                await _reply_error(sock, str(e))
            except (BrokenPipeError, ConnectionResetError):
                # The client hung up before our reply; an app it started is
                # stopped as its control channel closes.
                break
            except Exception as e:  # a bug: log it, tell the client, keep serving
                log(f"internal error serving uid {caller.uid}: {e!r}\n{traceback.format_exc()}")
                await _reply_error(sock, "internal error in packxd (see the daemon's log)")
            finally:
                await close_untrusted(fds)


async def _reply_error(sock: socket.socket, message: str) -> None:
    try:
        await _send(sock, protocol.error_reply(message))
    except OSError:
        pass


async def _dispatch(daemon: Daemon, caller: Caller, sock: socket.socket,
                    tg: anyio.abc.TaskGroup, data: bytes, fds: list[int]) -> None:
    request = protocol.parse_request(data)
    args = request.arguments
    if request.name == "list":
        protocol.check_request_fds(request, len(fds), "xpra")
        apps = [launch.info() for (uid, _, _), launch in sorted(daemon.running.items())
                if uid == caller.uid or caller.uid == 0]
        await _send(sock, protocol.ok_reply({"apps": apps}))
    elif request.name == "stop":
        protocol.check_request_fds(request, len(fds), "xpra")
        launch = daemon.running.get((caller.uid, args["app_name"], args["profile"]))
        if launch is None:
            raise protocol.ProtocolError(
                f"app \"{args['app_name']}\" with profile \"{args['profile']}\" is not running")
        await launch.stop()
        await _send(sock, protocol.ok_reply())
    else:
        guest = daemon.config.guests.get(args["guest_name"])
        if guest is None:
            raise protocol.ProtocolError(
                f"guest \"{args['guest_name']}\" is not in {daemon.config_path}")
        display = args.get("display") or guest.display
        protocol.check_request_fds(request, len(fds), display)
        key = (caller.uid, args["app_name"], args["profile"])
        earlier = daemon.running.get(key)
        if earlier is not None and earlier.app_exited:
            # Its client has the status and may launch it again at once:
            # wait for the teardown (same home, same runtime directory).
            with anyio.move_on_after(TEARDOWN_WAIT):
                await earlier.ended.wait()
        if key in daemon.running:
            raise protocol.ProtocolError(
                f"app \"{key[1]}\" with profile \"{key[2]}\" is already running")
        launch = Launch(caller, guest.name, key[1], key[2], display)
        daemon.running[key] = launch
        stdio = [os.dup(fd) for fd in fds] if display == "none" else []
        try:
            try:
                reply, control = await tg.start(_run_launch, daemon, launch, guest, args,
                                                stdio)
            except LaunchError as e:
                daemon.running.pop(key, None)
                raise protocol.ProtocolError(str(e)) from None
            try:
                await _send(sock, reply, [control.fileno()])
            finally:
                control.close()
        finally:
            # After the reply: a close off the loop costs a thread's round trip.
            await close_untrusted(stdio)


async def _run_launch(daemon: Daemon, launch: Launch, guest: Guest, args: dict[str, Any],
                      stdio: list[int], *, task_status: anyio.abc.TaskStatus[Any]) -> None:
    key = (launch.caller.uid, launch.app, launch.profile)
    try:
        await _launch(daemon, launch, guest, args, stdio, task_status)
    except OSError as e:  # from preparing directories: unsafe or unusable paths
        raise LaunchError(f"cannot prepare the app's directories: {e.strerror or e}") from None
    finally:
        daemon.running.pop(key, None)
        launch.ended.set()


async def _userrundir(op: str, caller: Caller, app: str, profile: str) -> None:
    worker = await pactors.spawn_actor("packxd.actors.userrundir",
                                       subprocess=pactors.Subprocess(stderr="share"))
    inbox = pactors.Inbox()
    uid, gid = caller.run_ids
    await worker.send({"op": op, "uid": uid, "gid": gid, "app": app,
                       "profile": profile, "reply_to": inbox.address})
    try:
        reply = await inbox.receive()
    except pactors.NoSenders:
        reply = {"ok": False, "error": "the worker died"}
    finally:
        inbox.close()
    await worker.wait()
    if not (isinstance(reply, dict) and reply.get("ok")):
        error = reply.get("error") if isinstance(reply, dict) else None
        raise LaunchError(f"cannot prepare the runtime directory: {error}")


async def _launch(daemon: Daemon, launch: Launch, guest: Guest, args: dict[str, Any],
                  stdio: list[int], task_status: anyio.abc.TaskStatus[Any]) -> None:
    caller = launch.caller
    xpra = launch.display == "xpra"
    run_uid, run_gid = caller.run_ids
    runtime_dir = userrundir.runtime_dir(run_uid, launch.app, launch.profile)
    started_at = time.monotonic()
    events = pactors.Inbox()  # the worker's reports and the guest's events
    output: int | None = None  # xpra's stdout and stderr, for our log
    try:
        with ExitStack() as stack:
            home = launcher.open_home(stack, daemon.state_dir, caller.uid, run_uid, run_gid,
                                      launch.app, launch.profile)
            usr, etc_binds = launcher.open_rootfs_dirs(stack, guest)
            binds = launcher.open_binds(stack, guest)
            xpra_fd = None
            if xpra:
                if launcher.open_user_runtime(stack, run_uid, run_gid):
                    daemon.made_rundirs.add(run_uid)
                await _userrundir("create", caller, launch.app, launch.profile)
                xpra_fd = launcher.mount_tree(
                    stack, stack.enter_context(_owned_dir(runtime_dir + "/xpra", run_uid)),
                    readonly=False, recursive=False)
            ops = launcher.encode_ops(container.build(guest, container.HostDirs(
                usr=usr, home=home, xpra=xpra_fd, etc_binds=etc_binds, binds=binds),
                resolv_conf=_resolv_conf(guest)))
            netns_fd = await _guest_netns(daemon, stack, guest)
            # With a guest netns, the worker is a process of its own that joins
            # it first; otherwise it is an actor of this process.
            container_stdio = stdio  # terminal mode: the client's own
            if xpra:
                # Nothing of the daemon's (its log, or root's terminal) reaches
                # the container: xpra writes to a pipe we read.
                output, output_w = os.pipe2(os.O_CLOEXEC)
                stack.callback(os.close, output_w)
                null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                stack.callback(os.close, null)
                container_stdio = [null, output_w, output_w]
            launch.worker = await pactors.spawn_actor(
                "packxd.actors.container_worker",
                subprocess=pactors.Subprocess(
                    stdout="share", stderr="share",
                    init=pactors.Init("C.setns(arg, C.CLONE_NEWNET)", netns_fd),
                ) if netns_fd is not None else None)
            await launch.worker.send({
                "ops": [[data, pactors.Fd(fd) if fd is not None else None]
                        for data, fd in ops],
                "uid": run_uid, "gid": run_gid, "user": guest.user,
                "environment": container.session_environment(
                    guest, display=XPRA_DISPLAY if xpra else None),
                "stdio": [pactors.Fd(fd) for fd in container_stdio],
                "newns_net": netns_fd is None, "reply_to": events.address})
        reply = await _receive(events, launch.worker)
        if "container" not in reply:
            raise LaunchError(str(reply.get("error", "the container worker failed")))
        launch.container, launch.pid = reply["container"], int(reply["pid"])
        await launch.container.send({
            "events": events.address, "app_bin": args["app_bin"], "args": args["args"],
            "display": launch.display, "xpra_dir": f"/run/user/{guest.user}/xpra"})
        event = await _receive(events, launch.worker)
        if event.get("event") != "started":
            raise LaunchError(str(event.get("error", "the container exited before the app "
                                               "started")))
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        log(f"uid {caller.uid} started {guest.name}/{launch.app}/{launch.profile} "
            f"({launch.display}) as pid {launch.pid} in "
            f"{(time.monotonic() - started_at) * 1000:.0f} ms")
        task_status.started((protocol.ok_reply({"display": launch.display,
                                                "runtime_dir": runtime_dir}), theirs))
        with ours:
            ours.setblocking(False)
            async with anyio.create_task_group() as tg:
                if output is not None:
                    tg.start_soon(_log_output, f"{guest.name}/{launch.app}/{launch.profile}",
                                  output)
                status = await _supervise(launch, events, ours)
                # Its writers are gone with the container: what is left, then EOF.
                tg.cancel_scope.deadline = anyio.current_time() + OUTPUT_GRACE
            log(f"{guest.name}/{launch.app}/{launch.profile} of uid {caller.uid} exited "
                f"with status {status}")
    finally:
        if output is not None:
            os.close(output)
        # Killing the worker kills the container with it (parent-death signals).
        if launch.worker is not None:
            launch.worker.kill()
            launch.worker.close()
        if launch.container is not None:
            launch.container.close()
        events.close()
        with anyio.CancelScope(shield=True):
            if xpra:
                try:
                    await _userrundir("remove", caller, launch.app, launch.profile)
                except (LaunchError, pactors.PactorsError, OSError) as e:
                    log(f"cleaning {runtime_dir} failed: {e}")
                # Like logind at logout: the /run/user/<uid> we made goes with
                # the user's last display launch.
                busy = any(other.caller.run_ids[0] == run_uid and other.display == "xpra"
                           for other in daemon.running.values() if other is not launch)
                if (run_uid in daemon.made_rundirs and not busy
                        and launcher.remove_user_runtime(run_uid)):
                    daemon.made_rundirs.discard(run_uid)


def _resolv_conf(guest: Guest) -> str | None:
    """The guest's resolv.conf, or the host's usable nameservers."""
    if guest.resolv_conf is not None:
        return guest.resolv_conf
    usable, skipped = network.host_nameservers()
    if skipped:
        log(f"guest {guest.name}: not copying loopback nameservers {', '.join(skipped)} "
            "from the host's /etc/resolv.conf: they cannot work from another namespace")
    return "".join(f"nameserver {ns}\n" for ns in usable) if usable else None


async def _guest_netns(daemon: Daemon, stack: ExitStack, guest: Guest) -> int | None:
    """Ensures the guest's netns and veth (serialized); returns a netns fd."""
    if guest.veth is None:
        return None
    async with daemon.network_lock:
        if not network.looks_complete(guest.name, guest.veth):
            await _ensure_network(guest, guest.veth)
    try:
        fd = network.open_netns(guest.name)
    except OSError as e:
        raise LaunchError(f"the network namespace of guest \"{guest.name}\" is gone: "
                          f"{e.strerror}") from None
    stack.callback(os.close, fd)
    return fd


async def _ensure_network(guest: Guest, veth: Veth) -> None:
    """Has the netns worker create or repair the guest's network."""
    worker = await pactors.spawn_actor("packxd.actors.netns",
                                       subprocess=pactors.Subprocess(stderr="share"))
    replies = pactors.Inbox()
    try:
        await worker.send({"guest": guest.name, "ifname": veth.ifname,
                           "address": str(veth.address), "gateway": str(veth.gateway),
                           "reply_to": replies.address})
        reply = await _receive(replies, worker)
        await worker.wait()
    finally:
        replies.close()
        worker.close()
    if not reply.get("ok"):
        raise LaunchError(str(reply.get("error", "setting up the network failed")))


async def _receive(inbox: pactors.Inbox, worker: pactors.Actor | None) -> dict[str, Any]:
    """The next dict from ``inbox``; a dead worker's error becomes a LaunchError."""
    try:
        with anyio.fail_after(START_TIMEOUT):
            msg = await inbox.receive()
    except TimeoutError:
        raise LaunchError("the container did not start in time") from None
    except pactors.NoSenders:
        if worker is not None:
            try:
                await worker.wait()
            except pactors.PactorsError as e:
                raise LaunchError(f"a packxd worker failed: {e}") from None
        raise LaunchError("a packxd worker exited unexpectedly") from None
    if not isinstance(msg, dict):
        raise LaunchError("a packxd worker sent a malformed message")
    return msg


class _owned_dir:
    """Opens a caller-owned directory without symlinks, as an fd context."""

    def __init__(self, path: str, uid: int) -> None:
        self.path, self.uid = path, uid

    def __enter__(self) -> int:
        try:
            self.fd: int = safepath.open_path(self.path)
        except OSError as e:
            raise LaunchError(f"{self.path} is unsafe: {e.strerror}") from None
        if os.fstat(self.fd).st_uid != self.uid:
            os.close(self.fd)
            raise LaunchError(f"{self.path} does not belong to uid {self.uid}")
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


async def _supervise(launch: Launch, events: pactors.Inbox, control: socket.socket) -> int:
    """Relays events and signals until the container exits; returns its status.

    The client learns the app's status as soon as the guest reports it; the
    container's own exit (reported by the worker) ends the launch.
    """
    app_status: int | None = None
    status = 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(_relay_control, launch, control)
        async for event in events:
            if not isinstance(event, dict):
                continue
            kind = event.get("event")
            if kind == "display_ready":
                await _notify(control, protocol.display_ready_event())
            elif kind == "exit" and app_status is None:
                app_status = _status(event.get("status"))
                launch.app_exited = True
                await _notify(control, protocol.exit_event(app_status))
            elif "exit" in event:
                if event.get("error"):
                    log(f"container pid {launch.pid}: {event['error']}")
                status = _status(event["exit"])
                break
        tg.cancel_scope.cancel()
    if app_status is None:
        launch.app_exited = True
        await _notify(control, protocol.exit_event(status))
    return app_status if app_status is not None else status


async def _log_output(name: str, fd: int) -> None:
    """Copies what the container writes to ``fd`` into our log, line by line:
    made printable, cut at MAX_OUTPUT_LINE characters and MAX_OUTPUT_LINES
    lines (the rest is read and dropped, so the writer never stalls)."""
    os.set_blocking(fd, False)
    pending = b""
    lines = 0
    try:
        while True:
            # A container that writes without end always has a chunk
            # waiting: let the daemon's other tasks run between chunks.
            await anyio.lowlevel.checkpoint()
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if lines > MAX_OUTPUT_LINES:  # dropped: only read on to the end
                if not chunk:
                    return
                continue
            if chunk:
                *complete, pending = (pending + chunk).split(b"\n")
            else:  # end of file: what is left is the last line, if any
                complete, pending = [pending] if pending else [], b""
            if len(pending) > 4 * MAX_OUTPUT_LINE:  # no newline in sight
                complete.append(pending)
                pending = b""
            for raw in complete:
                lines += 1
                if lines <= MAX_OUTPUT_LINES:
                    log(f"{name}: {printable(raw, MAX_OUTPUT_LINE)}")
                elif lines == MAX_OUTPUT_LINES + 1:
                    log(f"{name}: (further output dropped)")
            if not chunk:
                return
    finally:
        anyio.notify_closing(fd)


def _status(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value <= 255 else 1


async def _notify(control: socket.socket, event: bytes) -> None:
    try:
        await _send(control, event)
    except OSError:
        pass  # the client is gone; its app is being stopped


async def _relay_control(launch: Launch, control: socket.socket) -> None:
    assert launch.container is not None and launch.worker is not None
    while True:
        try:
            data, _ = await _recv(control, 0)
        except protocol.ProtocolError:
            continue
        except OSError:
            data = b""
        if not data:
            break
        try:
            signum = protocol.parse_signal_message(data)
        except protocol.ProtocolError:
            continue
        try:
            await launch.container.send({"signal": signum})
        except pactors.PactorsError:
            return
    # The client is gone: stop the app, and make sure of it.
    await launch.stop()
    await anyio.sleep(STOP_WATCHDOG)
    launch.worker.kill(signal.SIGKILL)
