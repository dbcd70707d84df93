"""pactors in new namespaces: the seed's container, init errors, PID 1, system.spawn.

Everything runs as root on the real kernel.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import anyio
import pytest
from conftest import is_spare
from seed_container import SEED_INIT_SCRIPT, SEED_ROOT

import pactors

ALL_NS = dict(newns_user=True, newns_mount=True, newns_pid=True, newns_net=True,
              newns_uts=True, newns_ipc=True)
PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

REPORT_APP = """
import os, socket
async def main(inbox):
    msg = await inbox.receive()
    def read(path):
        with open(path) as f:
            return f.read().strip()
    await msg["reply_to"].send({
        "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
        "hostname": socket.gethostname(), "root": sorted(os.listdir("/")),
        "net": sorted(os.listdir("/sys/class/net")),
        "lo_flags": int(read("/sys/class/net/lo/flags"), 16),
        "groups": os.getgroups(),
    })
"""


async def start_seed_container(app_source: str, **extra: Any) -> tuple[pactors.Actor, int]:
    """Runs the seed's host code: maps between sync points, lo up, /app.py."""
    shost, sguest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with shost:
        actor = await pactors.spawn_actor("/app.py", subprocess=pactors.Subprocess(
            **ALL_NS, init=pactors.Init(script=SEED_INIT_SCRIPT, arg=sguest),
            stdout="share", stderr="share", environment={"LANG": "C.UTF-8"}, **extra))
        sguest.close()
        pid = actor.child_pid
        assert pid is not None
        uidmap = os.open(f"/proc/{pid}/uid_map", os.O_WRONLY)
        setgroups = os.open(f"/proc/{pid}/setgroups", os.O_WRONLY)
        gidmap = os.open(f"/proc/{pid}/gid_map", os.O_WRONLY)
        userns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            # sync point #1: pid still valid, so the files opened are the child's
            shost.send(b".")
            assert shost.recv(1) == b"."
            os.write(uidmap, b"0 0 1\n1000 1000 1\n")
            os.write(setgroups, b"allow")
            os.write(gidmap, b"0 0 1\n1000 1000 1\n")
            # sync point #2
            shost.send(b".")
            ip = pactors.system.spawn("ip", ["ip", "link", "set", "dev", "lo", "up"],
                                      environment=PATH_ENV, stderr="share",
                                      nsenter_user=userns, nsenter_net=netns)
            assert await ip.wait() == 0
            _, fds, _, _ = socket.recv_fds(shost, 1, 1)
            with open(fds[0], "w") as module:
                module.write(app_source)
        finally:
            for fd in (uidmap, setgroups, gidmap, userns, netns):
                os.close(fd)
    # sync point #3 is the close of shost
    return actor, pid


def test_seed_container_end_to_end() -> None:
    async def main() -> dict[str, Any]:
        actor, _ = await start_seed_container(REPORT_APP)
        inbox = pactors.current_inbox()
        await actor.send({"reply_to": inbox.address})
        report = await inbox.receive()
        assert await actor.wait() == 0
        return report  # type: ignore[no-any-return]

    report = pactors.run(main)
    assert report["pid"] == 2  # PID 1 is the reaper
    assert report["uid"] == 1000 and report["gid"] == 1000
    assert report["groups"] == []
    assert report["hostname"] == "packxd-test"
    assert report["root"] == SEED_ROOT
    assert report["net"] == ["lo"]
    assert report["lo_flags"] & 1, "system.spawn's `ip link set lo up` did not reach the container"


EMPTY_ROOT_SCRIPT = r"""
C.read(arg, 1)
C.mount(None, '/', None, C.MS_PRIVATE | C.MS_REC)
C.mount(None, '/mnt', 'tmpfs', 0, 'mode=0755')
C.mkdir('/mnt/old', mode(7, 0, 0))
C.chdir('/mnt')
C.pivot_root('.', '/mnt/old')
C.chroot('.')
C.umount2('/old', C.MNT_DETACH)
send_with_fd(arg, '.', C.open('/app.py', C.O_WRONLY | C.O_CREAT, mode(6, 4, 4)))
C.read(arg, 1)
"""

EMPTY_ROOT_APP = """
import os
async def main(inbox):
    msg = await inbox.receive()
    await msg["reply_to"].send({"root": sorted(os.listdir("/")), "old": os.listdir("/old"),
                                "echo": msg["echo"], "fd": msg["fd"]})
    raise LookupError("the traceback is formatted without the host filesystem")
"""


def test_runtime_survives_pivot_root_into_empty_tmpfs() -> None:
    async def main() -> tuple[dict[str, Any], BaseException]:
        shost, sguest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        actor = await pactors.spawn_actor("/app.py", subprocess=pactors.Subprocess(
            newns_user=True, newns_mount=True, init=pactors.Init(EMPTY_ROOT_SCRIPT, sguest)))
        sguest.close()
        write_root_maps(actor.child_pid)
        shost.send(b".")
        _, fds, _, _ = socket.recv_fds(shost, 1, 1)
        with open(fds[0], "w") as module:
            module.write(EMPTY_ROOT_APP)
        shost.close()
        r, w = os.pipe()
        inbox = pactors.current_inbox()
        await actor.send({"reply_to": inbox.address, "echo": [1, "two", b"3", (4.0,)],
                          "fd": pactors.Fd(w)})
        os.close(w)
        os.close(r)
        report = await inbox.receive()
        report["fd"].close()
        with pytest.raises(pactors.ActorError) as info:
            await actor.wait()
        return report, info.value

    report, error = pactors.run(main)
    assert report["root"] == ["app.py", "old"]
    assert report["old"] == []
    assert report["echo"] == [1, "two", b"3", (4.0,)]
    assert error.type_name == "LookupError"
    assert "without the host filesystem" in error.traceback_text


ORPHAN_APP = """
import os, signal, time
got = []
async def main(inbox):
    import anyio
    signal.signal(signal.SIGTERM, lambda *_: got.append("TERM"))
    msg = await inbox.receive()
    # Orphan a grandchild: the middle process exits at once.
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            time.sleep(0.2)
            os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)
    await msg["reply_to"].send("orphaned")
    while not got:
        await anyio.sleep(0.01)
    await msg["reply_to"].send(got[0])
    return 3
"""


def write_root_maps(pid: int | None) -> None:
    """Maps root to root in the child's new user namespace."""
    assert pid is not None
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write("0 0 1\n")
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write("0 0 1\n")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_pid1_reaps_orphans_and_forwards_sigterm(tmp_path: Any) -> None:
    app = tmp_path / "orphan_app.py"
    app.write_text(ORPHAN_APP)

    async def main() -> tuple[int, list[int], str]:
        actor = await pactors.spawn_actor(str(app), subprocess=pactors.Subprocess(
            newns_user=True, newns_pid=True))
        pid1 = actor.child_pid
        assert pid1 is not None
        write_root_maps(pid1)
        inbox = pactors.current_inbox()
        await actor.send({"reply_to": inbox.address})
        assert await inbox.receive() == "orphaned"
        # The orphan is PID 1's child now; it exits after 0.2 s and is reaped.
        deadline = time.monotonic() + 5
        while len(_children(pid1)) > 1 and time.monotonic() < deadline:
            await anyio.sleep(0.02)
        children = _children(pid1)
        actor.kill(signal.SIGTERM)  # sent to PID 1, which forwards it
        got = await inbox.receive()
        return await actor.wait(), children, got

    status, children, got = pactors.run(main)
    assert len(children) == 1, f"PID 1 still has children besides the actor: {children}"
    assert got == "TERM"
    assert status == 3


def test_sigterm_to_pid1_kills_actor_without_handler() -> None:
    async def sleeper(inbox: pactors.Inbox) -> None:
        await anyio.sleep(30)

    async def main() -> int:
        actor = await pactors.spawn_actor(sleeper, subprocess=pactors.Subprocess(
            newns_user=True, newns_pid=True))
        write_root_maps(actor.child_pid)
        await anyio.sleep(0.3)
        actor.kill(signal.SIGTERM)
        return await actor.wait()

    assert pactors.run(main) == 128 + signal.SIGTERM


def _init_error(script: str, **ns: Any) -> tuple[pactors.InitError, BaseException | None]:
    async def main() -> tuple[pactors.InitError, BaseException | None]:
        async def never(inbox: pactors.Inbox) -> None:
            raise AssertionError("the actor must not start after a failed init")

        actor = await pactors.spawn_actor(never, subprocess=pactors.Subprocess(
            init=pactors.Init(script), stderr=None, **ns))
        with pytest.raises(pactors.InitError) as info:
            await actor.wait()
        later: BaseException | None = None
        try:
            await actor.send("hello")
        except pactors.PactorsError as e:
            later = e
        return info.value, later

    return pactors.run(main)  # type: ignore[no-any-return]


def test_init_error_failing_mount_reports_errno_and_line() -> None:
    error, later = _init_error("x = 1\nC.mount(None, '/nonexistent-dir', 'tmpfs', 0)\n",
                               newns_user=True, newns_mount=True)
    assert error.kind == "call"
    assert error.function == "mount"
    assert error.errno == errno.ENOENT
    assert error.errno_name == "ENOENT"
    assert error.strerror == os.strerror(errno.ENOENT)
    assert error.line == 2
    assert "/nonexistent-dir" in (error.arguments or "")
    assert isinstance(later, pactors.InitError), "a later send must raise the InitError"


def test_init_error_syntax() -> None:
    error, _ = _init_error("C.umask(0)\ndef broken(:\n")
    assert error.kind == "syntax"
    assert error.line == 2
    assert "SyntaxError" in error.message


def test_init_error_exception() -> None:
    error, _ = _init_error("C.umask(0)\n\nraise ValueError('no such thing')\n")
    assert error.kind == "exception"
    assert error.line == 3
    assert "ValueError: no such thing" in error.message


def test_init_errexit_false_returns_result_and_errno() -> None:
    script = textwrap.dedent("""
        errexit = False
        result, err = C.mount(None, '/nonexistent-dir', 'tmpfs', 0)
        if err != C.ENOENT or result is not None:
            raise RuntimeError('errexit=False gave ' + repr((result, err)))
        C.write(arg, 'ok')
    """)

    async def main() -> bytes:
        host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with host:
            async def quiet(inbox: pactors.Inbox) -> None:
                return None

            actor = await pactors.spawn_actor(quiet, subprocess=pactors.Subprocess(
                newns_user=True, newns_mount=True, init=pactors.Init(script, guest)))
            guest.close()
            assert await actor.wait() == 0
            return host.recv(16)

    assert pactors.run(main) == b"ok"


def test_init_error_is_printed_when_stderr_is_shared(tmp_path: Any) -> None:
    program = tmp_path / "prog.py"
    program.write_text(textwrap.dedent("""
        import pactors
        async def never(inbox):
            pass
        async def main():
            actor = await pactors.spawn_actor(never, subprocess=pactors.Subprocess(
                init=pactors.Init("C.chdir('/no/such/dir')")))
            try:
                await actor.wait()
            except pactors.InitError as e:
                print("parent got", e.errno_name)
        pactors.run(main)
    """))
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True,
                         timeout=60)
    assert "parent got ENOENT" in out.stdout
    assert "C.chdir('/no/such/dir') failed: ENOENT" in out.stderr


def test_init_arg_and_script_fds_are_closed_before_the_actor_runs() -> None:
    async def fds(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        links = {}
        for name in os.listdir("/proc/self/fd"):
            try:
                links[name] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass
        await msg["reply_to"].send(links)

    async def main() -> tuple[dict[str, str], int]:
        host, guest = socket.socketpair()
        with host:
            guest_inode = os.fstat(guest.fileno()).st_ino
            actor = await pactors.spawn_actor(fds, subprocess=pactors.Subprocess(
                stdin="share", init=pactors.Init("extra = C.open('/dev/null', C.O_RDONLY)",
                                                 guest)))
            guest.close()
            inbox = pactors.current_inbox()
            await actor.send({"reply_to": inbox.address})
            links = await inbox.receive()
            await actor.wait()
            return links, guest_inode  # type: ignore[return-value]

    links, guest_inode = pactors.run(main)
    assert {"0", "1", "2", "3"} <= set(links)
    assert f"socket:[{guest_inode}]" not in links.values(), "the init arg leaked into the actor"
    assert "/dev/null" not in [t for fd, t in links.items() if int(fd) > 2], \
        "a descriptor the init script opened leaked into the actor"


def test_system_spawn_errors_are_raised_with_errno() -> None:
    with pytest.raises(FileNotFoundError):
        pactors.system.spawn("no-such-program-anywhere", ["x"], environment=PATH_ENV)
    with open("/dev/null") as not_a_namespace, pytest.raises(OSError) as info:
        pactors.system.spawn("true", ["true"], environment=PATH_ENV,
                             nsenter_net=not_a_namespace.fileno())
    assert info.value.errno == errno.EINVAL
    assert "setns net" in str(info.value)
    with pytest.raises(OSError) as info:
        pactors.system.spawn("true", ["true"], environment=PATH_ENV,
                             working_directory="/no/such/dir")
    assert info.value.errno == errno.ENOENT and "chdir" in str(info.value)


@pytest.mark.parametrize("kwargs, what", [
    ({"program": "tr\0ue"}, "program"),
    ({"arguments": ["true", "a\0b"]}, "arguments"),
    ({"environment": {"A": "b\0c"}}, "environment"),
    ({"environment": {"A=B": "c"}}, "environment names"),
    ({"working_directory": "/tmp\0x"}, "working_directory"),
])
@pytest.mark.parametrize("pdeathsig", [None, signal.SIGTERM], ids=["vfork", "fork"])
def test_system_spawn_refuses_nul_the_same_way_on_both_paths(
        kwargs: dict[str, Any], what: str, pdeathsig: int | None) -> None:
    args: dict[str, Any] = {"program": "true", "arguments": ["true"],
                            "environment": PATH_ENV, **kwargs}
    with pytest.raises(ValueError, match=f"system.spawn: {what}"):
        pactors.system.spawn(args.pop("program"), args.pop("arguments"), pdeathsig=pdeathsig,
                             **args)


def test_system_spawn_exit_codes_kill_and_credentials(tmp_path: Any) -> None:
    async def main() -> None:
        p = pactors.system.spawn("sh", ["sh", "-c", "exit 7"], environment=PATH_ENV)
        assert await p.wait() == 7 and p.exit_signal is None
        p = pactors.system.spawn("sleep", ["sleep", "30"], environment=PATH_ENV)
        p.kill(signal.SIGTERM)
        assert await p.wait() == 128 + signal.SIGTERM and p.exit_signal == signal.SIGTERM
        out = tmp_path / "id"
        with open(out, "w") as f:
            p = pactors.system.spawn(
                "sh", ["sh", "-c", "id -u; id -g; id -G; umask; pwd"], environment=PATH_ENV,
                stdout=f, uid=65534, gid=65534, groups=[], umask=0o027,
                working_directory="/tmp", start_new_session=True)
            assert await p.wait() == 0
        assert out.read_text().split() == ["65534", "65534", "65534", "0027", "/tmp"]

    pactors.run(main)


@pytest.mark.parametrize("ignore_usr1", [False, True])
def test_system_spawn_gives_the_program_a_clean_start(
        tmp_path: Any, ignore_usr1: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default signal dispositions, an empty mask, only stdio open, the
    directory, umask and session asked for: on the vfork path and on the
    fork path (taken here when the caller ignores a signal)."""
    vforked: list[bool] = []
    real = pactors.system._vfork_spawn
    monkeypatch.setattr(pactors.system, "_vfork_spawn",
                        lambda *a: vforked.append(True) or real(*a))
    out = tmp_path / "out"
    r, w = os.pipe()
    os.set_inheritable(w, True)  # a descriptor that exec alone would not close
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN if ignore_usr1 else signal.SIG_DFL)
    try:
        async def main() -> int:
            with open(out, "w") as f:
                script = ("ls /proc/self/fd; grep -E '^Sig(Ign|Blk)' /proc/self/status; pwd; "
                          "umask; echo $$; cut -d' ' -f6 /proc/$$/stat")
                p = pactors.system.spawn("sh", ["sh", "-c", script], environment=PATH_ENV,
                                         stdout=f, working_directory=str(tmp_path),
                                         umask=0o027, start_new_session=True)
                return await p.wait()

        assert pactors.run(main) == 0
    finally:
        signal.signal(signal.SIGUSR1, old)
        os.close(r)
        os.close(w)
    assert vforked == ([] if ignore_usr1 else [True])
    lines = out.read_text().split("\n")
    # sh itself opens one descriptor to list them (3); nothing else is open.
    assert lines[:4] == ["0", "1", "2", "3"]
    assert "SigIgn:\t0000000000000000" in lines
    assert "SigBlk:\t0000000000000000" in lines
    pid, sid = lines[-3:-1]
    assert lines[-5:-3] == [str(tmp_path), "0027"]
    assert sid == pid  # a session of its own


def test_system_spawn_pdeathsig() -> None:
    """The program gets the signal when the process that spawned it dies."""
    import prctl

    r, w = os.pipe()
    prctl.set_child_subreaper(1)  # the orphaned program comes to us, to be reaped
    try:
        spawner = os.fork()
        if spawner == 0:
            os.close(r)
            p = pactors.system.spawn("sleep", ["sleep", "30"], environment=PATH_ENV,
                                     pdeathsig=signal.SIGTERM)
            os.write(w, str(p.pid).encode())
            os._exit(0)  # the spawner dies; its program must follow
        os.close(w)
        pid = int(os.read(r, 32))
        os.waitpid(spawner, 0)
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        os.close(r)
        prctl.set_child_subreaper(0)


SPAWNER = r"""
import os, sys, pactors

SCRIPT = '''
C.read(arg, 1)
C.setresgid(1000, 1000, 1000)
C.setresuid(1000, 1000, 1000)
'''

async def sleeper(inbox):
    import anyio
    await anyio.sleep(60)

async def main():
    import socket
    host, guest = socket.socketpair()
    actor = await pactors.spawn_actor(sleeper, subprocess=pactors.Subprocess(
        newns_user=True, newns_pid=True, init=pactors.Init(SCRIPT, guest)))
    guest.close()
    pid = actor.child_pid
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write("0 0 1\n1000 1000 1\n")
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write("0 0 1\n1000 1000 1\n")
    host.send(b".")
    import anyio
    await anyio.sleep(0.3)  # the script has changed credentials by now
    print(pid, flush=True)
    if sys.argv[1] == "return":
        return
    await anyio.sleep(60)

pactors.run(main)
"""


@pytest.mark.parametrize("how", ["return", "sigkill"])
def test_a_container_whose_init_changed_credentials_dies_with_its_spawner(
        tmp_path: Any, how: str) -> None:
    """Changing credentials clears the parent-death signal; pactors sets it again."""
    program = tmp_path / "spawner.py"
    program.write_text(SPAWNER)
    proc = subprocess.Popen([sys.executable, str(program), how], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        pid1 = int(proc.stdout.readline())
        assert os.path.exists(f"/proc/{pid1}")
        if how == "sigkill":
            proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid1}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{pid1}"), "PID 1 outlived its spawner"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- warm spares for namespace spawns ------------------------------------------


async def report_namespaces(inbox: pactors.Inbox) -> None:
    """Reports its namespaces (and a listing), then lives until told to go:
    the kernel reuses a freed namespace's inode number."""
    msg = await inbox.receive()
    await msg["reply_to"].send({
        "ns": {name: os.stat(f"/proc/self/ns/{name}").st_ino for name in ("net", "mnt", "user")},
        "listing": sorted(os.listdir(msg["list"])) if msg.get("list") else None,
    })
    await inbox.receive()


async def _report(spec: pactors.Subprocess, listing: str | None = None
                  ) -> tuple[pactors.Actor, dict[str, Any]]:
    inbox = pactors.current_inbox()
    actor = await pactors.spawn_actor(report_namespaces, subprocess=spec)
    await actor.send({"reply_to": inbox.address, "list": listing})
    return actor, await inbox.receive()


async def _finish(actors: list[pactors.Actor]) -> None:
    for actor in actors:
        await actor.send("go")
        assert await actor.wait() == 0


def _spare_pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit() and is_spare(int(name))}


def test_every_namespace_spawn_gets_fresh_namespaces() -> None:
    """After the first spawn, spawns with the same flags are served by a spare
    cloned ahead of time: each must still get namespaces of its own."""
    spec = pactors.Subprocess(newns_user=True, newns_mount=True, newns_net=True,
                              stdout="share", stderr="share")

    async def main() -> tuple[list[dict[str, int]], list[bool]]:
        actors, reports, warm = [], [], []
        for _ in range(4):
            spares = _spare_pids()
            actor, report = await _report(spec)
            actors.append(actor)
            reports.append(report["ns"])
            warm.append(actor.child_pid in spares)
            await anyio.sleep(0.05)  # let the supervisor make the next spare
        await _finish(actors)
        return reports, warm

    reports, warm = pactors.run(main)
    # A spare is made after the second spawn; a mount elsewhere on the host
    # meanwhile would discard it, so the fourth spawn gets the next one.
    assert warm[:2] == [False, False] and any(warm[2:]), warm
    host = {name: os.stat(f"/proc/self/ns/{name}").st_ino for name in ("net", "mnt", "user")}
    for name in host:
        seen = [r[name] for r in reports]
        assert len(set(seen)) == len(seen), f"two actors shared a {name} namespace"
        assert host[name] not in seen


def test_a_mount_made_after_the_spare_is_seen(tmp_path: Any) -> None:
    """A spare copied the mount table when it was made; a mount made since
    (one that does not propagate) must still be seen by the next spawn."""
    base = str(tmp_path / "base")
    os.mkdir(base)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", base], check=True)
    try:
        subprocess.run(["mount", "--make-private", base], check=True)
        os.mkdir(f"{base}/sub")
        spec = pactors.Subprocess(newns_mount=True, stdout="share", stderr="share")

        async def main() -> tuple[list[str], list[str]]:
            for _ in range(2):  # a spare is made after the second spawn with these flags
                first, before = await _report(spec, f"{base}/sub")
                await _finish([first])
            await anyio.sleep(0.2)  # the spare for these flags exists by now
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", f"{base}/sub"],
                           check=True)
            with open(f"{base}/sub/marker", "w"):
                pass
            second, after = await _report(spec, f"{base}/sub")
            await _finish([second])
            return before["listing"], after["listing"]

        before, after = pactors.run(main)
        assert before == []
        assert after == ["marker"], "the spawn ran in a stale copy of the mount table"
    finally:
        subprocess.run(["umount", "-R", base], check=True)


async def report_signals(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    with open("/proc/self/status") as f:
        fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    await msg["reply_to"].send({k: int(fields[k], 16) for k in ("SigIgn", "SigBlk")})


@pytest.mark.parametrize("ns", [{}, {"newns_uts": True}, ALL_NS], ids=["plain", "uts", "all"])
def test_actors_start_with_default_signals(ns: dict[str, bool]) -> None:
    """Whatever the spawner ignored or blocked, an actor starts as a fresh
    interpreter does: only SIGPIPE and SIGXFSZ ignored, nothing blocked."""
    spec = pactors.Subprocess(stdout="share", stderr="share", **ns)

    async def main() -> list[dict[str, int]]:
        inbox = pactors.current_inbox()
        reports = []
        for _ in range(3):  # forked twice, then by a spare made meanwhile
            actor = await pactors.spawn_actor(report_signals, subprocess=spec)
            await actor.send({"reply_to": inbox.address})
            reports.append(await inbox.receive())
            assert await actor.wait() == 0
            await anyio.sleep(0.05)
        return reports

    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGUSR1, signal.SIGHUP)}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        reports = pactors.run(main)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    fresh = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
    assert reports == [{"SigIgn": fresh, "SigBlk": 0}] * 3


def test_pid1_keeps_no_stdio() -> None:
    """PID 1 only reaps: a pipe given as stdout reaches EOF when the actor
    and its programs close it, not when the namespace is torn down."""
    r, w = os.pipe()
    spec = pactors.Subprocess(newns_pid=True, newns_mount=True, stdin=None, stdout=w,
                              stderr=w)

    async def main() -> set[int]:
        actor, _ = await _report(spec)
        assert actor.child_pid is not None
        fd_dir = f"/proc/{actor.child_pid}/fd"  # the host's view of PID 1
        deadline = time.monotonic() + 5  # it closes them right after its fork
        while {0, 1, 2} & (fds := {int(fd) for fd in os.listdir(fd_dir)}) \
                and time.monotonic() < deadline:
            await anyio.sleep(0.01)
        await _finish([actor])
        return fds

    try:
        fds = pactors.run(main)
    finally:
        os.close(r)
        os.close(w)
    assert not {0, 1, 2} & fds, fds


def test_spares_are_bounded_and_a_dead_one_is_replaced_by_a_fork() -> None:
    """At most MAX_SPARES sets of flags keep a spare (the oldest goes), and a
    spawn whose spare has died forks as usual."""
    from pactors._supervisor import MAX_SPARES

    flag_sets = [{"newns_uts": True}, {"newns_ipc": True}, {"newns_uts": True, "newns_ipc": True},
                 {"newns_net": True}, {"newns_mount": True}, {"newns_net": True, "newns_uts": True}]
    assert len(flag_sets) > MAX_SPARES

    async def main() -> tuple[int, list[bool]]:
        sup = pactors._runtime._context().runtime.supervisor().pid
        for ns in flag_sets:
            for _ in range(2):  # a spare is made after the second spawn
                actor, _ = await _report(pactors.Subprocess(stdout="share", **ns))
                await _finish([actor])
            await anyio.sleep(0.05)
        def spare_pids() -> set[int]:
            return {pid for pid in _spare_pids() if _ppid(pid) == sup}

        # The last spare is cloned after its spawn's reply: give it time.
        deadline = time.monotonic() + 10
        while len(spare_pids()) < MAX_SPARES and time.monotonic() < deadline:
            await anyio.sleep(0.01)
        await anyio.sleep(0.1)  # an evicted spare would be gone, an extra one made
        spares = spare_pids()
        for pid in spares:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_state(pid) not in (None, "Z") for pid in spares) \
                and time.monotonic() < deadline:
            await anyio.sleep(0.01)
        warm = []
        for ns in flag_sets[-2:]:  # their spares are dead: the spawns fork
            actor, _ = await _report(pactors.Subprocess(stdout="share", **ns))
            warm.append(actor.child_pid in spares)
            await _finish([actor])
        return len(spares), warm

    count, warm = pactors.run(main)
    assert count == MAX_SPARES
    assert warm == [False, False]


def _ppid(pid: int) -> int:
    """The parent's pid, or 0 once ``pid`` is gone (a spare may exit at any time)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
