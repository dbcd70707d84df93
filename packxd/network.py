"""Guest networking, all of it root-only: netns, veth, NAT, through netlink.

Each guest with ``veth`` has a persistent network namespace
``packxd-<guest>-0`` bound under /run/netns (so ``ip netns`` sees it), with
``lo`` and ``eth0`` up, the guest address on ``eth0`` and a default route via
the gateway; the host end of the veth pair carries the gateway address with
the guest's prefix. ``ensure`` checks every piece and creates or repairs
what is missing, so a state half-built by a killed daemon is rebuilt on the
next launch. Creation and teardown hold an flock, so parallel launches (and
a teardown run from the command line) never interleave.

The manual equivalent of ``ensure`` for a guest "web" with address
192.168.12.104/24, gateway 192.168.12.1 and host ifname veth-web::

    ip netns add packxd-web-0
    ip -n packxd-web-0 link set lo up
    ip link add veth-web type veth peer name eth0 netns packxd-web-0
    ip -n packxd-web-0 addr add 192.168.12.104/24 dev eth0
    ip -n packxd-web-0 link set eth0 up
    ip -n packxd-web-0 route add default via 192.168.12.1
    ip addr add 192.168.12.1/24 dev veth-web
    ip link set veth-web up

and of ``ensure_nat`` for outbound interface eth0::

    sysctl -w net.ipv4.ip_forward=1
    nft add table ip packxd
    nft add chain ip packxd postrouting '{ type nat hook postrouting priority srcnat; }'
    nft add rule ip packxd postrouting ip saddr 192.168.12.0/24 oifname eth0 masquerade

pyroute2 is used synchronously: call these from a thread or a process with
no running event loop (see python-building-blocks.md, section 2).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyroute2 import IPRoute

from .config import Veth

NETNS_DIR = "/run/netns"
NETNS_PREFIX = "packxd-"
STAMP_DIR = "/run/packxd-network"  # what ensure() last built, per namespace
NFT_TABLE = "packxd"
GUEST_IFNAME = "eth0"


class NetworkError(Exception):
    """Setting up or tearing down guest networking failed; ``str()`` says how."""


def netns_name(guest: str) -> str:
    return f"{NETNS_PREFIX}{guest}-0"


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Serializes network changes across processes: an flock on /run/netns."""
    os.makedirs(NETNS_DIR, mode=0o755, exist_ok=True)
    fd = os.open(NETNS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _netns_usable(name: str) -> bool:
    """The bind mount exists and is a network namespace (not a stale file)."""
    try:
        fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # A leftover plain file (daemon killed between create and mount)
        # lives on the /run filesystem, not on nsfs.
        return os.fstat(fd).st_dev != os.stat(NETNS_DIR).st_dev
    finally:
        os.close(fd)


def _link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _set_addr(ipr: IPRoute, index: int, address: str, prefixlen: int) -> None:
    """Makes ``address/prefixlen`` the only IPv4 address of the link: stale ones
    (the config's address changed since the namespace was made) go."""
    from pyroute2 import NetlinkError

    def ours(a: Any) -> bool:
        return bool(a.get_attr("IFA_ADDRESS") == address and a["prefixlen"] == prefixlen)

    for a in ipr.get_addr(index=index, family=2):
        if not ours(a):
            try:
                ipr.addr("del", index=index, address=a.get_attr("IFA_ADDRESS"),
                         prefixlen=a["prefixlen"])
            except NetlinkError as e:
                # A secondary address goes with its primary.
                if e.code != errno.EADDRNOTAVAIL:
                    raise
    # Asked again: ours may have been a secondary of a stale primary.
    if not any(ours(a) for a in ipr.get_addr(index=index, family=2)):
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)


def ensure(guest: str, veth: Veth) -> None:
    """Creates or repairs the guest's namespace and veth pair; idempotent.

    Imports pyroute2 (70 ms) here, not at the top: only the netns worker and
    ``--teardown-network`` need it, and every actor the daemon spawns is
    forked from an image that would otherwise carry it (10 MiB).
    """
    from pyroute2 import IPRoute, netns

    name = netns_name(guest)
    address = str(veth.address.ip)
    prefix = veth.address.network.prefixlen
    gateway = str(veth.gateway)
    with locked():
        _remove_stamp(guest)  # until this ensure has finished
        try:
            if not _netns_usable(name):
                with contextlib.suppress(OSError):
                    netns.remove(name)
                netns.create(name)
            with IPRoute() as host, IPRoute(netns=name) as ns:
                host_index = _link_index(host, veth.ifname)
                peer_index = _link_index(ns, GUEST_IFNAME)
                # IFLA_INFO_KIND is nested in IFLA_LINKINFO; a physical NIC has
                # none: anything but a veth is not ours to delete.
                if host_index is not None and host.get_links(host_index)[0].get_nested(
                        "IFLA_LINKINFO", "IFLA_INFO_KIND") != "veth":
                    raise NetworkError(f"{veth.ifname} exists on the host and is not a veth")
                if host_index is None or peer_index is None:
                    # Half a pair (or none): rebuild it whole.
                    if host_index is not None:
                        host.link("del", index=host_index)
                    if peer_index is not None:
                        ns.link("del", index=peer_index)
                    host.link("add", ifname=veth.ifname, kind="veth",
                              peer={"ifname": GUEST_IFNAME, "net_ns_fd": name})
                    host_index = _link_index(host, veth.ifname)
                    peer_index = _link_index(ns, GUEST_IFNAME)
                    assert host_index is not None and peer_index is not None
                lo = _link_index(ns, "lo")
                assert lo is not None
                ns.link("set", index=lo, state="up")
                _set_addr(ns, peer_index, address, prefix)
                ns.link("set", index=peer_index, state="up")
                if not any(r.get_attr("RTA_GATEWAY") == gateway and r["dst_len"] == 0
                           for r in ns.get_routes(family=2, table=254)):
                    ns.route("replace", dst="0.0.0.0/0", gateway=gateway)
                _set_addr(host, host_index, gateway, prefix)
                host.link("set", index=host_index, state="up")
            os.makedirs(STAMP_DIR, mode=0o700, exist_ok=True)
            with open(_stamp_path(guest), "w") as f:
                f.write(_stamp(veth))
        except NetworkError:
            raise
        except Exception as e:
            raise NetworkError(f"setting up the network of guest \"{guest}\" failed: "
                               f"{e}") from e


def _remove_stamp(guest: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_stamp_path(guest))


def _stamp(veth: Veth) -> str:
    return f"{veth.ifname} {veth.address} {veth.gateway}\n"


def _stamp_path(guest: str) -> str:
    return os.path.join(STAMP_DIR, netns_name(guest))


def looks_complete(guest: str, veth: Veth) -> bool:
    """A cheap check, without netlink, that ``ensure`` has nothing left to do.

    ``ensure`` leaves a stamp of the configuration it built once it is done;
    with the stamp matching, the namespace mounted and the veth up at both
    ends (operstate "up"), a launch reuses the network as it is. Anything
    else, a changed config included, goes to ``ensure``.
    """
    if not _netns_usable(netns_name(guest)):
        return False
    try:
        with open(_stamp_path(guest)) as f:
            if f.read() != _stamp(veth):
                return False
        with open(f"/sys/class/net/{veth.ifname}/operstate") as f:
            return f.read().strip() == "up"
    except OSError:
        return False


def open_netns(guest: str) -> int:
    """An fd of the guest's network namespace, for setns."""
    path = os.path.join(NETNS_DIR, netns_name(guest))
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)


def processes_in(name: str) -> list[int]:
    """Pids of the processes whose network namespace is ``name``."""
    try:
        target = os.stat(os.path.join(NETNS_DIR, name))
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                pids.append(int(entry))
    return pids


def packxd_namespaces() -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(NETNS_PREFIX))
    except FileNotFoundError:
        return []


def teardown(namespaces: Iterable[str], ifnames: Iterable[str], *, nat: bool) -> list[str]:
    """Removes the named namespaces, host veths and (with ``nat``) the nft table."""
    from pyroute2 import IPRoute, netns

    removed = []
    with locked():
        with IPRoute() as host:
            for ifname in ifnames:
                index = _link_index(host, ifname)
                if index is not None:
                    host.link("del", index=index)
                    removed.append(f"veth {ifname}")
        for name in namespaces:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(STAMP_DIR, name))
            if os.path.lexists(os.path.join(NETNS_DIR, name)):
                netns.remove(name)
                removed.append(f"netns {name}")
        with contextlib.suppress(OSError):
            os.rmdir(STAMP_DIR)  # once empty
        if nat and _nft(["list", "table", "ip", NFT_TABLE], check=False) == 0:
            _nft(["delete", "table", "ip", NFT_TABLE])
            removed.append(f"nft table ip {NFT_TABLE}")
    return removed


def _nft(args: list[str], *, check: bool = True, stdin: str | None = None) -> int:
    result = subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetworkError(f"nft {' '.join(args)} failed: {result.stderr.strip()}")
    return result.returncode


def ensure_nat(outbound_interface: str, subnets: Iterable[ipaddress.IPv4Network]) -> None:
    """Forwarding on, and packxd's own nft table masquerading each guest subnet.

    The ruleset goes to nft as JSON, as data; the table is replaced whole in
    one transaction, so running this again changes nothing.
    """
    table = {"family": "ip", "name": NFT_TABLE}
    chain = {"family": "ip", "table": NFT_TABLE, "name": "postrouting", "type": "nat",
             "hook": "postrouting", "prio": 100, "policy": "accept"}
    commands: list[dict[str, object]] = [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        {"add": {"chain": chain}},
    ]
    for subnet in subnets:
        commands.append({"add": {"rule": {
            "family": "ip", "table": NFT_TABLE, "chain": "postrouting",
            "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                           "right": {"prefix": {"addr": str(subnet.network_address),
                                                "len": subnet.prefixlen}}}},
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                           "right": outbound_interface}},
                {"masquerade": None},
            ]}}})
    with locked():
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")
        _nft(["-j", "-f", "-"], stdin=json.dumps({"nftables": commands}))


def host_nameservers() -> tuple[list[str], list[str]]:
    """The host's nameservers from /etc/resolv.conf: (usable, skipped loopback)."""
    usable: list[str] = []
    skipped: list[str] = []
    try:
        with open("/etc/resolv.conf") as f:
            lines = f.read(65536).splitlines()
    except OSError as e:
        if e.errno == errno.ENOENT:
            return [], []
        raise
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            (skipped if addr.is_loopback else usable).append(str(addr))
    return usable, skipped
