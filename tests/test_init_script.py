"""Init-script runner on a real kernel: every script runs in a forked child.

The child unshares its own mount namespace and makes it private first, so
nothing it mounts reaches the host. Needs root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import tempfile
import textwrap
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import prctl
import pytest

from pactors import _linux
from pactors.subprocess_init import InitScriptFailure, run_init_script

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

Result = dict[str, Any]


def _run(script: str, *, newns: bool = True,
         before: Callable[[socket.socket], object] | None = None,
         interact: Callable[[int, socket.socket], None] | None = None,
         after: Callable[[], Result] | None = None,
         fds_out: list[int] | None = None) -> tuple[Result, list[bytes]]:
    """Run ``script`` in a child with ``arg`` = one end of a SEQPACKET pair.

    Returns the child's report and every message the script sent on ``arg``;
    fds passed with those messages go to ``fds_out`` (closed if it is None).
    ``after`` runs in the child after the script; it must not import anything.
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if before is not None:
        before(parent_sock)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            signal.alarm(5)  # a stuck script must not hang the test run
            os.close(rfd)
            parent_sock.close()
            if newns:
                _linux.unshare(_linux.CLONE_NEWNS)
                _linux.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE)
            buf = bytearray(textwrap.dedent(script).encode())
            report: Result = {"ok": True, "fields": None}
            try:
                run_init_script(buf, child_sock.fileno())
            except InitScriptFailure as exc:
                report = {"ok": False, "fields": exc.fields}
            report["zeroed"] = len(buf) > 0 and not any(buf)
            if after is not None:
                report.update(after())
            os.write(wfd, json.dumps(report).encode())
            os._exit(0)
        except BaseException:
            os.write(wfd, json.dumps({"crash": traceback.format_exc()}).encode())
            os._exit(1)
    os.close(wfd)
    child_sock.close()
    try:
        if interact is not None:
            interact(pid, parent_sock)
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
        os.waitpid(pid, 0)
        parent_sock.setblocking(False)
        messages = []
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 65536, 4)
            except BlockingIOError:
                break
            for fd in fds:
                if fds_out is None:
                    os.close(fd)
                else:
                    fds_out.append(fd)
            if not msg:
                break
            messages.append(msg)
    finally:
        os.close(rfd)
        parent_sock.close()
    report = json.loads(b"".join(chunks) or b'{"crash": "no report"}')
    assert "crash" not in report, report["crash"]
    return report, messages


@pytest.fixture
def empty_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pactors-init-")
    try:
        yield path
    finally:
        assert os.listdir(path) == [], "a mount leaked to the host"
        shutil.rmtree(path)


def test_pivot_root_into_tmpfs(empty_dir: str) -> None:
    script = f"""
        root = {empty_dir!r}
        C.umask(0)
        C.mount(None, root, 'tmpfs', C.MS_NOSUID, 'size=1m')
        C.mkdir(root + '/dev', mode(7, 5, 5))
        C.mknod(root + '/dev/null', mode(6, 6, 6), 0)
        C.mount('/dev/null', root + '/dev/null', None, C.MS_BIND)
        C.symlink('usr/bin', root + '/bin')
        C.mkdir(root + '/tmp', mode(7, 7, 7) | C.S_ISVTX)
        C.mkdir(root + '/mnt', mode(7, 5, 5))
        C.chdir(root)
        C.pivot_root('.', 'mnt')
        C.chroot('.')
        C.umount2('/mnt', C.MNT_DETACH)
        C.unshare(C.CLONE_NEWUTS)
        C.sethostname('inner')
    """

    def after() -> Result:
        with open("/dev/null", "w") as f:
            f.write("ok")
        return {
            "root": sorted(os.listdir("/")),
            "dev": os.listdir("/dev"),
            "mnt": os.listdir("/mnt"),
            "bin": os.readlink("/bin"),
            "tmp_mode": oct(os.stat("/tmp").st_mode & 0o7777),
            "null_is_chr": os.stat("/dev/null").st_rdev == os.makedev(1, 3),
            "hostname": os.uname().nodename,
        }

    with open("/proc/self/mountinfo") as f:
        host_mounts = f.read()
    report, _ = _run(script, after=after)
    with open("/proc/self/mountinfo") as f:
        assert f.read() == host_mounts
    assert report["ok"], report["fields"]
    assert report["root"] == ["bin", "dev", "mnt", "tmp"]
    assert report["dev"] == ["null"]
    assert report["mnt"] == []
    assert report["bin"] == "usr/bin"
    assert report["tmp_mode"] == oct(0o1777)
    assert report["null_is_chr"]
    assert report["hostname"] == "inner"
    assert report["zeroed"]
    assert os.uname().nodename != "inner"


def test_failing_mount_reports_call() -> None:
    script = """
        C.umask(0o22)
        C.mount(None, '/nonexistent/pactors', 'tmpfs', 0)
        C.write(arg, 'not reached')
    """
    report, messages = _run(script)
    assert not report["ok"]
    f = report["fields"]
    assert f["kind"] == "call"
    assert f["function"] == "mount"
    assert f["errno"] == errno.ENOENT
    assert f["errno_name"] == "ENOENT"
    assert f["strerror"] == os.strerror(errno.ENOENT)
    assert f["line"] == 3
    assert "'/nonexistent/pactors'" in f["arguments"]
    assert messages == []
    assert report["zeroed"]


def test_errexit_failure_cannot_be_swallowed() -> None:
    script = """
        try:
            C.mkdir('/nonexistent/a', 0)
        except:
            pass
        C.write(arg, 'not reached')
    """
    report, messages = _run(script)
    assert report["fields"]["kind"] == "call"
    assert report["fields"]["line"] == 3
    assert messages == []


def test_long_arguments_are_truncated() -> None:
    report, _ = _run("C.mkdir('/nonexistent/' + 'x' * 500, 0)\n")
    f = report["fields"]
    assert f["kind"] == "call"
    assert f["errno_name"] in ("ENOENT", "ENAMETOOLONG")
    assert len(f["arguments"]) <= 300
    assert f["arguments"].startswith("'/nonexistent/xxx")


def test_syntax_error() -> None:
    report, _ = _run("x = 1\ny = (\n")
    f = report["fields"]
    assert f["kind"] == "syntax"
    assert f["message"].startswith("SyntaxError: ")
    assert f["line"] == 2
    assert report["zeroed"]


def test_exception_in_nested_function() -> None:
    script = """
        def f(n):
            return 10 // n
        f(0)
    """
    report, _ = _run(script)
    f = report["fields"]
    assert f["kind"] == "exception"
    assert f["message"] == "ZeroDivisionError: integer division or modulo by zero"
    assert f["line"] == 3
    assert set(f) == {"kind", "message", "function", "arguments", "errno", "errno_name",
                      "strerror", "line"}


def test_errexit_false_returns_errno() -> None:
    script = """
        errexit = False
        C.umask(0o27)
        r1 = C.mkdir('/nonexistent/a', 0)
        r2 = C.umask(0o22)
        r3 = C.write(arg, 'x')
        r4 = receive_with_fd(arg, 100)
        errexit = True
        C.write(arg, repr([r1, r2, r3, r4]))
    """
    report, messages = _run(script, before=lambda sock: sock.send(b"hi"))
    assert report["ok"], report["fields"]
    # umask cannot fail and returns the old mask only, as in Emilua.
    assert messages == [b"x", repr([(None, errno.ENOENT), 0o27, (1, 0),
                                    ((b"hi", None), 0)]).encode()]


@pytest.mark.parametrize(("source", "message"), [
    ("__import__('os')", "NameError: name '__import__' is not defined"),
    ("open('/etc/passwd')", "NameError: name 'open' is not defined"),
    ("eval('1')", "NameError: name 'eval' is not defined"),
    ("getattr(C, 'read')", "NameError: name 'getattr' is not defined"),
    ("import os", "ImportError: __import__ not found"),
    ("C.nope", "AttributeError: C has no attribute 'nope'"),
])
def test_restricted_globals(source: str, message: str) -> None:
    report, _ = _run("x = 1\n" + source + "\n", newns=False)
    f = report["fields"]
    assert f["kind"] == "exception"
    assert f["message"] == message
    assert f["line"] == 2


def test_constants() -> None:
    script = """
        C.write(arg, repr([C.ENOENT, C.O_CLOEXEC, C.S_ISVTX, C.S_IFCHR, C.MS_BIND,
                           C.MNT_DETACH, C.CLONE_NEWUSER, C.SECBIT_NOROOT, mode(7, 5, 5),
                           arg >= 0, errexit]))
    """
    _, messages = _run(script, newns=False)
    assert messages == [repr([errno.ENOENT, os.O_CLOEXEC, 0o1000, 0o20000, 4096, 2,
                              0x10000000, 1, 0o755, True, True]).encode()]


def test_send_and_receive_with_fd() -> None:
    pipe_r, pipe_w = os.pipe()

    def before(sock: socket.socket) -> None:
        socket.send_fds(sock, [b"ping"], [pipe_w])
        sock.send(b"0123456789")

    script = """
        data, fd = receive_with_fd(arg, 100)
        C.write(fd, b'via-fd:' + data)
        errexit = False
        trunc = receive_with_fd(arg, 4)
        errexit = True
        C.write(arg, repr(trunc))
        send_with_fd(arg, 'hello', C.open('/dev/null', C.O_RDONLY))
    """
    fds: list[int] = []
    try:
        report, messages = _run(script, before=before, newns=False, fds_out=fds)
        os.close(pipe_w)
        assert report["ok"], report["fields"]
        assert os.read(pipe_r, 100) == b"via-fd:ping"
        assert messages == [repr((None, errno.EMSGSIZE)).encode(), b"hello"]
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_rdev == os.makedev(1, 3)
    finally:
        os.close(pipe_r)
        for fd in fds:
            os.close(fd)


def test_truncated_receive_reports_emsgsize() -> None:
    report, _ = _run("receive_with_fd(arg, 2)\n",
                     before=lambda sock: sock.send(b"too long"), newns=False)
    f = report["fields"]
    assert (f["kind"], f["function"], f["errno_name"]) == ("call", "receive_with_fd", "EMSGSIZE")


def test_execve_keeps_fds_opened_without_cloexec() -> None:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(wfd, 1)
            run_init_script(bytearray(
                b"fd = C.open('/dev/null', C.O_RDONLY)\n"
                b"C.execve('/bin/sh', ['sh', '-c', 'printf %s: \"$FOO\"; "
                b"readlink /proc/self/fd/' + str(fd)], {'FOO': 'bar'})\n"), None)
        finally:
            os._exit(3)
    os.close(wfd)
    try:
        out = b""
        while chunk := os.read(rfd, 4096):
            out += chunk
    finally:
        os.close(rfd)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert out == b"bar:/dev/null\n"


def test_script_is_zeroed_in_place() -> None:
    buf = bytearray(b"secret = 'hunter2'\n")
    before = id(buf)
    run_init_script(buf, None)
    assert id(buf) == before
    assert buf == bytearray(len(b"secret = 'hunter2'\n"))


def test_user_namespace_with_uid_map() -> None:
    script = """
        C.unshare(C.CLONE_NEWUSER)
        C.write(arg, '.')
        C.read(arg, 1)
        C.setresgid(0, 0, 0)
        C.setresuid(0, 0, 0)
        C.unshare(C.CLONE_NEWUTS)
        C.sethostname('userns')
    """

    def interact(pid: int, sock: socket.socket) -> None:
        assert sock.recv(1) == b"."
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write("0 0 1\n")
        sock.send(b".")

    def after() -> Result:
        with open("/proc/self/uid_map") as f:
            uid_map = f.read().split()
        return {"uid_map": uid_map, "hostname": os.uname().nodename}

    report, _ = _run(script, newns=False, interact=interact, after=after)
    assert report["ok"], report["fields"]
    assert report["uid_map"] == ["0", "0", "1"]
    assert report["hostname"] == "userns"


def test_capabilities_and_prctl() -> None:
    script = """
        C.cap_drop_bound('CAP_NET_RAW')
        C.cap_set_secbits(C.SECBIT_KEEP_CAPS)  # needs CAP_SETPCAP, dropped below
        C.cap_set_proc('cap_net_admin,cap_sys_admin=eip')
        C.cap_set_ambient('net_admin', True)
        errexit = False
        C.write(arg, repr(C.cap_set_ambient('cap_chown', True)))
        errexit = True
        C.set_pdeathsig(9)
        C.set_dumpable(False)
        set_no_new_privs()
    """

    def after() -> Result:
        with open("/proc/self/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines())
        fields = {name: status[name].strip()
                  for name in ("CapBnd", "CapEff", "CapAmb", "NoNewPrivs")}
        return {**fields, "pdeathsig": prctl.get_pdeathsig(),
                "dumpable": prctl.get_dumpable(), "securebits": prctl.get_securebits()}

    report, messages = _run(script, newns=False, after=after)
    assert report["ok"], report["fields"]
    net_admin, sys_admin, net_raw = 1 << 12, 1 << 21, 1 << 13
    assert int(report["CapBnd"], 16) & net_raw == 0
    assert int(report["CapEff"], 16) == net_admin | sys_admin
    assert int(report["CapAmb"], 16) == net_admin
    assert report["NoNewPrivs"] == "1"
    assert (report["pdeathsig"], report["dumpable"]) == (9, False)
    assert report["securebits"] == _linux.SECBIT_KEEP_CAPS
    assert messages == [repr((None, errno.EPERM)).encode()]


def test_linux_bindings() -> None:
    with pytest.raises(OSError) as info:
        _linux.umount2("/nonexistent/pactors", 0)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == "/nonexistent/pactors"
    assert _linux.cap_number("CAP_NET_ADMIN") == _linux.cap_number("net_admin") == 12
    with pytest.raises(ValueError):
        _linux.cap_number("cap_nonsense")
    with pytest.raises(OSError) as info:
        _linux.cap_set_proc("nonsense=ep")
    assert info.value.errno == errno.EINVAL
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        high = [os.dup2(devnull, fd) for fd in (700, 701, 702)]
        _linux.close_range(700, 702)
        for fd in high:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        os.close(devnull)
