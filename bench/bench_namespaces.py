"""A container's spawn: ``spawn_actor`` with six namespaces and a bwrap-like init script.

Time from ``spawn_actor`` to the actor's first reply, for an actor in new
user, mount, pid, net, uts and ipc namespaces whose init script builds what
this bwrap command builds, against that command (fork + exec + wait):

    bwrap --unshare-all --die-with-parent --proc /proc --dev /dev --tmpfs /tmp \\
          --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib \\
          --symlink usr/lib64 /lib64 /bin/true

bwrap run as root still makes a user namespace (uid map ``0 0 1``), so the
headline variant has one too, with the maps written by the parent between
the init script's sync points, as the seed's host code does. The actor
brings ``lo`` up before replying (bwrap does it in its setup; the init
script's vocabulary has no netlink or ioctl).

Variants, all in the same run: with and without the user namespace (as root
a mount namespace needs none), with and without the init script, and a
plain spawn without namespaces.

Targets (issue 3): <= 2x bwrap; stretch 1x.

Run: /opt/packxd/venv/bin/python bench/bench_namespaces.py [--runs N]
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Any

from _common import Stats, enable_bytecode_cache, ms, print_table, ratio, target

BWRAP_ARGS = ["--unshare-all", "--die-with-parent", "--proc", "/proc", "--dev", "/dev",
              "--tmpfs", "/tmp", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
              "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64", "/bin/true"]

# What bwrap sets up, in the init script's vocabulary (see tests/seed_container.py
# for the seed's own script). `arg` is a socket to the parent when a user
# namespace needs its maps written first, and None otherwise.
BWRAP_LIKE_INIT = r"""
if arg is not None:
    C.read(arg, 1)  # sync point: the parent has written uid_map, setgroups, gid_map

C.mount(None, '/', None, C.MS_SLAVE | C.MS_REC)
C.mount('tmpfs', '/mnt', 'tmpfs', C.MS_NOSUID | C.MS_NODEV, 'mode=0755')

# --ro-bind /usr /usr and the three --symlink
C.mkdir('/mnt/usr', mode(7, 5, 5))
C.mount('/usr', '/mnt/usr', None, C.MS_BIND | C.MS_REC)
C.mount(None, '/mnt/usr', None,
        C.MS_REMOUNT | C.MS_BIND | C.MS_RDONLY | C.MS_NOSUID | C.MS_NODEV)
C.symlink('usr/bin', '/mnt/bin')
C.symlink('usr/lib', '/mnt/lib')
C.symlink('usr/lib64', '/mnt/lib64')

# --proc /proc
C.mkdir('/mnt/proc', mode(7, 5, 5))
C.mount('proc', '/mnt/proc', 'proc', C.MS_NOSUID | C.MS_NODEV | C.MS_NOEXEC)

# --dev /dev: a tmpfs with the six device nodes bound from the host, devpts,
# shm, and the usual symlinks
C.mkdir('/mnt/dev', mode(7, 5, 5))
C.mount('tmpfs', '/mnt/dev', 'tmpfs', C.MS_NOSUID | C.MS_NODEV, 'mode=0755')
for node in ('null', 'zero', 'full', 'random', 'urandom', 'tty'):
    C.mknod('/mnt/dev/' + node, mode(4, 4, 4), 0)
    C.mount('/dev/' + node, '/mnt/dev/' + node, None, C.MS_BIND | C.MS_NOSUID)
for i, name in enumerate(('stdin', 'stdout', 'stderr')):
    C.symlink('/proc/self/fd/' + str(i), '/mnt/dev/' + name)
C.symlink('/proc/self/fd', '/mnt/dev/fd')
C.symlink('/proc/kcore', '/mnt/dev/core')
C.mkdir('/mnt/dev/shm', mode(7, 5, 5))
C.mkdir('/mnt/dev/pts', mode(7, 5, 5))
C.mount('devpts', '/mnt/dev/pts', 'devpts', C.MS_NOSUID | C.MS_NOEXEC,
        'newinstance,ptmxmode=0666,mode=620')
C.symlink('pts/ptmx', '/mnt/dev/ptmx')

# --tmpfs /tmp
C.mkdir('/mnt/tmp', mode(7, 5, 5))
C.mount('tmpfs', '/mnt/tmp', 'tmpfs', C.MS_NOSUID | C.MS_NODEV, 'mode=0755')

# the new root, with the old one detached
C.chdir('/mnt')
C.pivot_root('.', '.')
C.umount2('.', C.MNT_DETACH)
C.chdir('/')
"""

EXPECTED_ROOT = ["bin", "dev", "lib", "lib64", "proc", "tmp", "usr"]

ALL_NS = {"newns_user": True, "newns_mount": True, "newns_pid": True, "newns_net": True,
          "newns_uts": True, "newns_ipc": True}
NO_USER_NS = {**ALL_NS, "newns_user": False}


async def container_actor(inbox: Any) -> None:
    """Brings lo up (as bwrap does), then replies once with what it sees."""
    import fcntl
    import struct

    msg = await inbox.receive()
    report: dict[str, Any] = {"pid": os.getpid()}
    if msg["lo_up"]:
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = fcntl.ioctl(s, siocgifflags, struct.pack("16sH14x", b"lo", 0))
            flags = struct.unpack_from("16sH", ifr)[1]
            fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))
            if msg["check"]:
                ifr = fcntl.ioctl(s, siocgifflags, struct.pack("16sH14x", b"lo", 0))
                report["lo_up"] = bool(struct.unpack_from("16sH", ifr)[1] & iff_up)
    if msg["check"]:
        report["root"] = sorted(os.listdir("/"))
        report["dev"] = sorted(os.listdir("/dev"))
    await msg["reply_to"].send(report)


def write_root_maps(pid: int) -> None:
    """uid/gid map ``0 0 1``: the map bwrap writes when run as root."""
    for name, data in (("uid_map", b"0 0 1\n"), ("setgroups", b"deny"), ("gid_map", b"0 0 1\n")):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


Result = tuple[list[tuple[Stats, Stats]], dict[str, Any], Stats]


def bench_pactors(bwrap: str, runs: int, warmup: int) -> Result:
    import pactors

    async def main() -> Result:
        inbox = pactors.current_inbox()

        async def once(ns: dict[str, bool], init: bool, check: bool = False
                       ) -> tuple[float, float, Any]:
            userns = ns.get("newns_user", False)
            host = guest = None
            if init and userns:
                host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            t0 = time.perf_counter()
            try:
                spec = pactors.Subprocess(
                    **ns, stdout="share", stderr="share",
                    init=pactors.Init(BWRAP_LIKE_INIT, guest) if init else None)
                actor = await pactors.spawn_actor(container_actor, subprocess=spec)
                if guest is not None:
                    guest.close()
                if userns and init:
                    assert actor.child_pid is not None and host is not None
                    write_root_maps(actor.child_pid)
                    host.send(b".")
                await actor.send({"reply_to": inbox.address, "check": check,
                                  "lo_up": ns.get("newns_net", False)})
                try:
                    report = await inbox.receive()
                except pactors.NoSenders:
                    await actor.wait()  # raises the actor's InitError or ActorError
                    raise
                t1 = time.perf_counter()
                status = await actor.wait()
                t2 = time.perf_counter()
            finally:
                if host is not None:
                    host.close()
            if status != 0:
                raise RuntimeError(f"the container actor exited with {status}")
            return t1 - t0, t2 - t0, report

        variants: list[tuple[str, dict[str, bool], bool]] = [
            ("pactors, 6 ns + bwrap-like init, userns maps 0 0 1 (headline)", ALL_NS, True),
            ("pactors, 5 ns (no userns) + bwrap-like init", NO_USER_NS, True),
            ("pactors, 6 ns, no init script", ALL_NS, False),
            ("pactors, 5 ns (no userns), no init script", NO_USER_NS, False),
            ("pactors, no namespaces, no init script", {}, False),
        ]
        # One checked run first: the init script really built bwrap's tree.
        _, _, check = await once(ALL_NS, True, check=True)
        # Round robin, bwrap included, so that the machine's drift hits all alike.
        to_reply: list[list[float]] = [[] for _ in variants]
        to_exit: list[list[float]] = [[] for _ in variants]
        bwrap_samples: list[float] = []
        for i in range(warmup + runs):
            for k, (_, ns, init) in enumerate(variants):
                reply_s, exit_s, _ = await once(ns, init)
                if i >= warmup:
                    to_reply[k].append(reply_s)
                    to_exit[k].append(exit_s)
            elapsed = run_bwrap(bwrap)
            if i >= warmup:
                bwrap_samples.append(elapsed)
        results = [(Stats(name, to_reply[k]), Stats(name, to_exit[k]))
                   for k, (name, _, _) in enumerate(variants)]
        return results, check, Stats("bwrap ... /bin/true (fork + exec + wait)", bwrap_samples)

    return pactors.run(main)  # type: ignore[no-any-return]


def run_bwrap(bwrap: str) -> float:
    """Seconds for fork + exec + wait of the bwrap command."""
    t0 = time.perf_counter()
    pid = os.posix_spawn(bwrap, [bwrap, *BWRAP_ARGS], {"PATH": "/usr/bin:/bin"})
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bwrap failed with status {status}")
    return elapsed


def run(runs: int = 80) -> None:
    bwrap_path = shutil.which("bwrap")
    if bwrap_path is None:
        raise SystemExit("bwrap is not installed (apt-get install bubblewrap)")
    if os.geteuid() != 0:
        raise SystemExit("this benchmark needs root (namespaces without a user namespace)")
    results, check, bwrap = bench_pactors(bwrap_path, runs, warmup=5)

    headline_reply, headline_exit = results[0]
    rows = []
    for to_reply, to_exit in results:
        rows.append([to_reply.name, to_reply.n, ms(to_reply.median), ms(to_reply.p90),
                     ms(to_exit.median), ratio(to_reply.median, bwrap.median)])
    rows.append([bwrap.name, bwrap.n, "-", "-", ms(bwrap.median), "1.00x"])
    print_table(["what", "runs", "to first reply, median ms", "p90 ms",
                 "to exit, median ms", "to reply / bwrap"], rows,
                title="Spawn into six namespaces with a bwrap-like root (issue 3)")
    ok_root = check.get("root") == EXPECTED_ROOT
    print(f"Variants and bwrap run round robin, {runs} rounds. Checked once: the "
          f"actor is pid {check.get('pid')}, sees / = {check.get('root')} "
          f"({'as bwrap' if ok_root else 'NOT as bwrap'}), lo up: {check.get('lo_up')}.\n")
    print_table(["target", "figure", "status"], [
        ["<= 2x bwrap (to first reply)", ratio(headline_reply.median, bwrap.median),
         target(headline_reply.median <= 2 * bwrap.median)],
        ["stretch: <= 1x bwrap", ratio(headline_reply.median, bwrap.median),
         target(headline_reply.median <= bwrap.median)],
        ["(to exit, the end point bwrap is timed to: <= 2x)",
         ratio(headline_exit.median, bwrap.median),
         target(headline_exit.median <= 2 * bwrap.median)],
    ], title="Namespace targets")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="pactors container spawn against bwrap")
    parser.add_argument("--runs", type=int, default=80, help="timed rounds (80)")
    args = parser.parse_args()
    enable_bytecode_cache()
    run(args.runs)


if __name__ == "__main__":
    main()
