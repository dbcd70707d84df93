"""Issue 5, guest networking, for real: netns, veth, NAT, DNS, teardown.

Root on the real kernel, real daemon, real client (terminal mode), no mocks.
Traffic goes only to addresses these tests create: the gateways on the
veths of the tests' own guests, 127.0.0.1 inside a container (its own
loopback), and a "remote" network namespace the tests create themselves
(``pktest-remote``), reached through the NAT. Every guest, interface and
namespace here is named ``pkt*`` (netns ``packxd-pkt*-0``), and the
subnets are 10.213.41.0/24 to 10.213.51.0/24; the ``network_sandbox``
fixture checks that they are free first and removes everything at the end,
failing if anything is left behind.

The global ``--teardown-network`` removes every ``packxd-*`` namespace under
/run/netns, also those of other daemons on the machine; so its test runs the
daemon (and the teardown) in a private mount namespace with its own
/run/netns, which also lets it bind a crafted /etc/resolv.conf for the DNS
test without touching the host's.

Validation of the config rules of issue 5 is covered by tests/test_config.py,
one test per rule, each checking the key path with the guest's name:
``test_bad_veth_ifname`` (16 bytes), ``test_veth_ifnames_unique_across_guests``,
``test_bad_veth_address`` (no prefix), ``test_bad_veth_gateway`` (outside the
subnet), ``test_veth_subnets_must_not_overlap``. Here only the daemon's side
is added: it refuses to start on such a config, with that one line.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import (
    PYTHON,
    Daemon,
    User,
    guest,
    make_config,
    public_tempdir,
    start_daemon,
    stop_daemon,
)

from packxd import network

NETNS_DIR = "/run/netns"
REMOTE_NS = "pktest-remote"
REMOTE_HOST_IF = "pkt-rem-h"  # host end of the veth to the remote netns
REMOTE_PEER_IF = "pkt-rem-r"
REMOTE_HOST_ADDR = "10.213.48.1"
REMOTE_ADDR = "10.213.48.2"
REMOTE_NET = "10.213.48.0/24"
HALF_PEER_IF = "pkt-half-p"  # the peer of a veth pair left whole on the host
DUMMY_IF = "pkt-ifb0"  # a host interface that is not a veth (no dummy module here)
IP_FREEBIND = 15


@dataclass(frozen=True)
class Net:
    guest: str
    ifname: str
    address: str  # the guest's, with prefix
    gateway: str

    @property
    def netns(self) -> str:
        return network.netns_name(self.guest)

    @property
    def ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.address).ip)

    @property
    def prefix(self) -> int:
        return ipaddress.IPv4Interface(self.address).network.prefixlen

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Interface(self.address).network

    def veth(self) -> dict[str, Any]:
        return {"ifname": self.ifname, "ipv4": {"address": self.address, "gateway": self.gateway}}


def _net(name: str, ifname: str, third: int) -> Net:
    return Net(name, ifname, f"10.213.{third}.2/24", f"10.213.{third}.1")


A = _net("pkta", "pkt-a", 41)
B = _net("pktb", "pkt-b", 42)
PAR = _net("pktpar", "pkt-par", 43)
RST = _net("pktrst", "pkt-rst", 44)
HALF = _net("pkthalf", "pkt-half", 45)
G1 = _net("pktg1", "pkt-g1", 46)
G2 = _net("pktg2", "pkt-g2", 47)
NAT = _net("pktnat", "pkt-nat", 49)
DUM = _net("pktdum", DUMMY_IF, 50)
TD = _net("pkttd", "pkt-td", 51)
ALL_NETS = (A, B, PAR, RST, HALF, G1, G2, NAT, DUM, TD)
ALL_IFNAMES = (*(n.ifname for n in ALL_NETS), REMOTE_HOST_IF, HALF_PEER_IF)
ALL_SUBNETS = (*(n.subnet for n in ALL_NETS), ipaddress.IPv4Network(REMOTE_NET))
A_RESOLV_CONF = "nameserver 10.213.41.1\nsearch pktest.invalid\noptions ndots:1\n"


# -- host-side helpers ----------------------------------------------------------


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def ip_json(*args: str, netns: str | None = None) -> Any:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    out = sh(*prefix, "-j", *args).stdout
    return json.loads(out) if out.strip() else []


def link_exists(ifname: str) -> bool:
    return sh("ip", "link", "show", "dev", ifname, check=False).returncode == 0


def nft_table_exists() -> bool:
    return sh("nft", "list", "table", "ip", network.NFT_TABLE, check=False).returncode == 0


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def remove_netns(name: str, netns_dir: str = NETNS_DIR) -> None:
    path = os.path.join(netns_dir, name)
    if os.path.lexists(path):
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    # The daemon's record of what it built there goes with it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(network.STAMP_DIR, name))


def remove_guest_network(net: Net) -> None:
    """No netns, no veth for ``net``: the state before its first launch."""
    remove_netns(net.netns)
    for ifname in (net.ifname, HALF_PEER_IF) if net is HALF else (net.ifname,):
        # The namespace goes asynchronously, and the pair with it: wait.
        sh("ip", "link", "del", "dev", ifname, check=False)
        wait_for(lambda: not link_exists(ifname), 10, f"{ifname} to go")  # noqa: B023


def nsid_of(name: str) -> int | None:
    for entry in ip_json("netns", "list"):
        if entry.get("name") == name and "id" in entry:
            return int(entry["id"])
    return None


def netns_inode(name: str) -> str:
    return f"net:[{os.stat(netns_path(name)).st_ino}]"


def ipv4_addrs(ifname: str, netns: str | None = None) -> list[tuple[str, int]]:
    return [(a["local"], a["prefixlen"]) for link in ip_json("addr", "show", "dev", ifname,
                                                             netns=netns)
            for a in link.get("addr_info", []) if a.get("family") == "inet"]


def assert_network_complete(net: Net) -> None:
    """Everything ``network.ensure`` promises, checked from the host."""
    path = netns_path(net.netns)
    assert os.stat(path).st_dev != os.stat(NETNS_DIR).st_dev, f"{path} is not a bound netns"
    links = {link["ifname"]: link for link in ip_json("link", netns=net.netns)}
    assert sorted(links) == ["eth0", "lo"], links
    for link in links.values():
        assert "UP" in link["flags"], link
    assert ipv4_addrs("eth0", net.netns) == [(net.ip, net.prefix)]
    routes = ip_json("-4", "route", "show", "default", netns=net.netns)
    assert [(r.get("gateway"), r.get("dev")) for r in routes] == [(net.gateway, "eth0")]
    [host] = ip_json("-d", "link", "show", "dev", net.ifname)
    assert host["linkinfo"]["info_kind"] == "veth"
    assert "UP" in host["flags"]
    assert host.get("link_netnsid") is not None and host["link_netnsid"] == nsid_of(net.netns)
    assert ipv4_addrs(net.ifname) == [(net.gateway, net.prefix)]
    # Exactly one veth pair into that namespace.
    peers = [link["ifname"] for link in ip_json("-d", "link", "show", "type", "veth")
             if link.get("link_netnsid") == host["link_netnsid"]]
    assert peers == [net.ifname]


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def processes_of(config_path: str) -> list[int]:
    """The daemon and every process forked from it (they share its command line)."""
    return [pid for pid in all_pids()
            if config_path in (args := cmdline(pid)) and "packxd.daemon" in args]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def net_guest(net: Net | None, name: str | None = None, **extra: Any) -> dict[str, Any]:
    g = guest(name or (net.guest if net else "pkt"), **extra)
    g["environment"]["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    if net is not None:
        g["veth"] = net.veth()
    return g


# -- TCP servers ----------------------------------------------------------------


class Server:
    """A TCP server on the host in a thread: replies ``echo:<data>``, records peers.

    With ``barrier``, each connection waits for the others before replying, so
    the replies prove the clients were connected at once.
    """

    def __init__(self, host: str, port: int = 0, *, freebind: bool = False,
                 barrier: threading.Barrier | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if freebind:  # the address appears on the veth with the first launch
            self.sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.barrier = barrier
        self.peers: list[str] = []
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(20)
                data = conn.recv(200)
                if self.barrier is not None:
                    self.barrier.wait(timeout=20)
                conn.sendall(b"echo:" + data)
            except (OSError, threading.BrokenBarrierError) as e:
                self.errors.append(e)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def server(host: str, **kwargs: Any) -> Iterator[Server]:
    s = Server(host, **kwargs)
    try:
        yield s
    finally:
        s.close()


# What the container runs (Debian's python3: /opt is not in the container).
CONNECT = """
import socket, sys
host, port, message = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    s = socket.create_connection((host, port), timeout=10)
except OSError as e:
    print("error", type(e).__name__)
    sys.exit(0)
s.sendall(message.encode())
s.shutdown(socket.SHUT_WR)
data = b""
while chunk := s.recv(200):
    data += chunk
print("reply", data.decode())
"""


def connect_args(host: str, port: int, message: str) -> tuple[str, ...]:
    return ("/usr/bin/python3", "--", "-c", CONNECT, host, str(port), message)


# -- launching --------------------------------------------------------------------


def run_in(d: Daemon, user: User, guest_name: str, *argv: str, profile: str = "p",
           app: str = "net", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``argv`` is APP_BIN [-- ARGS...], run in terminal mode to completion."""
    return d.client(guest_name, app, profile, *argv, user=user, input=b"", timeout=timeout)


def sh_in(d: Daemon, user: User, guest_name: str, script: str, **kwargs: Any
          ) -> subprocess.CompletedProcess[bytes]:
    return run_in(d, user, guest_name, "sh", "--", "-c", script, **kwargs)


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout.decode()


def popen_in(d: Daemon, user: User, guest_name: str, *argv: str, profile: str = "p",
             app: str = "net") -> subprocess.Popen[bytes]:
    return d.client_popen(guest_name, app, profile, *argv, user=user,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 30
           ) -> subprocess.CompletedProcess[bytes]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def teardown_cmd(config: str, *args: str, mount_ns_of: int | None = None
                 ) -> subprocess.CompletedProcess[str]:
    prefix = ["nsenter", f"--mount=/proc/{mount_ns_of}/ns/mnt", "--"] if mount_ns_of else []
    return subprocess.run([*prefix, PYTHON, "-m", "packxd.daemon", "--config", config,
                           "--teardown-network", *args],
                          capture_output=True, text=True, timeout=30, cwd="/")


def marker() -> str:
    return f"{1000 + uuid.uuid4().int % 9000}.{uuid.uuid4().int % 10**6:06d}"


def wait_listening(proc: subprocess.Popen[bytes], sock: str, log: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"the daemon exited: {f.read()}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(sock)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    proc.kill()
    raise RuntimeError("the daemon did not start listening")


def start_private_daemon(config: dict[str, Any], resolv_conf: str) -> Daemon:
    """A daemon in a mount namespace of its own, with an empty /run/netns and
    ``resolv_conf`` over /etc/resolv.conf; nothing else changes."""
    workdir = public_tempdir("packxd-test-netpriv-")
    cfg = os.path.join(workdir, "packxd.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    resolv = os.path.join(workdir, "resolv.conf")
    with open(resolv, "w") as f:
        f.write(resolv_conf)
    sock = os.path.join(workdir, "packxd.socket")
    log = os.path.join(workdir, "daemon.log")
    state = os.path.join(workdir, "state")
    script = ('mount -t tmpfs -o mode=0755 pktest-netns /run/netns && '
              'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"')
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
             resolv, PYTHON, "-m", "packxd.daemon", "--config", cfg, "--socket", sock,
             "--state-dir", state], stdout=logf, stderr=subprocess.STDOUT, cwd="/")
    wait_listening(proc, sock, log)
    return Daemon(proc, sock, state, cfg, log, workdir)


# -- fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def network_sandbox() -> Iterator[None]:
    """Checks our names and subnets are free; removes all we made, even on failure."""
    for n in ALL_NETS:
        if os.path.lexists(netns_path(n.netns)):
            pytest.fail(f"{n.netns} exists already: left over from an earlier run?")
    for ifname in ALL_IFNAMES:
        if link_exists(ifname):
            pytest.fail(f"interface {ifname} exists already")
    for entry in ip_json("-4", "addr"):
        for a in entry.get("addr_info", []):
            used = ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}").network
            clash = [s for s in ALL_SUBNETS if s.overlaps(used)]
            if clash:
                pytest.fail(f"subnet {clash[0]} clashes with {used} on {entry['ifname']}")
    table_before = nft_table_exists()
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        forward_before = f.read().strip()
    yield
    for n in ALL_NETS:
        remove_netns(n.netns)
    remove_netns(REMOTE_NS)
    for ifname in ALL_IFNAMES:
        if link_exists(ifname):
            sh("ip", "link", "del", "dev", ifname, check=False)
    if not table_before and nft_table_exists():
        sh("nft", "delete", "table", "ip", network.NFT_TABLE, check=False)
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write(forward_before + "\n")
    with contextlib.suppress(OSError):
        os.rmdir(network.STAMP_DIR)
    left = [n.netns for n in ALL_NETS if os.path.lexists(netns_path(n.netns))]
    left += [REMOTE_NS] if os.path.lexists(netns_path(REMOTE_NS)) else []
    left += [i for i in ALL_IFNAMES if link_exists(i)]
    left += ["nft table"] if not table_before and nft_table_exists() else []
    assert not left, f"left behind: {left}"


@pytest.fixture(scope="module")
def net_daemon(test_user: User, network_sandbox: None) -> Iterator[Daemon]:
    """The daemon most tests share: a guest per scenario, no NAT."""
    d = start_daemon(make_config(
        pkta=net_guest(A, **{"resolv.conf": A_RESOLV_CONF}),
        pktb=net_guest(B),
        pktpar=net_guest(PAR),
        pkthalf=net_guest(HALF),
        pktdum=net_guest(DUM),
        pkttd=net_guest(TD),
        pktnov=net_guest(None, "pktnov"),
    ))
    yield d
    stop_daemon(d)


@pytest.fixture
def dummy_interface(network_sandbox: None) -> Iterator[str]:
    sh("ip", "link", "add", DUMMY_IF, "type", "ifb")
    try:
        yield DUMMY_IF
    finally:
        if link_exists(DUMMY_IF):
            sh("ip", "link", "del", "dev", DUMMY_IF)
        remove_netns(DUM.netns)


@pytest.fixture
def remote(network_sandbox: None) -> Iterator[str]:
    """The "remote host": a netns of our own, a veth to it, addresses and routes."""
    sh("ip", "netns", "add", REMOTE_NS)
    try:
        sh("ip", "-n", REMOTE_NS, "link", "set", "lo", "up")
        sh("ip", "link", "add", REMOTE_HOST_IF, "type", "veth", "peer", "name", REMOTE_PEER_IF,
           "netns", REMOTE_NS)
        sh("ip", "addr", "add", f"{REMOTE_HOST_ADDR}/24", "dev", REMOTE_HOST_IF)
        sh("ip", "link", "set", REMOTE_HOST_IF, "up")
        sh("ip", "-n", REMOTE_NS, "addr", "add", f"{REMOTE_ADDR}/24", "dev", REMOTE_PEER_IF)
        sh("ip", "-n", REMOTE_NS, "link", "set", REMOTE_PEER_IF, "up")
        # A route back to the guest subnet too: without masquerading the
        # connection would work as well, and the server would see the guest.
        sh("ip", "-n", REMOTE_NS, "route", "add", str(NAT.subnet), "via", REMOTE_HOST_ADDR)
        yield REMOTE_HOST_IF
    finally:
        sh("ip", "netns", "del", REMOTE_NS, check=False)  # takes the veth pair with it
        if link_exists(REMOTE_HOST_IF):
            sh("ip", "link", "del", "dev", REMOTE_HOST_IF, check=False)


# -- validation (the daemon's side; the rules are in test_config.py) ------------


@pytest.mark.parametrize(("guests", "expected"), [
    ({"pkta": A, "pktb": Net("pktb", "pkt-a", "10.213.42.2/24", "10.213.42.1")},
     'guests.pktb.veth.ifname: "pkt-a" is also the veth of guest "pkta"'),
    ({"pkta": A, "pktb": Net("pktb", "pkt-b", "10.213.41.3/25", "10.213.41.1")},
     'guests.pktb.veth.ipv4.address: subnet 10.213.41.0/25 of guest "pktb" overlaps subnet '
     '10.213.41.0/24 of guest "pkta"'),
    ({"pkta": Net("pkta", "pkt-a", "10.213.41.2", "10.213.41.1")},
     'guests.pkta.veth.ipv4.address: "10.213.41.2" has no prefix length'),
    ({"pkta": Net("pkta", "pkt-a", "10.213.41.2/24", "10.213.42.1")},
     "guests.pkta.veth.ipv4.gateway: 10.213.42.1 is not in the guest's subnet 10.213.41.0/24"),
    ({"pkta": Net("pkta", "pkt-a-too-long-1", "10.213.41.2/24", "10.213.41.1")},
     'guests.pkta.veth.ifname: "pkt-a-too-long-1" is not a valid interface name: '
     "use 1 to 15 bytes"),
], ids=["ifname-unique", "subnets-overlap", "no-prefix", "gateway-outside", "ifname-16"])
def test_daemon_refuses_bad_network_config(guests: dict[str, Net], expected: str,
                                           tmp_path: Any) -> None:
    cfg = tmp_path / "packxd.json"
    cfg.write_text(json.dumps({"guests": {name: net_guest(n, name)
                                          for name, n in guests.items()}}))
    result = subprocess.run([PYTHON, "-m", "packxd.daemon", "--config", str(cfg), "--socket",
                             str(tmp_path / "sock"), "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"packxd: {cfg}: {expected}"), result.stderr
    assert not (tmp_path / "sock").exists()


def test_teardown_refuses_unknown_guest(net_daemon: Daemon) -> None:
    result = teardown_cmd(net_daemon.config, "pktnosuch")
    assert result.returncode == 1
    assert result.stderr == ('packxd: --teardown-network: guest "pktnosuch" is not in the '
                             "config\n")


# -- DNS: the host's nameservers ----------------------------------------------------


def test_host_nameservers_skip_loopback(tmp_path: Any) -> None:
    """``network.host_nameservers`` on a crafted /etc/resolv.conf, bound over the
    host's in a private mount namespace (the host's file stays untouched)."""
    crafted = tmp_path / "resolv.conf"
    crafted.write_text(
        "# a comment\nnameserver 127.0.0.53\nnameserver 10.213.41.53\nsearch example.invalid\n"
        "nameserver ::1\n  nameserver   10.213.42.53  \nnameserver not-an-address\n"
        "nameserver 127.1.2.3\nnameserver fd00:213::53\nnameserver\noptions edns0\n")
    code = "from packxd import network; import json; print(json.dumps(network.host_nameservers()))"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"', "sh", str(crafted),
         PYTHON, "-c", code], capture_output=True, text=True, timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    usable, skipped = json.loads(result.stdout)
    assert usable == ["10.213.41.53", "10.213.42.53", "fd00:213::53"]
    assert skipped == ["127.0.0.53", "::1", "127.1.2.3"]


# -- from inside a container -------------------------------------------------------


def test_container_sees_its_network(net_daemon: Daemon, test_user: User) -> None:
    with server(A.gateway, freebind=True) as echo, server("127.0.0.1") as local:
        script = (f"ip -br -4 addr show dev eth0; ip -o link show dev eth0; "
                  f"ip -4 route show default; readlink /proc/self/ns/net; "
                  f"python3 -c '{CONNECT}' {A.gateway} {echo.port} to-gateway; "
                  f"python3 -c '{CONNECT}' 127.0.0.1 {local.port} to-loopback; "
                  f"python3 -c '{CONNECT}' {A.gateway} {local.port} to-gateway-port-of-lo; "
                  "echo ---; cat /etc/resolv.conf")
        out = ok(sh_in(net_daemon, test_user, A.guest, script))
        lines, resolv = out.split("---\n", 1)
        assert len(lines.splitlines()) == 7, out
        addr, link, route, ns, to_gw, to_lo, to_gw_lo = lines.splitlines()
        assert addr.split()[0].startswith("eth0") and addr.split()[2:] == [A.address]
        assert ",UP," in link.split()[2] and "state UP" in link
        assert route.split()[:5] == ["default", "via", A.gateway, "dev", "eth0"]
        assert ns == netns_inode(A.netns)
        assert to_gw == "reply echo:to-gateway"
        assert echo.peers == [A.ip]  # straight over the veth, not masqueraded
        # 127.0.0.1 in the container is its own loopback: the host's server is
        # not there, nor reachable on the gateway address.
        assert to_lo == "error ConnectionRefusedError"
        assert to_gw_lo == "error ConnectionRefusedError"
        assert local.peers == []
        assert echo.errors == []
    # The configured resolv.conf, exactly.
    assert resolv == A_RESOLV_CONF
    assert_network_complete(A)


def test_guest_without_veth_has_only_lo(net_daemon: Daemon, test_user: User) -> None:
    out = ok(sh_in(net_daemon, test_user, "pktnov",
                   "ip -o link; ip -br -4 addr; readlink /proc/self/ns/net"))
    link, addr, ns = out.splitlines()
    assert link.split()[1] == "lo:" and ",UP," in link.split()[2]  # lo only, and up
    assert addr.split()[0] == "lo" and addr.split()[2] == "127.0.0.1/8"
    assert ns != f"net:[{os.stat('/proc/self/ns/net').st_ino}]"


def test_two_guests_at_once(net_daemon: Daemon, test_user: User) -> None:
    barrier = threading.Barrier(2)  # neither server replies before both are connected
    with server(A.gateway, freebind=True, barrier=barrier) as sa, \
            server(B.gateway, freebind=True, barrier=barrier) as sb:
        procs = {n: popen_in(net_daemon, test_user, n.guest, "sh", "--", "-c",
                             f"ip -br -4 addr show dev eth0; readlink /proc/self/ns/net; "
                             f"python3 -c '{CONNECT}' {n.gateway} {s.port} {n.guest}",
                             profile=f"both-{n.guest}")
                 for n, s in ((A, sa), (B, sb))}
        results = {n: finish(p) for n, p in procs.items()}
        for n, s in ((A, sa), (B, sb)):
            addr, ns, reply = ok(results[n]).splitlines()
            assert addr.split()[2:] == [n.address]
            assert ns == netns_inode(n.netns)
            assert reply == f"reply echo:{n.guest}"
            assert s.peers == [n.ip] and s.errors == []
    assert netns_inode(A.netns) != netns_inode(B.netns)
    assert_network_complete(A)
    assert_network_complete(B)


def test_parallel_first_launches(net_daemon: Daemon, test_user: User) -> None:
    remove_guest_network(PAR)
    procs = [popen_in(net_daemon, test_user, PAR.guest, "sh", "--", "-c",
                      "readlink /proc/self/ns/net; ip -br -4 addr show dev eth0",
                      profile=f"p{i}") for i in range(8)]
    results = [finish(p, timeout=60) for p in procs]
    for r in results:
        ok(r)
    inodes = {r.stdout.decode().splitlines()[0] for r in results}
    addrs = {tuple(r.stdout.decode().splitlines()[1].split()[2:]) for r in results}
    assert inodes == {netns_inode(PAR.netns)}
    assert addrs == {(PAR.address,)}
    assert [n for n in os.listdir(NETNS_DIR) if n.startswith(f"packxd-{PAR.guest}")] == \
        [PAR.netns]
    assert_network_complete(PAR)  # one veth pair into it, one address each end


# -- a half-built network is repaired ------------------------------------------------


def _stale_file() -> None:
    # Killed between creating the mount point and binding the namespace.
    os.close(os.open(netns_path(HALF.netns), os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))


def _netns_only() -> None:
    sh("ip", "netns", "add", HALF.netns)


def _host_veth_without_peer() -> None:
    # A host end whose peer never reached the namespace.
    sh("ip", "netns", "add", HALF.netns)
    sh("ip", "link", "add", HALF.ifname, "type", "veth", "peer", "name", HALF_PEER_IF)


def _peer_without_host_veth() -> None:
    # eth0 in the namespace, its host end gone (paired with a stray interface).
    sh("ip", "netns", "add", HALF.netns)
    sh("ip", "link", "add", HALF_PEER_IF, "type", "veth", "peer", "name", "eth0",
       "netns", HALF.netns)


def _veth_unconfigured() -> None:
    # The pair exists, nothing else: no lo, no addresses, no route, all down.
    sh("ip", "netns", "add", HALF.netns)
    sh("ip", "link", "add", HALF.ifname, "type", "veth", "peer", "name", "eth0",
       "netns", HALF.netns)


def _stale_addresses() -> None:
    # The pair as an older config left it: another guest address and gateway
    # (the namespace persists across daemon runs; the config may change).
    _veth_unconfigured()
    sh("ip", "-n", HALF.netns, "addr", "add", "10.213.45.77/24", "dev", "eth0")
    sh("ip", "-n", HALF.netns, "link", "set", "eth0", "up")
    sh("ip", "-n", HALF.netns, "route", "add", "default", "via", "10.213.45.99")
    sh("ip", "addr", "add", "10.213.45.99/24", "dev", HALF.ifname)


def _stale_addresses_and_stamp() -> None:
    # As above, complete for the older config, whose launch left its stamp:
    # the changed config must still be applied.
    _stale_addresses()
    sh("ip", "link", "set", HALF.ifname, "up")
    os.makedirs(network.STAMP_DIR, exist_ok=True)
    with open(os.path.join(network.STAMP_DIR, HALF.netns), "w") as f:
        f.write(f"{HALF.ifname} 10.213.45.77/24 10.213.45.99\n")


@pytest.mark.parametrize("make_half_state", [
    _stale_file, _netns_only, _host_veth_without_peer, _peer_without_host_veth,
    _veth_unconfigured, _stale_addresses, _stale_addresses_and_stamp,
], ids=lambda f: f.__name__.strip("_"))
def test_half_state_is_repaired(net_daemon: Daemon, test_user: User,
                                make_half_state: Callable[[], None]) -> None:
    remove_guest_network(HALF)
    make_half_state()
    with server(HALF.gateway, freebind=True) as echo:
        out = ok(run_in(net_daemon, test_user, HALF.guest,
                        *connect_args(HALF.gateway, echo.port, "repaired")))
        assert out == "reply echo:repaired\n"
        assert echo.peers == [HALF.ip]
    assert not link_exists(HALF_PEER_IF)
    assert_network_complete(HALF)


def test_restart_after_sigkill_mid_creation(test_user: User, network_sandbox: None) -> None:
    """SIGKILL the daemon and all its processes (as a cgroup kill would) as soon
    as the namespace's mount point appears; a new daemon's launch then works."""
    remove_guest_network(RST)
    config = make_config(pktrst=net_guest(RST))
    first = start_daemon(config)
    try:
        client = popen_in(first, test_user, RST.guest, "true")
        deadline = time.monotonic() + 20
        while not os.path.lexists(netns_path(RST.netns)):  # no sleep: catch it early
            assert time.monotonic() < deadline, "the daemon did not create the netns"
        for pid in processes_of(first.config):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        killed = finish(client)
        assert killed.returncode != 0
        wait_for(lambda: not processes_of(first.config), 10, "the killed daemon's processes")
    finally:
        stop_daemon(first)
    # Killed halfway indeed: a mount point or a namespace, but no veth pair.
    assert os.path.lexists(netns_path(RST.netns))
    assert not link_exists(RST.ifname)
    second = start_daemon(config)
    try:
        with server(RST.gateway, freebind=True) as echo:
            out = ok(run_in(second, test_user, RST.guest,
                            *connect_args(RST.gateway, echo.port, "after-restart")))
            assert out == "reply echo:after-restart\n"
        assert_network_complete(RST)
        # And a warm launch reuses it.
        inode = netns_inode(RST.netns)
        assert ok(sh_in(second, test_user, RST.guest, "readlink /proc/self/ns/net")) == \
            inode + "\n"
    finally:
        stop_daemon(second)
        remove_guest_network(RST)


def test_host_interface_that_is_not_a_veth_is_left_alone(
        net_daemon: Daemon, test_user: User, dummy_interface: str) -> None:
    """A guest ifname naming an existing host interface of another kind: the
    launch fails, and the interface is not deleted."""
    result = sh_in(net_daemon, test_user, DUM.guest, "true")
    assert result.returncode != 0
    assert f"{DUMMY_IF} exists on the host and is not a veth" in result.stderr.decode()
    [link] = ip_json("-d", "link", "show", "dev", DUMMY_IF)
    assert link["linkinfo"]["info_kind"] == "ifb"
    assert ipv4_addrs(DUMMY_IF) == []


# -- NAT ---------------------------------------------------------------------------


REMOTE_SERVER = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
s.settimeout(30)
print(s.getsockname()[1], flush=True)
conn, peer = s.accept()
conn.settimeout(10)
data = conn.recv(200)
conn.sendall(b"remote:" + data)
conn.close()
print(peer[0], flush=True)
"""


def test_nat_masquerades_to_the_outbound_interface(test_user: User, remote: str) -> None:
    config = make_config(pktnat=net_guest(NAT))
    config["nat"] = {"outbound_interface": remote}
    d = start_daemon(config)
    listener = subprocess.Popen(["ip", "netns", "exec", REMOTE_NS, PYTHON, "-c", REMOTE_SERVER,
                                 REMOTE_ADDR], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read().strip() == "1"
        rules = [item["rule"] for item in
                 json.loads(sh("nft", "-j", "list", "table", "ip", "packxd").stdout)["nftables"]
                 if "rule" in item]
        assert len(rules) == 1 and rules[0]["chain"] == "postrouting"
        expr = json.dumps(rules[0]["expr"])
        assert '"addr": "10.213.49.0", "len": 24' in expr and f'"{remote}"' in expr
        assert "masquerade" in expr
        port = listener.stdout.readline().strip() if listener.stdout else ""
        assert port.isdigit(), listener.stderr.read() if listener.stderr else ""
        out = ok(run_in(d, test_user, NAT.guest, *connect_args(REMOTE_ADDR, int(port), "nat")))
        assert out == "reply remote:nat\n"
        stdout, stderr = listener.communicate(timeout=30)
        assert listener.returncode == 0, stderr
        # The remote saw the host's address on its link, not the guest's.
        assert stdout.strip() == REMOTE_HOST_ADDR
        assert_network_complete(NAT)
        # ensure_nat is idempotent: again, and the table holds the same one rule.
        network.ensure_nat(remote, [NAT.subnet])
        network.ensure_nat(remote, [NAT.subnet])
        again = [item["rule"] for item in
                 json.loads(sh("nft", "-j", "list", "table", "ip", "packxd").stdout)["nftables"]
                 if "rule" in item]
        assert [r["expr"] for r in again] == [rules[0]["expr"]]
    finally:
        if listener.poll() is None:
            listener.kill()
        listener.communicate()
        stop_daemon(d)
        if nft_table_exists():
            sh("nft", "delete", "table", "ip", network.NFT_TABLE)
        remove_guest_network(NAT)


# -- teardown ----------------------------------------------------------------------


def test_teardown_one_guest(net_daemon: Daemon, test_user: User) -> None:
    ok(sh_in(net_daemon, test_user, TD.guest, "true"))
    ok(sh_in(net_daemon, test_user, A.guest, "true"))
    assert_network_complete(TD)
    result = teardown_cmd(net_daemon.config, TD.guest)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"packxd: removed veth {TD.ifname}",
                                          f"packxd: removed netns {TD.netns}"]
    assert not os.path.lexists(netns_path(TD.netns))
    assert not link_exists(TD.ifname)
    assert_network_complete(A)  # the other guest's is untouched
    # Nothing left to remove: it says nothing and succeeds.
    again = teardown_cmd(net_daemon.config, TD.guest)
    assert (again.returncode, again.stderr) == (0, "")
    # The next launch builds it again.
    ok(sh_in(net_daemon, test_user, TD.guest, "true"))
    assert_network_complete(TD)


def test_teardown_refuses_while_a_container_runs(net_daemon: Daemon, test_user: User) -> None:
    argv = ["sleep", marker()]
    client = popen_in(net_daemon, test_user, TD.guest, *argv, profile="busy")
    try:
        [pid] = wait_for(lambda: [p for p in all_pids() if cmdline(p) == argv], 20,
                         "the app to start")
        refused = teardown_cmd(net_daemon.config, TD.guest)
        assert refused.returncode == 1
        lines = refused.stderr.splitlines()
        assert len(lines) == 1 and "--force" in lines[0], refused.stderr
        assert f"{TD.netns}: pids " in lines[0]
        assert str(pid) in lines[0].split(f"{TD.netns}: pids ", 1)[1].split(")")[0].split(", ")
        assert_network_complete(TD)
        forced = teardown_cmd(net_daemon.config, TD.guest, "--force")
        assert forced.returncode == 0, forced.stderr
        assert not os.path.lexists(netns_path(TD.netns))
        assert not link_exists(TD.ifname)
    finally:
        client.kill()
        client.communicate()
        for p in all_pids():
            if cmdline(p) == argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
    wait_for(lambda: TD.guest not in ok(net_daemon.client("list", user=test_user)), 20,
             "the launch to end")
    ok(sh_in(net_daemon, test_user, TD.guest, "true"))
    assert_network_complete(TD)


# -- a daemon in a mount namespace of its own: host nameservers, global teardown ----


@pytest.fixture(scope="module")
def private_daemon(test_user: User, network_sandbox: None) -> Iterator[Daemon]:
    config = make_config(pktg1=net_guest(G1), pktg2=net_guest(G2))
    config["nat"] = {"outbound_interface": "pkt-noexist"}  # only the table matters here
    d = start_private_daemon(config, "nameserver 127.0.0.53\nnameserver 10.213.46.53\n"
                                     "options edns0\nnameserver ::1\nnameserver 10.213.47.53\n")
    yield d
    stop_daemon(d)  # its mount namespace goes, and with it its netns and veths
    wait_for(lambda: not any(link_exists(n.ifname) for n in (G1, G2)), 10,
             "the private daemon's veths to go")
    if nft_table_exists():
        sh("nft", "delete", "table", "ip", network.NFT_TABLE, check=False)


def private_netns(d: Daemon) -> list[str]:
    return sorted(os.listdir(f"/proc/{d.proc.pid}/root{NETNS_DIR}"))


def test_dns_copies_host_nameservers(private_daemon: Daemon, test_user: User) -> None:
    out = ok(sh_in(private_daemon, test_user, G1.guest, "cat /etc/resolv.conf"))
    assert out == "nameserver 10.213.46.53\nnameserver 10.213.47.53\n"
    log = private_daemon.read_log()
    assert (f"guest {G1.guest}: not copying loopback nameservers 127.0.0.53, ::1 from the "
            "host's /etc/resolv.conf") in log


def test_teardown_everything(private_daemon: Daemon, test_user: User) -> None:
    for n in (G1, G2):
        ok(sh_in(private_daemon, test_user, n.guest, "true"))
        assert link_exists(n.ifname)
    assert private_netns(private_daemon) == [G1.netns, G2.netns]
    assert nft_table_exists()
    result = teardown_cmd(private_daemon.config, mount_ns_of=private_daemon.proc.pid)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.splitlines()) == sorted([
        f"packxd: removed veth {G1.ifname}", f"packxd: removed veth {G2.ifname}",
        f"packxd: removed netns {G1.netns}", f"packxd: removed netns {G2.netns}",
        f"packxd: removed nft table ip {network.NFT_TABLE}"])
    assert private_netns(private_daemon) == []
    assert not link_exists(G1.ifname) and not link_exists(G2.ifname)
    assert not nft_table_exists()
