"""packxd.config: one test per validation rule, each checking that the one-line
message names the file, the key path and the reason."""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from packxd.config import (
    DEFAULT_CONFIG_PATH,
    Bind,
    ConfigError,
    load_config,
    parse_config,
)

# The seed's example, verbatim but for rootfs.
SEED_EXAMPLE = """
{
    "permit_users": [1000],
    "guests": {
        "mycontainer01": {
            "rootfs": "ROOTFS",
            "hostname": "myarchlinux",
            "resolv.conf": "nameserver 8.8.8.8",
            "veth": {
                "ifname": "veth-myarch01",
                "ipv4": {
                    "address": "192.168.12.104/24",
                    "gateway": "192.168.12.1"
                }
            },
            "environment": {
                "LANG": "C.UTF-8",
                "LC_CTYPE": "C.UTF-8",
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/bin:/usr/bin/site_perl:/usr/bin/vendor_perl:/usr/bin/core_perl",
                "SHELL": "/bin/bash",
                "SHLVL": "0"
            },
            "root_symlinks": {
                "/bin": "usr/bin",
                "/lib": "usr/lib",
                "/lib64": "usr/lib",
                "/sbin": "usr/bin"
            }
        }
    }
}
"""  # noqa: E501


@pytest.fixture
def rootfs(tmp_path: Path) -> str:
    d = tmp_path.resolve() / "rootfs"
    (d / "usr").mkdir(parents=True)
    return str(d)


def base(rootfs: str, **guest: Any) -> dict[str, Any]:
    return {"permit_users": [1000], "guests": {"web": {"rootfs": rootfs, **guest}}}


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "packxd.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def error(tmp_path: Path, data: object) -> str:
    """The message load_config gives for *data*, without the file prefix."""
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(path + ": ")
    return msg[len(path) + 2:]


def guest_error(tmp_path: Path, rootfs: str, **guest: Any) -> str:
    return error(tmp_path, base(rootfs, **guest))


# -- the file -----------------------------------------------------------------


def test_default_path() -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/packxd.json"


def test_seed_example_parses(tmp_path: Path, rootfs: str) -> None:
    cfg = load_config(write(tmp_path, SEED_EXAMPLE.replace("ROOTFS", rootfs)))
    assert cfg.permit_uids == frozenset({1000})
    assert cfg.nat is None
    g = cfg.guests["mycontainer01"]
    assert g.name == "mycontainer01"
    assert g.rootfs == rootfs
    assert g.hostname == "myarchlinux"
    assert g.resolv_conf == "nameserver 8.8.8.8"
    assert g.veth is not None
    assert g.veth.ifname == "veth-myarch01"
    assert g.veth.address == ipaddress.IPv4Interface("192.168.12.104/24")
    assert g.veth.gateway == ipaddress.IPv4Address("192.168.12.1")
    assert g.environment["SHELL"] == "/bin/bash"
    assert dict(g.root_symlinks) == {
        "/bin": "usr/bin", "/lib": "usr/lib", "/lib64": "usr/lib", "/sbin": "usr/bin"}
    assert g.binds == ()
    assert g.display == "xpra"
    assert g.user == 1000


def test_full_config_and_defaults(tmp_path: Path, rootfs: str) -> None:
    data = {
        "permit_users": [0, 1000, "root"],
        "nat": {"outbound_interface": "eth0"},
        "guests": {
            "web": {"rootfs": rootfs + "/", "display": "none", "user": 1234,
                    "binds": [{"source": str(tmp_path), "target": "/mnt/data"},
                              {"source": "/etc/hostname", "target": "/etc/hostname",
                               "readonly": False}]},
            "Plain-2": {"rootfs": "/"},
        },
    }
    cfg = load_config(write(tmp_path, data))
    assert cfg.permit_uids == frozenset({0, 1000})
    assert cfg.nat is not None and cfg.nat.outbound_interface == "eth0"
    web = cfg.guests["web"]
    assert web.rootfs == rootfs
    assert web.hostname == "web"
    assert web.display == "none"
    assert web.user == 1234
    assert web.veth is None and web.resolv_conf is None
    assert web.binds == (
        Bind(str(tmp_path), "/mnt/data", True), Bind("/etc/hostname", "/etc/hostname", False))
    assert cfg.guests["Plain-2"].rootfs == "/"
    with pytest.raises(TypeError):
        cfg.guests["x"] = web  # type: ignore[index]


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}: cannot read the configuration file: No such file or directory")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file: Is a directory"):
        load_config(str(tmp_path))


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    msg = error(tmp_path, '{\n  "guests": {}\n  "nat": 1\n}')
    assert msg == "invalid JSON at line 3 column 3: Expecting ',' delimiter"


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "packxd.json"
    path.write_bytes(b'{"guests": "\xff"}')
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_config(str(path))


def test_duplicate_key(tmp_path: Path) -> None:
    assert error(tmp_path, '{"guests": {}, "guests": {}}') == (
        'invalid JSON: duplicate key "guests" in one object')


@pytest.mark.parametrize(("text", "kind"), [("[]", "an array"), ('"x"', "a string"),
                                            ("null", "null")])
def test_top_level_not_an_object(tmp_path: Path, text: str, kind: str) -> None:
    assert error(tmp_path, text) == f"the top level must be a JSON object, not {kind}"


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"guests": 1}, source="<test>")
    assert str(e.value) == "<test>: guests: must be an object, not a number"


# -- top level ----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path, rootfs: str) -> None:
    msg = error(tmp_path, {**base(rootfs), "permit_user": [1]})
    assert msg.startswith('permit_user: unknown key; expected one of "guests", ')


def test_guests_required(tmp_path: Path) -> None:
    assert error(tmp_path, {"permit_users": []}) == "guests: required key is missing"


def test_guests_not_empty(tmp_path: Path) -> None:
    assert error(tmp_path, {"guests": {}}) == "guests: must define at least one guest"


def test_permit_users_not_a_list(tmp_path: Path, rootfs: str) -> None:
    msg = error(tmp_path, {**base(rootfs), "permit_users": 1000})
    assert msg == "permit_users: must be an array of uids or user names, not a number"


@pytest.mark.parametrize(
    ("item", "reason"),
    [(-1, "-1 is out of range: use 0 to 4294967294"),
     (2**32 - 1, "4294967295 is out of range"),
     (True, "must be a uid or a user name, not a boolean"),
     (1000.0, "must be a uid or a user name, not a number"),
     (None, "must be a uid or a user name, not null")],
)
def test_permit_users_bad_uid(tmp_path: Path, rootfs: str, item: object, reason: str) -> None:
    msg = error(tmp_path, {**base(rootfs), "permit_users": [0, item]})
    assert msg.startswith(f"permit_users[1]: {reason}")


def test_permit_users_unknown_name(tmp_path: Path, rootfs: str) -> None:
    msg = error(tmp_path, {**base(rootfs), "permit_users": ["no-such-user-x9"]})
    assert msg == 'permit_users[0]: there is no user named "no-such-user-x9"'


def test_permit_users_names_resolve(tmp_path: Path, rootfs: str) -> None:
    name = pwd.getpwuid(os.getuid()).pw_name
    cfg = load_config(write(tmp_path, {**base(rootfs), "permit_users": [name]}))
    assert cfg.permit_uids == frozenset({os.getuid()})


@pytest.mark.parametrize("name", ["-web", ".web", "we b", "a" * 65, "", "web/x", "wéb"])
def test_bad_guest_name(tmp_path: Path, rootfs: str, name: str) -> None:
    msg = error(tmp_path, {"guests": {name: {"rootfs": rootfs}}})
    assert "guest name" in msg and "is invalid: use 1 to 64 letters, digits" in msg
    assert msg.startswith("guests.")


def test_guest_not_an_object(tmp_path: Path) -> None:
    assert error(tmp_path, {"guests": {"web": []}}) == "guests.web: must be an object, not an array"


def test_unknown_guest_key(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs, hostnmae="x")
    assert msg.startswith('guests.web.hostnmae: unknown key; expected one of "rootfs", ')


# -- rootfs -------------------------------------------------------------------


def test_rootfs_required(tmp_path: Path) -> None:
    assert error(tmp_path, {"guests": {"web": {}}}) == "guests.web.rootfs: required key is missing"


def test_rootfs_must_be_absolute(tmp_path: Path) -> None:
    msg = error(tmp_path, {"guests": {"web": {"rootfs": "var/lib/lxc/x"}}})
    assert msg == 'guests.web.rootfs: "var/lib/lxc/x" is not an absolute path'


def test_rootfs_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path.resolve() / "missing")
    msg = error(tmp_path, {"guests": {"web": {"rootfs": missing}}})
    assert msg == f'guests.web.rootfs: "{missing}" does not exist'


def test_rootfs_must_be_a_directory(tmp_path: Path) -> None:
    f = tmp_path.resolve() / "file"
    f.write_text("")
    msg = error(tmp_path, {"guests": {"web": {"rootfs": str(f)}}})
    assert msg == f'guests.web.rootfs: "{f}" is not a directory'


def test_rootfs_symlink_is_refused(tmp_path: Path, rootfs: str) -> None:
    link = tmp_path.resolve() / "link"
    link.symlink_to(rootfs)
    msg = error(tmp_path, {"guests": {"web": {"rootfs": str(link)}}})
    assert msg == (
        f'guests.web.rootfs: "{link}" goes through a symbolic link '
        f'(it resolves to "{rootfs}"); use the real path')


def test_rootfs_symlinked_parent_is_refused(tmp_path: Path, rootfs: str) -> None:
    link = tmp_path.resolve() / "parent"
    link.symlink_to(os.path.dirname(rootfs))
    msg = error(tmp_path, {"guests": {"web": {"rootfs": str(link / "rootfs")}}})
    assert msg.startswith("guests.web.rootfs: ") and "goes through a symbolic link" in msg


def test_rootfs_dotdot_is_refused(tmp_path: Path, rootfs: str) -> None:
    msg = error(tmp_path, {"guests": {"web": {"rootfs": rootfs + "/usr/.."}}})
    assert msg.endswith('must not contain ".." components')


# -- hostname -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("hostname", "reason"),
    [("-bad", 'a label must not start or end with "-"'),
     ("bad-.example", 'a label must not start or end with "-"'),
     ("a..b", "each dot-separated label needs 1 to 63 letters, digits or \"-\""),
     ("under_score", "each dot-separated label needs 1 to 63 letters, digits or \"-\""),
     ("x" * 64, "each dot-separated label needs 1 to 63 letters, digits or \"-\""),
     ("", "it is empty"),
     (".".join(["abcdefgh"] * 30), "it is longer than 253 characters"),
     (".".join(["abcdefgh"] * 8), "Linux allows at most 64 characters")],
)
def test_bad_hostname(tmp_path: Path, rootfs: str, hostname: str, reason: str) -> None:
    msg = guest_error(tmp_path, rootfs, hostname=hostname)
    shown = json.dumps(hostname)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    assert msg == f"guests.web.hostname: {shown} is not a valid RFC 1123 host name: {reason}"


def test_hostname_not_a_string(tmp_path: Path, rootfs: str) -> None:
    assert guest_error(tmp_path, rootfs, hostname=1) == (
        "guests.web.hostname: must be a string, not a number")


def test_default_hostname_must_be_valid(tmp_path: Path, rootfs: str) -> None:
    msg = error(tmp_path, {"guests": {"my_box": {"rootfs": rootfs}}})
    assert msg.startswith(
        "guests.my_box.hostname: is not set and the guest name is not usable: "
        '"my_box" is not a valid RFC 1123 host name')


# -- resolv.conf --------------------------------------------------------------


def test_resolv_conf_size(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs, **{"resolv.conf": "#" * (64 * 1024 + 1)})
    assert msg == "guests.web.resolv.conf: is longer than 65536 bytes"


def test_resolv_conf_nul(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs, **{"resolv.conf": "nameserver 1.1.1.1\0"})
    assert msg.startswith("guests.web.resolv.conf: ") and "NUL" in msg


def test_resolv_conf_type(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs, **{"resolv.conf": ["nameserver 1.1.1.1"]})
    assert msg == "guests.web.resolv.conf: must be a string, not an array"


# -- veth ---------------------------------------------------------------------


def veth(ifname: str = "veth-web", address: str = "10.20.0.2/24",
         gateway: str = "10.20.0.1") -> dict[str, Any]:
    return {"ifname": ifname, "ipv4": {"address": address, "gateway": gateway}}


def test_veth_keys(tmp_path: Path, rootfs: str) -> None:
    assert guest_error(tmp_path, rootfs, veth={"ifname": "v"}) == (
        "guests.web.veth.ipv4: required key is missing")
    msg = guest_error(tmp_path, rootfs, veth={**veth(), "mtu": 1500})
    assert msg.startswith("guests.web.veth.mtu: unknown key")
    msg = guest_error(tmp_path, rootfs, veth={"ifname": "v", "ipv4": {"address": "10.0.0.2/24"}})
    assert msg == "guests.web.veth.ipv4.gateway: required key is missing"


@pytest.mark.parametrize(
    ("ifname", "reason"),
    [("a" * 16, "use 1 to 15 bytes"), ("", "use 1 to 15 bytes"),
     ("ééééééééé", "use 1 to 15 bytes"),
     ("veth/0", 'it must not contain "/", ":" or whitespace'),
     ("veth:0", 'it must not contain "/", ":" or whitespace'),
     ("veth 0", 'it must not contain "/", ":" or whitespace'),
     ("..", "it is reserved"), ("all", "it is reserved")],
)
def test_bad_veth_ifname(tmp_path: Path, rootfs: str, ifname: str, reason: str) -> None:
    msg = guest_error(tmp_path, rootfs, veth=veth(ifname=ifname))
    assert msg == (
        f"guests.web.veth.ifname: {json.dumps(ifname)} is not a valid interface name: {reason}")


def test_veth_ifname_15_chars_is_fine(tmp_path: Path, rootfs: str) -> None:
    cfg = load_config(write(tmp_path, base(rootfs, veth=veth(ifname="a" * 15))))
    assert cfg.guests["web"].veth is not None


@pytest.mark.parametrize(
    ("address", "reason"),
    [("10.20.0.2", 'has no prefix length; write it like "192.168.12.104/24"'),
     ("10.20.0.2/32", "prefix /32 leaves no room for a separate gateway"),
     ("10.20.0.2/31", "prefix /31 leaves no room for a separate gateway"),
     ("10.20.0.2/4", "prefix /4 would route too much of the address space"),
     ("10.20.0.0/24", "10.20.0.0 is the network address of 10.20.0.0/24"),
     ("10.20.0.255/24", "10.20.0.255 is the broadcast address of 10.20.0.0/24"),
     ("10.20.0.300/24", "is not an IPv4 address with a prefix length"),
     ("fe80::1/64", "is not an IPv4 address with a prefix length"),
     ("127.0.0.2/24", "overlaps the reserved range 127.0.0.0/8")],
)
def test_bad_veth_address(tmp_path: Path, rootfs: str, address: str, reason: str) -> None:
    msg = guest_error(tmp_path, rootfs, veth=veth(address=address))
    assert msg.startswith("guests.web.veth.ipv4.address: ")
    assert reason in msg


@pytest.mark.parametrize(
    ("gateway", "reason"),
    [("10.21.0.1", "10.21.0.1 is not in the guest's subnet 10.20.0.0/24"),
     ("10.20.0.2", "10.20.0.2 is the guest's own address; the gateway must differ"),
     ("10.20.0.1/24", "must be a plain address; the prefix comes from address"),
     ("gateway", "is not an IPv4 address"),
     ("10.20.0.255", "is the network or broadcast address of 10.20.0.0/24")],
)
def test_bad_veth_gateway(tmp_path: Path, rootfs: str, gateway: str, reason: str) -> None:
    msg = guest_error(tmp_path, rootfs, veth=veth(gateway=gateway))
    assert msg.startswith("guests.web.veth.ipv4.gateway: ")
    assert reason in msg


def test_veth_ifnames_unique_across_guests(tmp_path: Path, rootfs: str) -> None:
    data = {"guests": {"web": {"rootfs": rootfs, "veth": veth()},
                       "mail": {"rootfs": rootfs, "veth": veth(address="10.30.0.2/24",
                                                               gateway="10.30.0.1")}}}
    msg = error(tmp_path, data)
    assert msg == ('guests.mail.veth.ifname: "veth-web" is also the veth of guest "web"; '
                   "guests need distinct interface names")


@pytest.mark.parametrize("other", ["10.20.0.3/24", "10.20.0.130/25", "10.0.0.2/8"])
def test_veth_subnets_must_not_overlap(tmp_path: Path, rootfs: str, other: str) -> None:
    gw = str(next(ipaddress.IPv4Interface(other).network.hosts()))
    data = {"guests": {"web": {"rootfs": rootfs, "veth": veth()},
                       "mail": {"rootfs": rootfs,
                                "veth": veth(ifname="veth-mail", address=other, gateway=gw)}}}
    msg = error(tmp_path, data)
    net = ipaddress.IPv4Interface(other).network
    assert msg == (f'guests.mail.veth.ipv4.address: subnet {net} of guest "mail" overlaps '
                   f'subnet 10.20.0.0/24 of guest "web"')


def test_two_guests_with_separate_networks(tmp_path: Path, rootfs: str) -> None:
    data = {"guests": {"web": {"rootfs": rootfs, "veth": veth()},
                       "mail": {"rootfs": rootfs, "veth": veth(
                           ifname="veth-mail", address="10.20.1.2/24", gateway="10.20.1.1")}}}
    assert len(load_config(write(tmp_path, data)).guests) == 2


# -- environment --------------------------------------------------------------


def test_environment_must_be_an_object(tmp_path: Path, rootfs: str) -> None:
    assert guest_error(tmp_path, rootfs, environment=["LANG=C"]) == (
        "guests.web.environment: must be an object, not an array")


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"LANG": 1}, "guests.web.environment.LANG: must be a string, not a number"),
     ({"LANG": None}, "guests.web.environment.LANG: must be a string, not null"),
     ({"A=B": "x"}, 'guests.web.environment."A=B": variable name "A=B" must not contain "="'),
     ({"": "x"}, 'guests.web.environment."": a variable name must not be empty'),
     ({"X": "a\0b"}, 'guests.web.environment.X: "a\\u0000b" must not contain a NUL character')],
)
def test_bad_environment(tmp_path: Path, rootfs: str, env: dict[str, Any], expected: str) -> None:
    assert guest_error(tmp_path, rootfs, environment=env) == expected


# -- root_symlinks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("links", "expected"),
    [({"bin": "usr/bin"}, 'guests.web.root_symlinks.bin: "bin" is not an absolute path'),
     ({"/": "usr"}, 'guests.web.root_symlinks."/": the link must not be "/"'),
     ({"/bin/": "usr/bin"},
      'guests.web.root_symlinks."/bin/": "/bin/" is not normalized; write "/bin"'),
     ({"//bin": "usr/bin"},
      'guests.web.root_symlinks."//bin": "//bin" is not normalized; write "/bin"'),
     ({"/x/../bin": "usr/bin"},
      'guests.web.root_symlinks."/x/../bin": "/x/../bin" must not contain ".." components'),
     ({"/bin": "/usr/bin"}, 'guests.web.root_symlinks."/bin": target "/usr/bin" must be '
      'relative (like "usr/bin") so it resolves inside the container'),
     ({"/bin": ""}, 'guests.web.root_symlinks."/bin": the target must not be empty'),
     ({"/bin": 1}, 'guests.web.root_symlinks."/bin": must be a string, not a number'),
     ({"/usr": "opt"}, 'guests.web.root_symlinks."/usr": "/usr" is made by the container itself'),
     ({"/usr/x": "bin"}, 'guests.web.root_symlinks."/usr/x": "/usr/x" is under /usr, which is '
      "a mount in the container"),
     ({"/bin": "usr/bin", "/bin/sh": "bash"},
      'guests.web.root_symlinks."/bin/sh": "/bin/sh" is under the link "/bin"')],
)
def test_bad_root_symlinks(
    tmp_path: Path, rootfs: str, links: dict[str, Any], expected: str
) -> None:
    assert guest_error(tmp_path, rootfs, root_symlinks=links) == expected


def test_root_symlinks_must_be_an_object(tmp_path: Path, rootfs: str) -> None:
    assert guest_error(tmp_path, rootfs, root_symlinks=[["/bin", "usr/bin"]]) == (
        "guests.web.root_symlinks: must be an object, not an array")


def test_deep_root_symlink_is_fine(tmp_path: Path, rootfs: str) -> None:
    cfg = load_config(write(tmp_path, base(rootfs, root_symlinks={"/opt/app/bin": "../x"})))
    assert dict(cfg.guests["web"].root_symlinks) == {"/opt/app/bin": "../x"}


# -- binds --------------------------------------------------------------------


def test_binds_must_be_a_list(tmp_path: Path, rootfs: str) -> None:
    assert guest_error(tmp_path, rootfs, binds={"source": "/etc"}) == (
        "guests.web.binds: must be an array, not an object")


def test_bind_keys(tmp_path: Path, rootfs: str) -> None:
    assert guest_error(tmp_path, rootfs, binds=[{"target": "/mnt"}]) == (
        "guests.web.binds[0].source: required key is missing")
    msg = guest_error(tmp_path, rootfs, binds=[{"source": "/etc", "target": "/mnt", "rw": 1}])
    assert msg.startswith("guests.web.binds[0].rw: unknown key")


@pytest.mark.parametrize(
    ("source", "reason"),
    [("etc", '"etc" is not an absolute path'),
     ("/no/such/path/x9", '"/no/such/path/x9" does not exist'),
     ("/etc/../etc", 'must not contain ".." components')],
)
def test_bad_bind_source(tmp_path: Path, rootfs: str, source: str, reason: str) -> None:
    msg = guest_error(tmp_path, rootfs, binds=[{"source": source, "target": "/mnt"}])
    assert msg.startswith("guests.web.binds[0].source: ") and reason in msg


@pytest.mark.parametrize(
    ("target", "reason"),
    [("/", 'the target must not be "/"'),
     ("mnt", '"mnt" is not an absolute path'),
     ("/mnt/../etc", 'must not contain ".." components'),
     ("/mnt/", '"/mnt/" is not normalized; write "/mnt"'),
     ("/proc", '"/proc" is under /proc, which the container manages'),
     ("/proc/sys", '"/proc/sys" is under /proc'),
     ("/dev/sda", '"/dev/sda" is under /dev'),
     ("/sys/fs", '"/sys/fs" is under /sys'),
     ("/run/user/1000/bus", '"/run/user/1000/bus" is under /run/user'),
     ("/usr/share/data", '"/usr/share/data" is under /usr'),
     ("/home/user/docs", '"/home/user/docs" is under /home/user'),
     ("/etc/fonts/local", '"/etc/fonts/local" is under /etc/fonts')],
)
def test_bad_bind_target(tmp_path: Path, rootfs: str, target: str, reason: str) -> None:
    msg = guest_error(tmp_path, rootfs, binds=[{"source": "/etc", "target": target}])
    assert msg.startswith("guests.web.binds[0].target: ") and reason in msg


def test_bind_target_under_root_symlink(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs, root_symlinks={"/bin": "usr/bin"},
                      binds=[{"source": "/etc", "target": "/bin/tool"}])
    assert msg == 'guests.web.binds[0].target: "/bin/tool" is under the root symlink "/bin"'


def test_bind_target_duplicate(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs, binds=[{"source": "/etc", "target": "/mnt"},
                                               {"source": "/tmp", "target": "/mnt"}])
    assert msg == 'guests.web.binds[1].target: "/mnt" is already the target of guests.web.binds[0]'


def test_bind_readonly_must_be_bool(tmp_path: Path, rootfs: str) -> None:
    msg = guest_error(tmp_path, rootfs,
                      binds=[{"source": "/etc", "target": "/mnt", "readonly": "yes"}])
    assert msg == "guests.web.binds[0].readonly: must be true or false, not a string"


# -- display and user ---------------------------------------------------------


@pytest.mark.parametrize("display", ["x11", "", None, True])
def test_bad_display(tmp_path: Path, rootfs: str, display: object) -> None:
    msg = guest_error(tmp_path, rootfs, display=display)
    assert msg == f'guests.web.display: {json.dumps(display)} is invalid: use "xpra" or "none"'


@pytest.mark.parametrize(
    ("user", "reason"),
    [(0, "0 is out of range: use 1 to 65534"), (65535, "65535 is out of range: use 1 to 65534"),
     ("1000", "must be an integer, not a string"), (True, "must be an integer, not a boolean"),
     (1000.5, "must be an integer, not a number")],
)
def test_bad_user(tmp_path: Path, rootfs: str, user: object, reason: str) -> None:
    assert guest_error(tmp_path, rootfs, user=user) == f"guests.web.user: {reason}"


# -- nat ----------------------------------------------------------------------


def test_nat_outbound_interface(tmp_path: Path, rootfs: str) -> None:
    assert error(tmp_path, {**base(rootfs), "nat": {}}) == (
        "nat.outbound_interface: required key is missing")
    msg = error(tmp_path, {**base(rootfs), "nat": {"outbound_interface": "wlan0:1"}})
    assert msg == ('nat.outbound_interface: "wlan0:1" is not a valid interface name: '
                   'it must not contain "/", ":" or whitespace')
    msg = error(tmp_path, {**base(rootfs), "nat": {"outbound_interface": "eth0", "x": 1}})
    assert msg.startswith("nat.x: unknown key")


def test_nat_interface_is_not_a_guest_veth(tmp_path: Path, rootfs: str) -> None:
    msg = error(tmp_path, {**base(rootfs, veth=veth()), "nat": {"outbound_interface": "veth-web"}})
    assert msg == ('nat.outbound_interface: "veth-web" is the veth of guest "web", '
                   "not an outbound interface")


def test_resolv_conf_must_not_contain_rs(tmp_path: Path, rootfs: str) -> None:
    """RS separates the container's setup operations: refuse it at load time."""
    assert guest_error(tmp_path, rootfs, **{"resolv.conf": "nameserver 10.0.0.1\x1e"}) == (
        'guests.web.resolv.conf: "nameserver 10.0.0.1\\u001e" must not contain the control '
        "character RS (0x1e)")
