"""The daemon's configuration file (``/etc/packxd.json``): parsing and validation.

Every error is a :class:`ConfigError` whose text is one line naming the file,
the key path and the reason, e.g.
``/etc/packxd.json: guests.web.hostname: "-bad" is not a valid RFC 1123 host name``.
Standard library only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import posixpath
import pwd
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from ._text import kind as _kind
from ._text import show

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Bind",
    "Config",
    "ConfigError",
    "Display",
    "Guest",
    "Nat",
    "Veth",
    "hostname_problem",
    "ifname_problem",
    "load_config",
    "parse_config",
]

DEFAULT_CONFIG_PATH = "/etc/packxd.json"

# Anything bigger is not a hand-written config; refuse rather than read it all.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_RESOLV_CONF_BYTES = 64 * 1024
# sethostname(2) fails with EINVAL beyond __NEW_UTS_LEN (64), whatever RFC 1123 allows.
MAX_HOSTNAME_CHARS = 64
DEFAULT_USER = 1000

Display = Literal["xpra", "none"]
DISPLAYS: tuple[Display, ...] = ("xpra", "none")

GUEST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9-]{1,63}")
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_.-]+")

# The container builds these itself; a root symlink there would clash with it.
_CONTAINER_TOP_DIRS = frozenset({"/dev", "/etc", "/home", "/proc", "/run", "/sys", "/tmp", "/usr"})
# Mounted (kernel filesystems, read-only /usr, the persistent home) or per-user:
# a symlink created below them would land in, or write through, a mount.
_NO_SYMLINKS_UNDER = ("/dev", "/home", "/proc", "/run", "/sys", "/usr")
# The container manages these, or mounts them from elsewhere (the rootfs's
# /usr and /etc/fonts, /etc/X11, the persistent home): a bind below would
# fail, or leave root-owned directories in the user's home.
_NO_BINDS_UNDER = ("/dev", "/proc", "/run/user", "/sys", "/usr", "/home/user", "/etc/fonts",
                   "/etc/X11")
# Whole ranges a guest subnet must never cover: the host end gets the gateway
# with the guest's prefix, so such a route would hijack host traffic.
_RESERVED_NETS = tuple(
    ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")
)
MIN_PREFIX = 8
MAX_PREFIX = 30


class ConfigError(Exception):
    """An invalid or unreadable configuration; ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Bind:
    source: str
    target: str
    readonly: bool = True


@dataclass(frozen=True)
class Veth:
    ifname: str
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address


@dataclass(frozen=True)
class Nat:
    outbound_interface: str


@dataclass(frozen=True)
class Guest:
    name: str
    rootfs: str
    hostname: str
    resolv_conf: str | None
    veth: Veth | None
    environment: Mapping[str, str]
    root_symlinks: Mapping[str, str]
    binds: tuple[Bind, ...]
    display: Display
    user: int


@dataclass(frozen=True)
class Config:
    permit_uids: frozenset[int]
    guests: Mapping[str, Guest]
    nat: Nat | None


def load_config(path: str) -> Config:
    """Read and validate the JSON config at *path*."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read the configuration file: {e.strerror or e}"
        ) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the file is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: the file is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except _BadJSON as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply") from None
    return parse_config(data, source=path)


def parse_config(data: object, *, source: str) -> Config:
    """Validate already-decoded JSON *data*; *source* names it in errors."""
    return _Parser(source).config(data)


class _BadJSON(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys would silently keep the last value; in a security config
    # that hides mistakes.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _BadJSON(f"duplicate key {_show(k)} in one object")
        out[k] = v
    return out


def _reject_constant(name: str) -> NoReturn:
    raise _BadJSON(f"{name} is not a JSON value")


def _show(value: object, limit: int = 80) -> str:
    return show(value, limit)


def _join(parent: str, key: str) -> str:
    seg = key if _PLAIN_KEY_RE.fullmatch(key) else _show(key)
    return f"{parent}.{seg}" if parent else seg


def _path(*keys: str) -> str:
    out = ""
    for k in keys:
        out = _join(out, k)
    return out


def _under(path: str, roots: tuple[str, ...]) -> str | None:
    for r in roots:
        if path == r or path.startswith(r + "/"):
            return r
    return None


def ifname_problem(name: str) -> str | None:
    """Why *name* cannot be a Linux interface name (kernel dev_valid_name), or None."""
    n = len(name.encode("utf-8", "surrogatepass"))
    if not 1 <= n <= 15:
        return f"{_show(name)} is not a valid interface name: use 1 to 15 bytes"
    if name in (".", "..", "all", "default"):
        return f"{_show(name)} is not a valid interface name: it is reserved"
    if any(c in "/:\0" or c.isspace() for c in name):
        return (
            f"{_show(name)} is not a valid interface name: "
            'it must not contain "/", ":" or whitespace'
        )
    return None


def hostname_problem(name: str) -> str | None:
    """Why *name* is not an RFC 1123 host name the kernel accepts, or None."""
    bad = f"{_show(name)} is not a valid RFC 1123 host name"
    if not name:
        return f"{bad}: it is empty"
    if len(name) > 253:
        return f"{bad}: it is longer than 253 characters"
    for label in name.split("."):
        if not _HOST_LABEL_RE.fullmatch(label):
            return (
                f"{bad}: each dot-separated label needs 1 to 63 letters, digits or \"-\""
            )
        if label.startswith("-") or label.endswith("-"):
            return f'{bad}: a label must not start or end with "-"'
    if len(name) > MAX_HOSTNAME_CHARS:
        return f"{bad}: Linux allows at most {MAX_HOSTNAME_CHARS} characters"
    return None


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, reason: str) -> NoReturn:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{self.source}: {where}{reason}")

    # -- generic shapes ------------------------------------------------------

    def obj(
        self, v: object, path: str, *, required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.fail(path, f"must be an object, not {_kind(v)}")
        allowed = required + optional
        for k in v:
            if k not in allowed:
                expected = ", ".join(f'"{a}"' for a in allowed)
                self.fail(_join(path, k), f"unknown key; expected one of {expected}")
        for k in required:
            if k not in v:
                self.fail(_join(path, k), "required key is missing")
        return v

    def mapping(self, v: object, path: str) -> dict[str, Any]:
        """An object with free-form keys."""
        if not isinstance(v, dict):
            self.fail(path, f"must be an object, not {_kind(v)}")
        return v

    def text(self, v: object, path: str) -> str:
        """A string the OS can take: no NUL (nor RS, the container setup's
        separator), encodable as UTF-8."""
        if not isinstance(v, str):
            self.fail(path, f"must be a string, not {_kind(v)}")
        if "\0" in v:
            self.fail(path, f"{_show(v)} must not contain a NUL character")
        if "\x1e" in v:
            self.fail(path, f"{_show(v)} must not contain the control character RS (0x1e)")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(path, f"{_show(v)} is not valid Unicode (lone surrogate)")
        return v

    def abspath(self, v: object, path: str, *, normalized: bool) -> str:
        s = self.text(v, path)
        if not s.startswith("/"):
            self.fail(path, f"{_show(s)} is not an absolute path")
        if ".." in s.split("/"):
            self.fail(path, f'{_show(s)} must not contain ".." components')
        norm = "/" + posixpath.normpath(s).lstrip("/")
        if normalized and s != norm:
            self.fail(path, f"{_show(s)} is not normalized; write {_show(norm)}")
        return norm

    def integer(self, v: object, path: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"must be an integer, not {_kind(v)}")
        if not lo <= v <= hi:
            self.fail(path, f"{v} is out of range: use {lo} to {hi}")
        return v

    def ifname(self, v: object, path: str) -> str:
        s = self.text(v, path)
        problem = ifname_problem(s)
        if problem:
            self.fail(path, problem)
        return s

    # -- the document --------------------------------------------------------

    def config(self, data: object) -> Config:
        if not isinstance(data, dict):
            self.fail("", f"the top level must be a JSON object, not {_kind(data)}")
        top = self.obj(data, "", required=("guests",), optional=("permit_users", "nat"))
        uids = self.permit_users(top.get("permit_users", []), "permit_users")
        guests_v = self.mapping(top["guests"], "guests")
        if not guests_v:
            self.fail("guests", "must define at least one guest")
        guests: dict[str, Guest] = {}
        for name, gv in guests_v.items():
            guests[name] = self.guest(name, gv, _join("guests", name))
        self.check_networks(guests)
        nat = None
        if "nat" in top:
            nv = self.obj(top["nat"], "nat", required=("outbound_interface",))
            out = self.ifname(nv["outbound_interface"], "nat.outbound_interface")
            for g in guests.values():
                if g.veth is not None and g.veth.ifname == out:
                    self.fail(
                        "nat.outbound_interface",
                        f'{_show(out)} is the veth of guest "{g.name}", not an outbound interface',
                    )
            nat = Nat(outbound_interface=out)
        return Config(
            permit_uids=frozenset(uids), guests=MappingProxyType(guests), nat=nat
        )

    def permit_users(self, v: object, path: str) -> set[int]:
        if not isinstance(v, list):
            self.fail(path, f"must be an array of uids or user names, not {_kind(v)}")
        uids: set[int] = set()
        for i, item in enumerate(v):
            p = f"{path}[{i}]"
            if isinstance(item, str):
                self.text(item, p)
                try:
                    uids.add(pwd.getpwnam(item).pw_uid)
                except KeyError:
                    self.fail(p, f"there is no user named {_show(item)}")
            elif isinstance(item, int) and not isinstance(item, bool):
                # (uid_t)-1 means "no change" to set*id(); never a real user.
                uids.add(self.integer(item, p, 0, 2**32 - 2))
            else:
                self.fail(p, f"must be a uid or a user name, not {_kind(item)}")
        return uids

    def guest(self, name: str, v: object, path: str) -> Guest:
        if not GUEST_NAME_RE.fullmatch(name):
            self.fail(
                path,
                f"guest name {_show(name)} is invalid: use 1 to 64 letters, digits, "
                '".", "_" or "-", starting with a letter or digit',
            )
        g = self.obj(
            v, path, required=("rootfs",),
            optional=("hostname", "resolv.conf", "veth", "environment", "root_symlinks",
                      "binds", "display", "user"),
        )
        rootfs = self.rootfs(g["rootfs"], _join(path, "rootfs"))

        hp = _join(path, "hostname")
        if "hostname" in g:
            hostname = self.text(g["hostname"], hp)
            problem = hostname_problem(hostname)
            if problem:
                self.fail(hp, problem)
        else:
            hostname = name
            problem = hostname_problem(hostname)
            if problem:
                self.fail(hp, f"is not set and the guest name is not usable: {problem}")

        resolv_conf = None
        if "resolv.conf" in g:
            rp = _join(path, "resolv.conf")
            resolv_conf = self.text(g["resolv.conf"], rp)
            if len(resolv_conf.encode("utf-8")) > MAX_RESOLV_CONF_BYTES:
                self.fail(rp, f"is longer than {MAX_RESOLV_CONF_BYTES} bytes")

        veth = self.veth(g["veth"], _join(path, "veth")) if "veth" in g else None
        environment = self.environment(g.get("environment", {}), _join(path, "environment"))
        symlinks = self.root_symlinks(g.get("root_symlinks", {}), _join(path, "root_symlinks"))
        binds = self.binds(g.get("binds", []), _join(path, "binds"), symlinks)

        display: Display = "xpra"
        if "display" in g:
            d = g["display"]
            if d == "xpra" or d == "none":
                display = d
            else:
                self.fail(_join(path, "display"), f'{_show(d)} is invalid: use "xpra" or "none"')
        user = DEFAULT_USER
        if "user" in g:
            user = self.integer(g["user"], _join(path, "user"), 1, 65534)
        return Guest(
            name=name, rootfs=rootfs, hostname=hostname, resolv_conf=resolv_conf, veth=veth,
            environment=MappingProxyType(environment), root_symlinks=MappingProxyType(symlinks),
            binds=tuple(binds), display=display, user=user,
        )

    def rootfs(self, v: object, path: str) -> str:
        norm = self.abspath(v, path, normalized=False)
        # A symlink anywhere in the path could be swapped between the check and
        # the mount, so only the resolved path itself is accepted.
        real = os.path.realpath(norm)
        if real != norm:
            self.fail(
                path,
                f"{_show(v)} goes through a symbolic link (it resolves to {_show(real)}); "
                "use the real path",
            )
        try:
            st = os.stat(norm)
        except FileNotFoundError:
            self.fail(path, f"{_show(norm)} does not exist")
        except OSError as e:
            self.fail(path, f"{_show(norm)} cannot be accessed: {e.strerror or e}")
        if not stat.S_ISDIR(st.st_mode):
            self.fail(path, f"{_show(norm)} is not a directory")
        return norm

    def veth(self, v: object, path: str) -> Veth:
        vv = self.obj(v, path, required=("ifname", "ipv4"))
        ifname = self.ifname(vv["ifname"], _join(path, "ifname"))
        ip_path = _join(path, "ipv4")
        ipv4 = self.obj(vv["ipv4"], ip_path, required=("address", "gateway"))

        ap = _join(ip_path, "address")
        a = self.text(ipv4["address"], ap)
        if "/" not in a:
            self.fail(ap, f'{_show(a)} has no prefix length; write it like "192.168.12.104/24"')
        try:
            iface = ipaddress.IPv4Interface(a)
        except ValueError as e:
            self.fail(ap, f"{_show(a)} is not an IPv4 address with a prefix length: {e}")
        net = iface.network
        if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
            why = (
                "leaves no room for a separate gateway" if net.prefixlen > MAX_PREFIX
                else "would route too much of the address space to the guest"
            )
            self.fail(ap, f"prefix /{net.prefixlen} {why}: use /{MIN_PREFIX} to /{MAX_PREFIX}")
        for r in _RESERVED_NETS:
            if net.overlaps(r):
                self.fail(ap, f"subnet {net} overlaps the reserved range {r}")
        if iface.ip in (net.network_address, net.broadcast_address):
            which = "network" if iface.ip == net.network_address else "broadcast"
            self.fail(ap, f"{iface.ip} is the {which} address of {net}; pick a host address")

        gp = _join(ip_path, "gateway")
        gs = self.text(ipv4["gateway"], gp)
        if "/" in gs:
            self.fail(gp, f"{_show(gs)} must be a plain address; the prefix comes from address")
        try:
            gw = ipaddress.IPv4Address(gs)
        except ValueError as e:
            self.fail(gp, f"{_show(gs)} is not an IPv4 address: {e}")
        if gw not in net:
            self.fail(gp, f"{gw} is not in the guest's subnet {net}")
        if gw == iface.ip:
            self.fail(gp, f"{gw} is the guest's own address; the gateway must differ")
        if gw in (net.network_address, net.broadcast_address):
            self.fail(gp, f"{gw} is the network or broadcast address of {net}")
        return Veth(ifname=ifname, address=iface, gateway=gw)

    def environment(self, v: object, path: str) -> dict[str, str]:
        env = self.mapping(v, path)
        out: dict[str, str] = {}
        for k, val in env.items():
            p = _join(path, k)
            if not k:
                self.fail(p, "a variable name must not be empty")
            self.text(k, p)
            if "=" in k:
                self.fail(p, f'variable name {_show(k)} must not contain "="')
            out[k] = self.text(val, p)
        return out

    def root_symlinks(self, v: object, path: str) -> dict[str, str]:
        links = self.mapping(v, path)
        out: dict[str, str] = {}
        for link, target in links.items():
            p = _join(path, link)
            self.abspath(link, p, normalized=True)
            if link == "/":
                self.fail(p, 'the link must not be "/"')
            if link in _CONTAINER_TOP_DIRS:
                self.fail(p, f"{_show(link)} is made by the container itself")
            root = _under(link, _NO_SYMLINKS_UNDER)
            if root:
                self.fail(p, f"{_show(link)} is under {root}, which is a mount in the container")
            t = self.text(target, p)
            if not t:
                self.fail(p, "the target must not be empty")
            if t.startswith("/"):
                self.fail(
                    p,
                    f"target {_show(t)} must be relative (like \"usr/bin\") so it "
                    "resolves inside the container",
                )
            out[link] = t
        for link in out:
            for other in out:
                if link.startswith(other + "/"):
                    self.fail(_join(path, link), f"{_show(link)} is under the link {_show(other)}")
        return out

    def binds(self, v: object, path: str, symlinks: Mapping[str, str]) -> list[Bind]:
        if not isinstance(v, list):
            self.fail(path, f"must be an array, not {_kind(v)}")
        out: list[Bind] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(v):
            p = f"{path}[{i}]"
            b = self.obj(item, p, required=("source", "target"), optional=("readonly",))
            sp = _join(p, "source")
            source = self.abspath(b["source"], sp, normalized=False)
            try:
                os.stat(source)
            except FileNotFoundError:
                self.fail(sp, f"{_show(source)} does not exist")
            except OSError as e:
                self.fail(sp, f"{_show(source)} cannot be accessed: {e.strerror or e}")
            tp = _join(p, "target")
            target = self.abspath(b["target"], tp, normalized=True)
            if target == "/":
                self.fail(tp, 'the target must not be "/"')
            root = _under(target, _NO_BINDS_UNDER)
            if root:
                self.fail(tp, f"{_show(target)} is under {root}, which the container manages")
            link = _under(target, tuple(symlinks))
            if link:
                # The mount would follow the symlink into the guest's /usr.
                self.fail(tp, f"{_show(target)} is under the root symlink {_show(link)}")
            if target in seen:
                self.fail(tp, f"{_show(target)} is already the target of {path}[{seen[target]}]")
            seen[target] = i
            readonly = b.get("readonly", True)
            if not isinstance(readonly, bool):
                self.fail(_join(p, "readonly"), f"must be true or false, not {_kind(readonly)}")
            out.append(Bind(source=source, target=target, readonly=readonly))
        return out

    def check_networks(self, guests: Mapping[str, Guest]) -> None:
        """Issue 5: veth names and subnets must not clash between guests."""
        seen: list[Guest] = []
        for g in guests.values():
            if g.veth is None:
                continue
            net = g.veth.address.network
            for other in seen:
                assert other.veth is not None
                if other.veth.ifname == g.veth.ifname:
                    self.fail(
                        _path("guests", g.name, "veth", "ifname"),
                        f'{_show(g.veth.ifname)} is also the veth of guest "{other.name}"; '
                        "guests need distinct interface names",
                    )
                onet = other.veth.address.network
                if net.overlaps(onet):
                    self.fail(
                        _path("guests", g.name, "veth", "ipv4", "address"),
                        f'subnet {net} of guest "{g.name}" overlaps subnet {onet} '
                        f'of guest "{other.name}"',
                    )
            seen.append(g)
