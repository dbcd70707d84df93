"""``pactors.system.spawn``: run a program, optionally inside other namespaces.

Like Emilua's ``system.spawn``, the program is forked from the calling
process, so an actor inside a container spawns inside the container.

Order of operations in the child, each checked; a failure is sent over a
close-on-exec pipe and raised in the parent as OSError with the errno:

1. signal dispositions reset, signal mask cleared;
2. ``setns`` into user, mount, uts, ipc, net (in that order). Entering the
   user namespace first gives the caller the capabilities it needs for the
   other ``setns`` calls, and makes later ids refer to that namespace;
3. ``setsid`` when ``start_new_session``;
4. ``setgroups``, ``setresgid``, ``setresuid``: after ``setns``, because
   dropping privileges first would forbid entering the namespaces
   (Emilua 0.6 does it the other way round);
5. ``umask``; the parent-death signal (after the credential change, which
   would clear it); ``chdir``;
6. stdio, then every other descriptor closed; ``execvpe``.

When none of ``nsenter_*``, ``uid``, ``gid``, ``groups`` and ``pdeathsig`` is
given and no signal is blocked or ignored, nothing above needs Python in
the child: the program is started through ``subprocess`` instead, with
vfork(2), which spares the copy of this process's page tables and the
copy-on-write faults of a fork (2 ms for a 20 MiB interpreter, against
0.1 ms). The result is the same: default signal dispositions, an empty
mask, ``setsid``, ``umask``, ``chdir``, stdio, every other descriptor
closed, the same PATH search and errors.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import anyio

from . import _linux

_STAGES = ("setns user", "setns mount", "setns uts", "setns ipc", "setns net", "setsid",
           "setgroups", "setresgid", "setresuid", "umask", "pdeathsig", "chdir", "stdio",
           "execve")
_ERR = struct.Struct("<ii")

_NSENTER = (("nsenter_user", _linux.CLONE_NEWUSER), ("nsenter_mount", _linux.CLONE_NEWNS),
            ("nsenter_uts", _linux.CLONE_NEWUTS), ("nsenter_ipc", _linux.CLONE_NEWIPC),
            ("nsenter_net", _linux.CLONE_NEWNET))


class Process:
    """A program started by ``spawn``.

    ``exit_code`` is None until ``wait()`` returns; a process killed by
    signal N has ``exit_code`` 128+N and ``exit_signal`` N.
    """

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid: int | None = pid
        self._pidfd: int | None = pidfd
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    async def wait(self) -> int:
        """Waits for the process to exit, reaps it and returns its exit code."""
        while self.exit_code is None:
            if self._pidfd is None:
                raise RuntimeError("process handle was closed before it exited")
            await anyio.wait_readable(self._pidfd)
            self._try_reap()
        return self.exit_code

    def _try_reap(self) -> None:
        if self._pidfd is None or self.exit_code is not None:
            return
        try:
            result = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:  # somebody else reaped it: we cannot know how it ended
            result = None
            self.exit_code = 255
        if result is None:
            if self.exit_code is None:
                return
        elif result.si_code == os.CLD_EXITED:
            self.exit_code = result.si_status
        else:
            self.exit_signal = result.si_status
            self.exit_code = 128 + result.si_status
        self._close()

    def kill(self, signum: int = signal.SIGTERM) -> None:
        """Sends ``signum``; does nothing once the process has been reaped."""
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass

    def _close(self) -> None:
        if self._pidfd is not None:
            try:
                anyio.notify_closing(self._pidfd)
            except Exception:
                pass
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)

    def __repr__(self) -> str:
        state = "running" if self.exit_code is None else f"exit_code={self.exit_code}"
        return f"<pactors.system.Process pid={self.pid} {state}>"


def _fd_of(name: str, value: Any) -> int:
    if value is None or value == "share":
        return -1
    fd = value if isinstance(value, int) and not isinstance(value, bool) else value.fileno()
    os.fstat(fd)  # raises EBADF in the parent, not in the child
    return int(fd)


def spawn(program: str, arguments: Sequence[str], *,
          environment: Mapping[str, str] | None = None,
          stdin: Any = None, stdout: Any = None, stderr: Any = None,
          working_directory: str | None = None,
          uid: int | None = None, gid: int | None = None, groups: Sequence[int] | None = None,
          umask: int | None = None, pdeathsig: int | None = None,
          start_new_session: bool = False,
          nsenter_user: Any = None, nsenter_mount: Any = None, nsenter_uts: Any = None,
          nsenter_ipc: Any = None, nsenter_net: Any = None) -> Process:
    """Starts ``program`` with ``arguments`` as its whole argv (argv[0] included).

    ``program`` without a "/" is searched in the PATH of ``environment``
    (None: an empty environment). stdio: ``"share"`` (this process's fd),
    a descriptor, or None (/dev/null). ``uid``/``gid`` set real, effective
    and saved ids; ``nsenter_*`` are namespace descriptors. Returns once the
    program has been executed; failures before that raise OSError.
    """
    argv = [os.fsencode(a) for a in arguments]
    if not argv:
        raise ValueError("arguments must hold at least argv[0]")
    env = {os.fsencode(k): os.fsencode(v) for k, v in (environment or {}).items()}
    stdio = [(_fd_of(name, value), value == "share")
             for name, value in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr))]
    given = {"nsenter_user": nsenter_user, "nsenter_mount": nsenter_mount,
             "nsenter_uts": nsenter_uts, "nsenter_ipc": nsenter_ipc, "nsenter_net": nsenter_net}
    nsenter = [(_fd_of(name, given[name]), nstype) for name, nstype in _NSENTER
               if given[name] is not None]
    prog = os.fsencode(program)
    cwd = os.fsencode(working_directory) if working_directory is not None else None
    group_list = list(groups) if groups is not None else None
    # Refused here, the same way on both paths below.
    for what, values in (("program", [prog]), ("arguments", argv),
                         ("environment", [*env, *env.values()]),
                         ("working_directory", [cwd] if cwd is not None else [])):
        if any(b"\0" in v for v in values):
            raise ValueError(f"system.spawn: {what} must not contain NUL characters")
    if any(not k or b"=" in k for k in env):
        raise ValueError("system.spawn: environment names must be non-empty, without '='")

    if not nsenter and uid is None and gid is None and groups is None and pdeathsig is None \
            and _signals_at_default():
        return _vfork_spawn(program, prog, argv, env, stdio, cwd, umask, start_new_session)

    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(err_w, parent, prog, argv, env, stdio, nsenter, cwd, uid, gid, group_list,
               umask, pdeathsig, start_new_session)
    os.close(err_w)
    pidfd = os.pidfd_open(pid)
    try:
        report = b""
        while chunk := os.read(err_r, _ERR.size - len(report)):
            report += chunk
            if len(report) == _ERR.size:
                break
    finally:
        os.close(err_r)
    proc = Process(pid, pidfd)
    if report:
        stage, err = _ERR.unpack(report.ljust(_ERR.size, b"\0"))
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
        proc._close()
        raise _failed(err, _STAGES[stage] if 0 <= stage < len(_STAGES) else "child setup",
                      program)
    return proc


def _failed(err: int, what: str, program: str) -> OSError:
    """The error of a failed start: errno, the step that failed, and as its
    filename the program when execve failed, else the step."""
    return OSError(err, f"{os.strerror(err)} ({what} for {program!r})",
                   program if what == "execve" else what)


# subprocess resets these two itself (``restore_signals``); exec resets handlers.
_RESTORED = (signal.SIGPIPE, signal.SIGXFSZ)


def _signals_at_default() -> bool:
    """Whether a vfork'ed child would start with every signal at its default:
    no signal blocked, none ignored but those ``restore_signals`` resets."""
    if signal.pthread_sigmask(signal.SIG_BLOCK, []):
        return False
    return not any(signal.getsignal(sig) is signal.SIG_IGN
                   for sig in signal.valid_signals() if sig not in _RESTORED)


def _vfork_spawn(program: str, prog: bytes, argv: list[bytes], env: dict[bytes, bytes],
                 stdio: list[tuple[int, bool]], cwd: bytes | None, umask: int | None,
                 new_session: bool) -> Process:
    streams = [None if share else (fd if fd >= 0 else subprocess.DEVNULL)
               for fd, share in stdio]
    try:
        popen = subprocess.Popen(
            argv, executable=prog, env=env, stdin=streams[0], stdout=streams[1],
            stderr=streams[2], cwd=cwd, umask=-1 if umask is None else umask,
            start_new_session=new_session, close_fds=True, restore_signals=True)
    except OSError as e:
        what = "chdir" if cwd is not None and e.filename == cwd else "execve"
        raise _failed(e.errno or errno.EIO, what, program) from None
    # We reap through the pidfd. A returncode keeps Popen from ever waiting
    # for this pid itself (its __del__ would queue a running child for that).
    popen.returncode = 0
    return Process(popen.pid, os.pidfd_open(popen.pid))


def _child(err_w: int, parent: int, prog: bytes, argv: list[bytes], env: dict[bytes, bytes],
           stdio: list[tuple[int, bool]], nsenter: list[tuple[int, int]], cwd: bytes | None,
           uid: int | None, gid: int | None, groups: list[int] | None, umask: int | None,
           pdeathsig: int | None, new_session: bool) -> NoReturn:
    stage = 0
    try:
        for sig in signal.valid_signals():
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(sig, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for fd, nstype in nsenter:
            stage = _STAGES.index({
                _linux.CLONE_NEWUSER: "setns user", _linux.CLONE_NEWNS: "setns mount",
                _linux.CLONE_NEWUTS: "setns uts", _linux.CLONE_NEWIPC: "setns ipc",
                _linux.CLONE_NEWNET: "setns net"}[nstype])
            _linux.setns(fd, nstype)
        stage = _STAGES.index("setsid")
        if new_session:
            os.setsid()
        stage = _STAGES.index("setgroups")
        if groups is not None:
            os.setgroups(groups)
        stage = _STAGES.index("setresgid")
        if gid is not None:
            os.setresgid(gid, gid, gid)
        stage = _STAGES.index("setresuid")
        if uid is not None:
            os.setresuid(uid, uid, uid)
        stage = _STAGES.index("umask")
        if umask is not None:
            os.umask(umask)
        stage = _STAGES.index("pdeathsig")
        if pdeathsig is not None:
            _linux.set_pdeathsig(pdeathsig)
            if os.getppid() != parent:
                os._exit(128 + pdeathsig)
        stage = _STAGES.index("chdir")
        if cwd is not None:
            os.chdir(cwd)
        stage = _STAGES.index("stdio")
        # Park the sources above the target range first, so none is overwritten.
        parked = [os.dup(fd) if fd >= 0 else -1 for fd, _ in stdio]
        for target, ((_, share), src) in enumerate(zip(stdio, parked, strict=True)):
            if src >= 0:
                os.dup2(src, target)
            elif not share:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, target)
                os.close(null)
            else:
                os.set_inheritable(target, True)
        os.dup2(err_w, 3)
        os.set_inheritable(3, False)
        _linux.close_range(4)
        err_w = 3
        stage = _STAGES.index("execve")
        os.execvpe(prog, argv, env)
    except OSError as e:
        code = e.errno or errno.EIO
    except BaseException:
        code = errno.EIO
    try:
        os.write(err_w, _ERR.pack(stage, code))
    finally:
        os._exit(127)
