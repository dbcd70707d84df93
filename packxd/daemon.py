"""``python -m packxd.daemon``: the root daemon.

It checks everything it can before it serves (root, the config, the
socket, the state directory) and refuses to start with one line naming the
fault. Then it runs on pactors: this process accepts connections on a
world-connectable SOCK_SEQPACKET socket and spawns a handler actor for each.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import signal
import socket
import sys

import anyio
import anyio.lowlevel

import pactors

from . import launcher, network, protocol

# Imported before the supervisor forks, so every actor starts warm, and the
# container's guest actor runs after pivot_root without importing anything.
from .actors import container_worker as _container_worker  # noqa: F401
from .actors import guest as _guest  # noqa: F401
from .actors import netns as _netns  # noqa: F401
from .actors import userrundir as _userrundir  # noqa: F401
from .actors.handler import Daemon, handler, log
from .config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from .launcher import close_untrusted

DEFAULT_STATE_DIR = "/var/lib/packxd"


class StartupError(Exception):
    """The daemon cannot start; ``str()`` is the one line to print."""


def bind_socket(path: str) -> socket.socket:
    """Binds the listening socket, replacing a stale one, refusing a live one."""
    if os.path.lexists(path):
        # connect() to a file that is not a socket fails with ECONNREFUSED,
        # as for a stale socket: check first, or we would delete it.
        if not _is_socket(path):
            raise StartupError(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens
        except OSError as e:
            if e.errno == errno.ENOTSOCK or not _is_socket(path):
                raise StartupError(f"{path}: exists and is not a socket") from None
            if e.errno == errno.EPROTOTYPE:
                raise StartupError(f"{path}: another kind of socket is in use there") from None
            raise StartupError(f"{path}: {e.strerror}") from None
        else:
            raise StartupError(f"{path}: a packxd daemon is already running") from None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # world-connectable: SO_PEERCRED decides
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise StartupError(f"{path}: cannot listen: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def _is_socket(path: str) -> bool:
    import stat
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


async def serve(listener: socket.socket, daemon: Daemon) -> None:
    log(f"listening on {listener.getsockname()} for uids "
        f"{sorted(daemon.config.permit_uids) or '(root only)'}")
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:
            async def on_signal() -> None:
                async for signum in signals:
                    log(f"got signal {signum}: stopping every container and exiting")
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(on_signal)
            entry = handler(daemon)
            while True:
                # Let the handlers run between connections: in a flood one is
                # always waiting, and the clients already accepted come first.
                await anyio.lowlevel.checkpoint()
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    await anyio.wait_readable(listener)
                    continue
                except OSError as e:  # EMFILE and friends: do not spin, do not die
                    log(f"accept failed: {e.strerror}")
                    await anyio.sleep(0.1)
                    continue
                try:
                    actor = await pactors.spawn_actor(entry)
                    await actor.send({"conn": pactors.Fd(conn)})
                    actor.close()  # its one message is queued: free the channel now
                except (OSError, pactors.PactorsError) as e:
                    # Out of descriptors, say: drop this client, keep serving.
                    log(f"cannot serve a new connection: {e}")
                    await anyio.sleep(0.05)
                finally:
                    await close_untrusted([conn.detach()])


def teardown_network(config: Config, guest: str | None, *, force: bool) -> int:
    """``--teardown-network``: removes packxd's netns, veth and nft table."""
    if guest is not None and guest not in config.guests:
        raise StartupError(f"--teardown-network: guest \"{guest}\" is not in the config")
    names = [network.netns_name(guest)] if guest else network.packxd_namespaces()
    ifnames = [g.veth.ifname for g in config.guests.values()
               if g.veth is not None and (guest is None or g.name == guest)]
    busy = {name: pids for name in names if (pids := network.processes_in(name))}
    if busy and not force:
        listing = "; ".join(f"{name}: pids {', '.join(map(str, pids))}"
                            for name, pids in busy.items())
        raise StartupError(f"--teardown-network: containers still run ({listing}); stop them "
                           "or pass --force")
    try:
        removed = network.teardown(names, ifnames, nat=guest is None)
    except (OSError, network.NetworkError) as e:
        raise StartupError(f"--teardown-network: {e}") from None
    for item in removed:
        print(f"packxd: removed {item}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m packxd.daemon",
                                     description="packxd's root daemon")
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    parser.add_argument("--socket", default=protocol.DEFAULT_SOCKET)
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    parser.add_argument("--teardown-network", nargs="?", const="", metavar="GUEST",
                        help="remove packxd's network namespaces, veths and nft table "
                        "(of one guest only, when named) and exit")
    parser.add_argument("--force", action="store_true",
                        help="with --teardown-network: even while containers run")
    args = parser.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise StartupError("must run as root")
        try:
            config = load_config(args.config)
        except ConfigError as e:
            raise StartupError(str(e)) from None
        if args.teardown_network is not None:
            return teardown_network(config, args.teardown_network or None, force=args.force)
        try:
            launcher.prepare_state_dir(args.state_dir)
        except (OSError, launcher.LaunchError) as e:
            raise StartupError(f"--state-dir {args.state_dir}: {e}") from None
        if config.nat is not None:
            subnets = [g.veth.address.network for g in config.guests.values() if g.veth]
            try:
                network.ensure_nat(config.nat.outbound_interface, subnets)
            except (OSError, network.NetworkError) as e:
                raise StartupError(f"nat: {e}") from None
        listener = bind_socket(args.socket)
    except StartupError as e:
        print(f"packxd: {e}", file=sys.stderr)
        return 1
    # Each client holds a few descriptors while it is served: room for many.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = Daemon(config=config, config_path=args.config, state_dir=args.state_dir)
    try:
        pactors.run(serve, listener, daemon)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            os.unlink(args.socket)
        except OSError:
            pass
        listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
