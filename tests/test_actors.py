"""pactors end to end on a real kernel: real processes, real descriptors.

Each test runs a small pactors program in this process with ``run_actors``
(``pactors.run`` with a time limit), or in a fresh interpreter when the
spawner itself has to exit or must drop capabilities first. An autouse fixture checks
that every test leaves no child process (zombie or not) and no descriptor
behind. Subprocess actors defined at module level are shipped by reference
(the supervisor is forked from this process, so it has this module); the
ones defined inside a test are shipped by value with cloudpickle.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import gc
import hashlib
import json
import math
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgpack
import prctl
import pytest
from conftest import is_spare

import pactors
from pactors import _codec, _wire
from pactors._runtime import _context

PY = sys.executable
MiB = 1024 * 1024


# Helpers -------------------------------------------------------------------

def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data.rpartition(")")[2].split()


def proc_state(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[0] if fields else None


def children_of(ppid: int) -> dict[int, str]:
    """Every process whose parent is ``ppid``, with its state letter.

    A supervisor's warm spare (named pactors-spare) is not one of them: it is
    not an actor, and a supervisor keeps one ready after a plain spawn.
    """
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = proc_stat(int(name))
            if fields is not None and int(fields[1]) == ppid and not is_spare(int(name)):
                found[int(name)] = fields[0]
    return found


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def gone(pid: int) -> bool:
    """True once ``pid`` no longer exists at all (exited and reaped)."""
    return proc_state(pid) is None


def reap_child(pid: int, timeout: float = 10.0) -> int | None:
    """Waits for our child ``pid`` to exit and reaps it; kills it after ``timeout``.

    Returns its exit code, or None when it is not (or no longer) our child.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"process {pid} did not exit within {timeout} s")
        time.sleep(0.005)


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of ``pid``, in clock ticks."""
    fields = proc_stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[11]) + int(fields[12])


def vmrss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds() -> dict[int, str]:
    # A peer's descriptors that pactors dropped are closed on its closer thread.
    assert _wire.wait_closed(10), "pactors' closer is stuck"
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def supervisor_pid() -> int:
    sup = _context().runtime._supervisor
    assert sup is not None
    return sup.pid


def run_actors(main: Callable[..., Awaitable[Any]], *args: Any, timeout: float = 30) -> Any:
    """``pactors.run(main, *args)`` with a time limit; reaps the supervisor if it
    is our child (test_run_reaps_its_supervisor checks that it never is left so).
    """
    sup: list[int] = []

    async def wrapper() -> Any:
        sup.append(supervisor_pid())
        with anyio.fail_after(timeout):
            return await main(*args)

    try:
        return pactors.run(wrapper)
    finally:
        if sup:
            reap_child(sup[0])


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def run_python(code: str, *args: str, timeout: float = 30,
               stdout: Any = subprocess.PIPE, stderr: Any = subprocess.PIPE
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-c", textwrap.dedent(code), *args], stdin=subprocess.DEVNULL,
                          stdout=stdout, stderr=stderr, text=True, timeout=timeout, check=False)


@pytest.fixture(autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    _wire.wait_closed(10)  # pactors' closer ends once it has closed all
    for thread in threading.enumerate():
        if thread.name == _wire.CLOSER_THREAD:
            thread.join(10)
    assert threading.active_count() == 1, "pactors.run needs a process without threads"
    before = open_fds()
    children_before = set(children_of(os.getpid()))  # session fixtures' processes
    yield
    gc.collect()
    leftover = {pid: state for pid, state in children_of(os.getpid()).items()
                if pid not in children_before}
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    assert not leftover, f"the test left child processes (pid: state): {leftover}"
    after = open_fds()
    leaked = {fd: after[fd] for fd in after.keys() - before.keys()}
    assert not leaked, f"the test leaked descriptors: {leaked}"


@pytest.fixture
def actor_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A fresh importable actor module: (dotted name, path of its file)."""
    name = f"pactors_test_actor_{uuid.uuid4().hex[:12]}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent("""\
        import os

        async def main(inbox):
            msg = await inbox.receive()
            await msg["reply_to"].send({"name": __name__, "pid": os.getpid(), "x": msg["x"]})
            return 7
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, path
    sys.modules.pop(name, None)


QUIET = pactors.Subprocess(stdin=None, stdout=None, stderr="share")


# Actors shared by several tests ----------------------------------------------

async def echo_once(inbox: pactors.Inbox) -> int:
    """Replies to one {"reply_to": address, ...} with the rest of it; exits with "status"."""
    msg = await inbox.receive()
    reply_to = msg.pop("reply_to")
    await reply_to.send({"echo": msg, "pid": os.getpid()})
    reply_to.close()
    return int(msg.get("status", 0))


async def sleeper(inbox: pactors.Inbox) -> None:
    await anyio.sleep(3600)


async def returns_at_once(inbox: pactors.Inbox) -> int:
    return 0


# Round trips ---------------------------------------------------------------

def test_round_trip_in_process_callable() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        sent = {"x": [1, "two", b"3"], "status": 5}
        actor = await pactors.spawn_actor(echo_once)
        assert actor.child_pid is None
        await actor.send({**sent, "reply_to": inbox.address})
        reply = await inbox.receive()
        assert reply == {"echo": sent, "pid": os.getpid()}
        assert reply["echo"]["x"] is not sent["x"]  # encoded and decoded, not shared
        assert await actor.wait() == 5

    run_actors(main)


def test_round_trip_in_process_module(actor_module: tuple[str, Path]) -> None:
    name, _ = actor_module

    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(name)
        await actor.send({"x": "hello", "reply_to": inbox.address})
        assert await inbox.receive() == {"name": name, "pid": os.getpid(), "x": "hello"}
        assert await actor.wait() == 7

    run_actors(main)


def test_round_trip_subprocess_callable() -> None:
    captured = "shipped by value"

    async def actor_main(inbox: pactors.Inbox) -> int:
        msg = await inbox.receive()
        await msg["reply_to"].send({"captured": captured, "x": msg["x"],
                                    "pid": os.getpid(), "ppid": os.getppid()})
        return 3

    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(actor_main, subprocess=QUIET)
        assert actor.child_pid not in (None, os.getpid())
        await actor.send({"x": {"nested": (1, 2.5, None)}, "reply_to": inbox.address})
        reply = await inbox.receive()
        assert reply == {"captured": captured, "x": {"nested": (1, 2.5, None)},
                         "pid": actor.child_pid, "ppid": supervisor_pid()}
        assert await actor.wait() == 3

    run_actors(main)


def test_round_trip_subprocess_module_path_and_name(actor_module: tuple[str, Path]) -> None:
    name, path = actor_module

    async def main() -> None:
        inbox = pactors.current_inbox()
        for entry in (str(path), path, name):
            actor = await pactors.spawn_actor(entry, subprocess={"stdin": None, "stdout": None})
            await actor.send({"x": str(entry), "reply_to": inbox.address})
            reply = await inbox.receive()
            assert reply["pid"] == actor.child_pid != os.getpid()
            assert reply["x"] == str(entry)
            assert reply["name"] == (name if entry == name else "__pactors_actor__")
            assert await actor.wait() == 7

    run_actors(main)


def test_subprocess_module_that_does_not_exist_reports_actor_error() -> None:
    async def main() -> None:
        actor = await pactors.spawn_actor("no_such_module_for_pactors_tests", subprocess=QUIET)
        with pytest.raises(pactors.ActorError) as info:
            await actor.wait()
        assert info.value.type_name == "ModuleNotFoundError"
        assert "no_such_module_for_pactors_tests" in info.value.message

    run_actors(main)


# Descriptors ---------------------------------------------------------------

async def write_to_received_fd(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    fd = msg["fd"]
    info = {"inheritable": os.get_inheritable(fd.fileno()), "repr": repr(fd),
            "fifo": stat.S_ISFIFO(os.fstat(fd).st_mode), "number": fd.fileno()}
    os.write(fd, msg["data"])
    fd.close()
    await msg["reply_to"].send(info)


@pytest.mark.parametrize("where", ["subprocess", "in-process"])
def test_fd_sent_to_actor_which_writes_to_it(where: str) -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        options = QUIET if where == "subprocess" else None
        actor = await pactors.spawn_actor(write_to_received_fd, subprocess=options)
        r, w = os.pipe()
        try:
            await actor.send({"fd": pactors.Fd(w), "data": b"written by the actor",
                              "reply_to": inbox.address})
            os.close(w)  # the sender keeps its copy and must close it itself
            w = -1
            info = await inbox.receive()
            assert info["inheritable"] is False
            assert "owned" in info["repr"]
            assert info["fifo"] is True
            assert read_all(r) == b"written by the actor"  # EOF: no copy is left open
            assert await actor.wait() == 0
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    run_actors(main)


def test_fd_of_a_socket_object_is_sent() -> None:
    async def actor_main(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        with socket.socket(fileno=msg["sock"].detach()) as sock:
            sock.sendall(sock.recv(100).upper())

    async def main() -> None:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            actor = await pactors.spawn_actor(actor_main, subprocess=QUIET)
            await actor.send({"sock": pactors.Fd(theirs)})
            theirs.close()
            ours.sendall(b"over a passed socket")
            assert ours.recv(100) == b"OVER A PASSED SOCKET"
            assert await actor.wait() == 0

    run_actors(main)


# Addresses -----------------------------------------------------------------

async def relay_to_sibling(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    await msg["peer"].send({"from_pid": os.getpid(), "reply_to": msg["reply_to"]})
    msg["peer"].close()
    msg["reply_to"].close()


async def answer_sibling(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    await msg["reply_to"].send({"b_pid": os.getpid(), "a_pid": msg["from_pid"]})
    msg["reply_to"].close()


def test_siblings_talk_directly_through_a_passed_address() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        b = await pactors.spawn_actor(answer_sibling, subprocess=QUIET)
        a = await pactors.spawn_actor(relay_to_sibling, subprocess=QUIET)
        await a.send({"peer": b.address, "reply_to": inbox.address})
        # Our own channel to B goes: B now hears only from A's channel.
        b.close()
        a.close()
        assert await inbox.receive() == {"b_pid": b.child_pid, "a_pid": a.child_pid}
        assert await a.wait() == 0
        assert await b.wait() == 0

    run_actors(main)


def test_each_address_in_a_message_is_its_own_channel() -> None:
    async def actor_main(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        first, second = msg["addresses"]
        first.close()  # closing one channel leaves the other working
        await second.send("through the second")
        second.close()

    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(actor_main, subprocess=QUIET)
        await actor.send({"addresses": [inbox.address, inbox.address]})
        assert await inbox.receive() == "through the second"
        assert await actor.wait() == 0
        with pytest.raises(pactors.NoSenders):  # both channels are gone now
            await inbox.receive()

    run_actors(main)


# Signals -------------------------------------------------------------------

@pytest.mark.parametrize("where", ["subprocess", "in-process"])
def test_kill_sigterm_is_seen_as_sigterm(where: str) -> None:
    async def main() -> None:
        actor = await pactors.spawn_actor(sleeper, subprocess=QUIET if where == "subprocess"
                                          else None)
        actor.kill(signal.SIGTERM)
        assert await actor.wait() == 128 + signal.SIGTERM

    run_actors(main)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
@pytest.mark.parametrize("fork", ["first plain spawn", "new uts namespace"])
def test_kill_right_after_spawning_a_forked_actor(fork: str, signum: int) -> None:
    """spawn_actor returns before the child has reset the supervisor's signal
    settings: a signal sent at once must still take effect, not be lost."""
    spec = pactors.Subprocess(stdin=None, stdout=None, stderr="share",
                              newns_uts=fork == "new uts namespace")

    async def main() -> None:
        actor = await pactors.spawn_actor(sleeper, subprocess=spec)
        actor.kill(signum)
        with anyio.move_on_after(5):
            assert await actor.wait() == 128 + signum
            return
        actor.kill(signal.SIGKILL)
        await actor.wait()
        pytest.fail(f"signal {signum} right after spawn_actor() was lost")

    run_actors(main)


def test_kill_right_after_spawning_an_in_process_actor() -> None:
    """Regression: kill() before the actor's task had started was silently lost."""

    async def main() -> None:
        actor = await pactors.spawn_actor(sleeper)
        actor.kill(signal.SIGTERM)
        with anyio.move_on_after(2):
            assert await actor.wait() == 128 + signal.SIGTERM
            return
        actor.kill(signal.SIGKILL)  # the actor is running now
        await actor.wait()
        pytest.fail("kill() right after spawn_actor() was lost")

    run_actors(main)


async def survive_sigterm(inbox: pactors.Inbox) -> int:
    msg = await inbox.receive()
    reply_to = msg["reply_to"]
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        await reply_to.send("ready")
        async for signum in signals:
            await reply_to.send({"signal": int(signum), "pid": os.getpid()})
            break
    await reply_to.send({"second": await inbox.receive()})
    return 9


def test_kill_sigterm_sends_only_sigterm() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(survive_sigterm, subprocess=QUIET)
        await actor.send({"reply_to": inbox.address})
        assert await inbox.receive() == "ready"
        actor.kill(signal.SIGTERM)
        assert await inbox.receive() == {"signal": signal.SIGTERM, "pid": actor.child_pid}
        await anyio.sleep(0.2)  # time for a SIGKILL, if kill() sent one too
        assert proc_state(actor.child_pid) in ("S", "R")
        await actor.send("still alive?")
        assert await inbox.receive() == {"second": "still alive?"}
        assert await actor.wait() == 9

    run_actors(main)


# Lifetime ------------------------------------------------------------------

SPAWNER = """
import json, os, sys
import anyio, pactors

async def sleeper(inbox):
    await anyio.sleep(3600)

async def main():
    quiet = pactors.Subprocess(stdin=None, stdout=None, stderr=None)
    kept = await pactors.spawn_actor(sleeper, subprocess=quiet)
    detached = await pactors.spawn_actor(sleeper, subprocess=quiet)
    detached.detach()
    sup = pactors._runtime._context().runtime._supervisor.pid
    with open(sys.argv[1] + ".tmp", "w") as f:
        json.dump({"kept": kept.child_pid, "detached": detached.child_pid, "sup": sup}, f)
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    if sys.argv[2] == "hang":
        await anyio.sleep(3600)

pactors.run(main)
"""


@pytest.mark.parametrize("how", ["exits", "is-killed"])
def test_detached_actor_outlives_its_spawner(tmp_path: Path, how: str) -> None:
    """Regression: the supervisor crashed when its spawner went (poller.unregister(-1)),
    and its parent-death signal killed the detached actor too."""
    out = tmp_path / "pids.json"
    pids: dict[str, int] = {}
    children_before = set(children_of(os.getpid()))
    # Orphans (the spawner's supervisor) come to us, so that we can check that
    # every process is reaped.
    prctl.set_child_subreaper(1)
    try:
        with open(tmp_path / "stderr", "w") as err:
            proc = subprocess.Popen([PY, "-c", SPAWNER, str(out),
                                     "hang" if how == "is-killed" else "exit"],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            assert wait_until(out.exists, 20), (tmp_path / "stderr").read_text()
            if how == "is-killed":
                proc.kill()
            assert proc.wait(10) == (-signal.SIGKILL if how == "is-killed" else 0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        pids = json.loads(out.read_text())
        # The spawner's end kills the actor it did not detach, and it is reaped.
        assert wait_until(lambda: gone(pids["kept"]), 2), (
            f"kept actor: {proc_state(pids['kept'])}, supervisor: {proc_state(pids['sup'])}")
        # The detached one lives on under the supervisor, which now is our child.
        assert proc_state(pids["detached"]) in ("S", "R")
        assert int(proc_stat(pids["detached"])[1]) == pids["sup"]  # type: ignore[index]
        assert set(children_of(os.getpid())) - children_before == {pids["sup"]}
        os.kill(pids["detached"], signal.SIGKILL)
        assert wait_until(lambda: gone(pids["detached"]), 2)
        # Its last child gone, the supervisor exits cleanly and we reap it.
        assert reap_child(pids["sup"], 5) == 0
        assert (tmp_path / "stderr").read_text() == ""
    finally:
        prctl.set_child_subreaper(0)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Whatever was orphaned while we were a subreaper is ours to reap.
        for pid in set(children_of(os.getpid())) - children_before:
            reap_child(pid, 5)


def test_actor_ending_kills_its_own_undetached_children() -> None:
    async def middle(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        quiet = pactors.Subprocess(stdin=None, stdout=None)
        kept = [await pactors.spawn_actor(sleeper, subprocess=quiet) for _ in range(2)]
        await msg["reply_to"].send({"kept": [actor.child_pid for actor in kept],
                                    "sup": supervisor_pid()})

    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(middle, subprocess=QUIET)
        await actor.send({"reply_to": inbox.address})
        pids = await inbox.receive()
        assert len(set(pids["kept"])) == 2 and pids["sup"] != supervisor_pid()
        assert await actor.wait() == 0
        for pid in pids["kept"]:
            assert wait_until(lambda pid=pid: proc_state(pid) in (None, "Z"), 2)
        # The middle actor's supervisor goes too; as an orphan it is reaped by
        # ours (a child subreaper), and nothing is left under ours.
        assert wait_until(lambda: gone(pids["sup"]), 2)
        assert wait_until(lambda: not children_of(supervisor_pid()), 2)

    run_actors(main)


async def spawn_echo_and_ask(inbox: pactors.Inbox) -> None:
    """Spawns echo_once as its own subprocess actor and asks it three times."""
    msg = await inbox.receive()
    answers = []
    for i in range(3):
        child = await pactors.spawn_actor(echo_once, subprocess=QUIET)
        await child.send({"reply_to": inbox.address, "n": i})
        answers.append((await inbox.receive())["echo"])
        answers.append(await child.wait())
    await msg["reply_to"].send(answers)


def test_subprocess_actor_talks_with_its_own_subprocess_actors() -> None:
    """Regression: an actor process forks its own supervisor from inside its
    running event loop; a loop that leaves fork handlers behind (uvloop's
    libuv) hung the grandchildren."""
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(spawn_echo_and_ask, subprocess=QUIET)
        await actor.send({"reply_to": inbox.address})
        with anyio.fail_after(20):
            answers = await inbox.receive()
        assert answers == [{"n": 0}, 0, {"n": 1}, 0, {"n": 2}, 0]
        assert await actor.wait() == 0

    run_actors(main)


# Errors --------------------------------------------------------------------

async def raiser(inbox: pactors.Inbox) -> None:
    def deep_function_name() -> None:
        raise ValueError("boom \N{SNOWMAN}")

    deep_function_name()


@pytest.mark.parametrize("where", ["subprocess", "in-process"])
def test_exception_in_actor_reaches_wait_as_actor_error(where: str) -> None:
    async def main() -> None:
        actor = await pactors.spawn_actor(raiser, subprocess=QUIET if where == "subprocess"
                                          else None)
        with pytest.raises(pactors.ActorError) as info:
            await actor.wait()
        err = info.value
        assert err.type_name == "ValueError"
        assert err.message == "boom \N{SNOWMAN}"
        assert "deep_function_name" in err.traceback_text
        assert "ValueError: boom \N{SNOWMAN}" in err.traceback_text
        assert isinstance(err.traceback_text, str) and isinstance(err, pactors.PactorsError)
        assert str(err) == "ValueError: boom \N{SNOWMAN}"

    # The actor's traceback is printed on the shared stderr (pytest captures it).
    run_actors(main)


def test_send_to_a_dead_actor_raises_channel_closed() -> None:
    async def main() -> None:
        for options in (QUIET, None):
            actor = await pactors.spawn_actor(returns_at_once, subprocess=options)
            assert await actor.wait() == 0
            with pytest.raises(pactors.ChannelClosed, match="has exited; its inbox is gone"):
                await actor.send("anybody there?")
            if options is not None:
                with pytest.raises(pactors.ChannelClosed, match=f"pid {actor.child_pid}"):
                    await actor.send("anybody there?")
        actor = await pactors.spawn_actor(sleeper, subprocess=QUIET)
        actor.close()
        with pytest.raises(pactors.ChannelClosed, match="closed"):
            await actor.send("after close")
        actor.kill()
        assert await actor.wait() == 128 + signal.SIGKILL

    run_actors(main)


def test_sending_a_closed_fd_is_a_message_error_not_a_dead_actor() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(echo_once, subprocess=QUIET)
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with pytest.raises(pactors.MessageError, match="not an open file descriptor"):
            await actor.send({"fd": pactors.Fd(w)})
        await actor.send({"reply_to": inbox.address})  # the actor is fine
        assert (await inbox.receive())["pid"] == actor.child_pid
        assert await actor.wait() == 0

    run_actors(main)


def test_spawn_with_a_closed_stdio_fd_fails_before_fork() -> None:
    w = max(open_fds()) + 200  # stays closed: nothing here opens that many
    with pytest.raises(OSError, match="not an open file descriptor") as info:
        pactors.Subprocess(stdout=w)
    assert info.value.errno == errno.EBADF

    async def main() -> None:
        before = children_of(supervisor_pid())
        with pytest.raises(OSError, match="not an open file descriptor"):
            await pactors.spawn_actor(sleeper, subprocess={"stdout": w})
        assert children_of(supervisor_pid()) == before == {}

    run_actors(main)


def test_spawn_refused_by_the_kernel_raises_oserror_with_errno() -> None:
    # Without CAP_SYS_ADMIN the kernel refuses unshare(CLONE_NEWNS) with EPERM.
    # Drop it in a fresh process, before pactors.run forks the supervisor.
    result = run_python("""
        import errno, json, prctl, pactors

        prctl.cap_effective.sys_admin = False
        prctl.cap_permitted.sys_admin = False

        async def ok(inbox):
            return 4

        async def main():
            out = {}
            try:
                await pactors.spawn_actor(ok, subprocess={"newns_mount": True})
            except OSError as e:
                out["type"], out["errno"], out["text"] = type(e).__name__, e.errno, str(e)
            actor = await pactors.spawn_actor(ok, subprocess={})  # still serving
            out["after"] = await actor.wait()
            print(json.dumps(out))

        pactors.run(main)
        """)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["type"] == "PermissionError"
    assert out["errno"] == errno.EPERM
    assert "Operation not permitted" in out["text"]
    assert out["after"] == 4


# Malformed and oversized messages ----------------------------------------------

def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


async def send_garbage(inbox: pactors.Inbox) -> int:
    """Sends one kind of garbage on each of the channels it is given."""
    msg = await inbox.receive()
    socks = [channel._sock for channel in msg["channels"]]
    r, w = os.pipe()
    memfd = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(memfd, b"N" * 100_000)
    msg_header = bytes([_wire.MSG, 0])
    fd0 = msgpack.ExtType(_codec.EXT_FD, struct.pack("<I", 0))
    address0 = msgpack.ExtType(_codec.EXT_ADDRESS, struct.pack("<I", 0))
    bad = [
        ([msg_header + b"\xc1"], []),  # a byte MessagePack never uses
        ([msg_header + b"x" * (128 * 1024)], []),  # MSG_TRUNC
        ([msg_header + msgpack.packb(None)], [r] * 70),  # MSG_CTRUNC
        ([msg_header + msgpack.packb(address0)], [r]),  # an address that is not a socket
        ([_wire._SPILL.pack(_wire.MSG, 1, 100_000)], [memfd]),  # spill file not sealed
        ([bytes([_wire.NEW_SOURCE, 0])], [r]),  # a new sender that is a pipe
        ([bytes([99, 0]) + msgpack.packb(None)], []),  # unknown frame kind
        ([b"\x01"], []),  # runt frame
        ([msg_header + msgpack.packb(fd0)], [r, w]),  # a descriptor it does not name
        ([msg_header + b"\xa2\xff\xfe"], []),  # a str that is not UTF-8
    ]
    assert len(socks) == len(bad)
    for sock, (data, fds) in zip(socks, bad, strict=True):
        sock.sendmsg(data, _rights(fds) if fds else [])
    for fd in (r, w, memfd):
        os.close(fd)
    await msg["good"].send({"good": True, "after": len(bad)})
    return 0


def test_malformed_messages_from_a_child_leave_the_parent_serving() -> None:
    n_bad = 10

    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(send_garbage, subprocess=QUIET)
        await actor.send({"channels": [inbox.address] * n_bad, "good": inbox.address})
        assert await inbox.receive() == {"good": True, "after": n_bad}
        assert await actor.wait() == 0
        # Everything left is garbage: each bad channel is dropped, and then
        # nobody can send any more.
        with pytest.raises(pactors.NoSenders):
            await inbox.receive()
        assert inbox.dropped == n_bad

    run_actors(main)


async def summarize(inbox: pactors.Inbox) -> None:
    """Replies to its first message's reply_to with a digest of each later message."""
    reply_to = (await inbox.receive())["reply_to"]
    async for msg in inbox:
        fds = msg.get("fds", [])
        summary = {
            "sha": hashlib.sha256(msg.get("blob", b"")).hexdigest(),
            "nfds": len(fds),
            "distinct": len({fd.fileno() for fd in fds}),
            "all_owned_cloexec": all("owned" in repr(fd) and not os.get_inheritable(fd)
                                     for fd in fds),
        }
        for i, fd in enumerate(fds):
            os.write(fd, bytes([i]))
            fd.close()
        await reply_to.send(summary)


def test_message_size_and_descriptor_limits() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(summarize, subprocess=QUIET)
        blob = random.Random(1).randbytes(MiB)
        await actor.send({"reply_to": inbox.address})

        with pytest.raises(pactors.MessageError, match="larger than"):
            await actor.send({"blob": bytes(16 * MiB)})
        r, w = os.pipe()
        try:
            with pytest.raises(pactors.MessageError, match="at most 64"):
                await actor.send({"fds": [pactors.Fd(w)] * 65})

            await actor.send({"blob": blob})
            assert await inbox.receive() == {"sha": hashlib.sha256(blob).hexdigest(), "nfds": 0,
                                             "distinct": 0, "all_owned_cloexec": True}
            # 1 MiB spilled into a memfd plus 64 descriptors: 65 in SCM_RIGHTS.
            await actor.send({"blob": blob, "fds": [pactors.Fd(w)] * 64})
            assert await inbox.receive() == {"sha": hashlib.sha256(blob).hexdigest(),
                                             "nfds": 64, "distinct": 64,
                                             "all_owned_cloexec": True}
            os.close(w)
            w = -1
            assert read_all(r) == bytes(range(64))
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        actor.close()
        assert await actor.wait() == 0

    run_actors(main)


# Wire frames, without processes ---------------------------------------------------

def _recv_raw(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, anc, _, _ = sock.recvmsg(1 << 17, socket.CMSG_SPACE(70 * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for _level, _type, cdata in anc:
        fds.extend(array.array("i", cdata[:len(cdata) - len(cdata) % 4]))
    return data, fds


def test_wire_spills_large_payloads_into_a_sealed_memfd() -> None:
    a, b = _wire.seqpacket_pair()
    with a, b:
        payload = random.Random(2).randbytes(MiB)
        _wire.send_frame_blocking(a, _wire.MSG, payload)
        data, fds = _recv_raw(b)
        try:
            assert data == _wire._SPILL.pack(_wire.MSG, 1, MiB)
            assert len(fds) == 1
            assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith("/memfd:pactors-msg")
            seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
            assert os.pread(fds[0], MiB + 1, 0) == payload
        finally:
            _wire.close_all(fds)

        _wire.send_frame_blocking(a, _wire.MSG, payload)
        frame = _wire.recv_frame_nowait(b)
        assert frame is not None and frame.kind == _wire.MSG and frame.fds == []
        assert frame.payload == payload

        small = b"y" * _wire.INLINE_MAX
        _wire.send_frame_blocking(a, _wire.MSG, small)
        data, fds = _recv_raw(b)
        assert fds == [] and data == bytes([_wire.MSG, 0]) + small


def test_wire_rejects_bad_frames_and_closes_their_descriptors() -> None:
    a, b = _wire.seqpacket_pair()
    r, w = os.pipe()
    with a, b:
        sealed = os.memfd_create("short", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(sealed, b"z" * 10)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        cases = [
            ([bytes([_wire.MSG, 0]) + b"x" * (_wire._RECV_BUFSIZE + 1)], [], "truncated"),
            ([bytes([_wire.MSG, 0])], [r] * 70, "truncated"),
            ([b"\x01"], [], "runt"),
            ([bytes([_wire.MSG, 0x80])], [], "unknown frame flags"),
            ([_wire._SPILL.pack(_wire.MSG, 1, 11)], [sealed], "not a sealed memfd"),
            ([_wire._SPILL.pack(_wire.MSG, 1, 10)], [], "malformed spilled frame"),
            ([_wire._SPILL.pack(_wire.MSG, 1, 32 * MiB)], [sealed], "exceeds the limit"),
        ]
        before = open_fds()
        for data, fds, error in cases:
            a.sendmsg(data, _rights(fds) if fds else [])
            with pytest.raises(pactors.MessageError, match=error):
                _wire.recv_frame_nowait(b)
            assert _wire.wait_closed(5)  # a peer's descriptors close on the closer thread
            assert open_fds() == before, error
        # A regular file is no spill file either; the kernel's EINVAL is an OSError.
        a.sendmsg([_wire._SPILL.pack(_wire.MSG, 1, 0)], _rights([r]))
        with pytest.raises(OSError):
            _wire.recv_frame_nowait(b)
        assert _wire.wait_closed(5)
        assert open_fds() == before
        a.close()
        assert _wire.recv_frame_nowait(b) is None
    for fd in (r, w, sealed):
        os.close(fd)


def test_a_truncated_control_message_is_an_error() -> None:
    """The supervisor's control sockets take a bounded number of bytes and
    descriptors: more is EMSGSIZE, with what did arrive closed."""
    a, b = _wire.seqpacket_pair()
    r, w = os.pipe()
    with a, b:
        before = open_fds()
        for data, fds in (([b"x" * 100], []), ([b"{}"], [r] * 5)):
            a.sendmsg(data, _rights(fds) if fds else [])
            with pytest.raises(OSError) as raised:
                _wire.recvmsg_fds(b, 64, 2)
            assert raised.value.errno == errno.EMSGSIZE
            assert open_fds() == before
        a.sendmsg([b"{}"], _rights([r, w]))
        data, fds = _wire.recvmsg_fds(b, 64, 2)
        assert data == b"{}" and len(fds) == 2
        _wire.close_all(fds)
    os.close(r)
    os.close(w)


# The codec -------------------------------------------------------------------

def _no_handles(value: Any) -> None:
    return None


def _roundtrip(value: Any) -> Any:
    data, handles = _codec.encode(value, _no_handles)
    assert handles == []
    return _codec.decode(data, 0, lambda kind, index: pytest.fail("no handles expected"))


def test_codec_round_trips_every_type() -> None:
    values = [
        None, True, False, 0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64,
        -(2**200), 3**1000, 0.0, -0.0, 1.5, -2.25e-300, math.inf, -math.inf, 1e308,
        "", "plain", "unicode: \N{SNOWMAN} \N{GREEK SMALL LETTER ALPHA} \U0001F600 \x00 \ud800",
        b"", b"\x00\xff" * 1000, [], (), {}, [1, [2, [3, [4]]]], (1, (2,), ()),
        {"a": {"b": {"c": [None, True, (1.0, b"x")]}}, "": 0, "\N{SNOWMAN}": "key"},
        [{"k": (i, str(i), bytes([i]))} for i in range(200)],
    ]
    for value in values:
        decoded = _roundtrip(value)
        assert decoded == value and type(decoded) is type(value)
    assert math.copysign(1, _roundtrip(-0.0)) == -1
    assert math.isnan(_roundtrip(math.nan))
    assert _roundtrip(bytearray(b"ba")) == b"ba"
    assert _roundtrip(memoryview(b"mv")) == b"mv"
    shared = [1, 2]
    assert _roundtrip([shared, shared, {"x": shared}]) == [[1, 2], [1, 2], {"x": [1, 2]}]
    deep: Any = None
    for _ in range(_codec.MAX_DEPTH):
        deep = [deep]
    assert _roundtrip(deep) == deep


class Opaque:
    pass


def test_codec_rejects_what_it_cannot_carry_clearly() -> None:
    cyclic_list: list[Any] = [1]
    cyclic_list.append([cyclic_list])
    cyclic_dict: dict[str, Any] = {}
    cyclic_dict["self"] = {"again": cyclic_dict}
    too_deep: Any = None
    for _ in range(_codec.MAX_DEPTH + 1):
        too_deep = [too_deep]
    cases = [
        ({1: "int key"}, "dict keys must be str, not int"),
        ({("t",): 1}, "dict keys must be str, not tuple"),
        ({b"k": 1}, "dict keys must be str, not bytes"),
        (cyclic_list, "reference cycle"),
        (cyclic_dict, "reference cycle"),
        (Opaque(), "cannot send a value of type Opaque"),
        ([object()], "cannot send a value of type object"),
        ({1, 2}, "cannot send a value of type set"),
        (signal.SIGTERM, "cannot send a value of type Signals"),
        (lambda: None, "cannot send a value of type function"),
        (2 ** (8 * _codec.MAX_INT_BYTES + 8), "integer too large"),
        (too_deep, "nests deeper"),
        (bytes(_codec.MAX_MESSAGE_BYTES), "larger than"),
        ({"view": memoryview(b"abcd")[::2]}, "not C-contiguous"),
    ]
    for value, error in cases:
        with pytest.raises(pactors.MessageError, match=error):
            _codec.encode(value, _no_handles)


def test_codec_descriptor_handles_must_each_be_named_once() -> None:
    def classify(value: Any) -> str | None:
        return _codec.HANDLE_FD if value == "FD" else None

    class Handle:
        def __init__(self, kind: str, index: int) -> None:
            self.kind, self.index = kind, index

    data, handles = _codec.encode({"a": "plain"}, classify)
    assert handles == []
    for bad_nfds in (1, 2):
        with pytest.raises(pactors.MessageError, match="does not name"):
            _codec.decode(data, bad_nfds, Handle)
    fd_tag = msgpack.packb(msgpack.ExtType(_codec.EXT_FD, struct.pack("<I", 0)))
    twice = msgpack.packb([msgpack.ExtType(_codec.EXT_FD, struct.pack("<I", 0))] * 2)
    with pytest.raises(pactors.MessageError, match="does not carry"):
        _codec.decode(twice, 1, Handle)
    with pytest.raises(pactors.MessageError, match="does not carry"):
        _codec.decode(fd_tag, 0, Handle)
    decoded = _codec.decode(fd_tag, 1, Handle)
    assert (decoded.kind, decoded.index) == (_codec.HANDLE_FD, 0)


def test_codec_decodes_only_str_keys_and_bounded_tuples() -> None:
    """A peer's map keys are str only: int keys (whose hashes are not salted)
    would let it build a dict whose inserts collide, and bytes keys are not
    what a receiver expects. Nested tuples recurse, so they are bounded."""
    list_key = b"\x81\x91\x01\x01"  # {[1]: 1}, which Python cannot even build
    for data in [*(msgpack.packb({key: 1}) for key in (1, b"k", 1.5, None)), list_key]:
        with pytest.raises(pactors.MessageError):
            _codec.decode(data, 0, lambda kind, index: None)
    nested = msgpack.packb(None)
    for _ in range(_codec.MAX_DEPTH + 1):
        nested = msgpack.packb(msgpack.ExtType(_codec.EXT_TUPLE, b"\x91" + nested))
    with pytest.raises(pactors.MessageError, match="deeper"):
        _codec.decode(nested, 0, lambda kind, index: None)
    for code, data in ((_codec.EXT_BIGINT, b""), (_codec.EXT_TUPLE, b"\xc0"), (99, b"x"),
                       (_codec.EXT_FD, b"\0\0")):
        with pytest.raises(pactors.MessageError):
            _codec.decode(msgpack.packb(msgpack.ExtType(code, data)), 1, lambda kind, i: None)
    # What the packer makes of every kind of string, surrogates included.
    assert _roundtrip({"path": "caf\udce9", "plain": "x"}) == {"path": "caf\udce9", "plain": "x"}


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 4 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.random() < 0.5
    if choice == 2:
        return rng.randrange(-(2**70), 2**70)
    if choice == 3:
        return rng.choice([rng.uniform(-1e9, 1e9), math.inf, math.nan])
    if choice == 4:
        return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FFFF)]))
                       for _ in range(rng.randrange(8)))
    if choice in (5, 6, 7):
        return rng.randbytes(rng.randrange(8))
    if choice in (8, 9):
        items = [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return items if choice == 8 else tuple(items)
    return {f"k{i}": _random_value(rng, depth + 1) for i in range(rng.randrange(4))}


def test_codec_decoding_garbage_only_ever_raises_message_error() -> None:
    rng = random.Random(20240601)
    samples = [_codec.encode(_random_value(rng), _no_handles)[0] for _ in range(300)]
    samples.append(msgpack.packb([msgpack.ExtType(_codec.EXT_FD, struct.pack("<I", 0)),
                                  msgpack.ExtType(_codec.EXT_ADDRESS, struct.pack("<I", 1)),
                                  None]))
    # MessagePack's type bytes (nil, bools, bin, ext, floats, ints, str, arrays,
    # maps) and the codes of the codec's extension types.
    tags = bytes([0xC0, 0xC2, 0xC3, 0xC4, 0xC7, 0xCA, 0xCB, 0xCC, 0xD0, 0xD4, 0xD5, 0xD6,
                  0xD9, 0xDC, 0xDE, 0x91, 0x81, 0xA1, 0x90, 0x80, 0xFF, 0xC1])
    handle_tags = bytes([_codec.EXT_FD, _codec.EXT_ADDRESS, _codec.EXT_TUPLE,
                         _codec.EXT_BIGINT])
    ok = errors = 0
    for i in range(5000):
        kind = i % 4
        if kind == 0:  # random bytes
            data = rng.randbytes(rng.randrange(64))
        elif kind == 1:  # random bytes from the tag alphabet and small numbers
            data = bytes(rng.choice(tags + handle_tags + b"\0\1\2\xff")
                         for _ in range(rng.randrange(48)))
        else:  # a valid message, mutated
            data = bytearray(rng.choice(samples))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                if op == 0 and data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                elif op == 1 and data:
                    del data[rng.randrange(len(data)):]
                else:
                    data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        nfds = rng.randrange(3)
        try:
            _codec.decode(bytes(data), nfds, lambda kind, index: (kind, index))
            ok += 1
        except pactors.MessageError:
            errors += 1
    assert ok > 20 and errors > 4000  # the fuzzing reached both outcomes


# Inboxes ---------------------------------------------------------------------

def test_receive_without_senders_raises_no_senders() -> None:
    async def main() -> None:
        with pytest.raises(pactors.NoSenders, match="no senders"):
            await pactors.current_inbox().receive()

    run_actors(main)


def test_main_that_never_yields() -> None:
    """Regression: the supervisor reader ran after run() had closed its socket (EBADF)."""
    sup: list[int] = []

    async def main() -> int:
        sup.append(supervisor_pid())
        return 5

    try:
        assert pactors.run(main) == 5
    finally:
        reap_child(sup[0])


async def send_again_on_go(inbox: pactors.Inbox) -> int:
    """Sends "first"; on "go" sends again: returns 0 if that raised ChannelClosed."""
    msg = await inbox.receive()
    await msg["reply_to"].send("first")
    assert await inbox.receive() == "go"
    try:
        await msg["reply_to"].send("second")
    except pactors.ChannelClosed:
        return 0
    return 1


async def send_three_on_go(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    assert await inbox.receive() == "go"
    for i in range(3):
        await msg["reply_to"].send(i)
    msg["reply_to"].close()


def test_second_concurrent_receive_raises_runtime_error() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(send_three_on_go)
        got: list[Any] = []

        async def first() -> None:
            got.append(await inbox.receive())

        await actor.send({"reply_to": inbox.address})  # now the inbox has a sender
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.sleep(0.01)
            with pytest.raises(RuntimeError, match="already receiving"):
                await inbox.receive()
            await actor.send("go")
        got.extend([msg async for msg in inbox])  # ends when the sender has gone
        assert got == [0, 1, 2]
        assert await actor.wait() == 0

    run_actors(main)


def test_receive_on_a_closed_inbox_raises_channel_closed() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(send_again_on_go, subprocess=QUIET)
        await actor.send({"reply_to": inbox.address})
        assert await inbox.receive() == "first"
        inbox.close()
        assert inbox.closed
        with pytest.raises(pactors.ChannelClosed, match="closed"):
            await inbox.receive()
        assert [msg async for msg in inbox] == []
        await actor.send("go")
        assert await actor.wait() == 0  # its channel to us reported ChannelClosed

    run_actors(main)


def test_closing_an_inbox_wakes_its_receiver_with_channel_closed() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(sleeper)
        await actor.send({"reply_to": inbox.address})  # a sender that never sends

        async def close_soon() -> None:
            await anyio.sleep(0.05)
            inbox.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_soon)
            with pytest.raises(pactors.ChannelClosed):
                await inbox.receive()
        actor.kill()
        assert await actor.wait() == 128 + signal.SIGKILL

    run_actors(main)


def test_closing_a_channel_during_a_blocked_send_raises_channel_closed() -> None:
    async def main() -> None:
        actor = await pactors.spawn_actor(sleeper, subprocess=QUIET)  # never receives
        channel = actor.address
        blob = bytes(_wire.INLINE_MAX - 100)

        async def close_soon() -> None:
            await anyio.sleep(0.1)
            channel.close()

        async with anyio.create_task_group() as tg:
            tg.start_soon(close_soon)
            with pytest.raises(pactors.ChannelClosed):
                for _ in range(1000):  # fills the socket buffer, then blocks
                    await actor.send(blob)
        actor.kill()
        assert await actor.wait() == 128 + signal.SIGKILL

    run_actors(main)


# Stdio and environment -----------------------------------------------------------

async def print_environment(inbox: pactors.Inbox) -> None:
    # sys.stdout is the object the supervisor was forked with; under pytest's
    # capture it is not fd 1, so write to fd 1 itself.
    os.write(1, json.dumps(dict(os.environ)).encode())


@pytest.mark.parametrize("environment", [{"LANG": "C.UTF-8", "A": "1",
                                          "SPACES AND \N{SNOWMAN}": "v=\n\tx", "EMPTY": ""},
                                         None])
def test_environment_given_and_stdout_to_a_pipe(environment: dict[str, str] | None) -> None:
    async def main() -> None:
        r, w = os.pipe()
        try:
            actor = await pactors.spawn_actor(print_environment, subprocess=pactors.Subprocess(
                stdout=w, environment=environment))
            os.close(w)
            w = -1
            assert json.loads(read_all(r)) == (environment or {})
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
        assert await actor.wait() == 0

    run_actors(main)


def test_print_goes_to_a_stdout_pipe_in_a_plain_program() -> None:
    result = run_python("""
        import json, os, sys, pactors

        async def child(inbox):
            print(json.dumps(dict(os.environ)))
            print("to stderr", file=sys.stderr)

        async def main():
            r, w = os.pipe()
            actor = await pactors.spawn_actor(child, subprocess=pactors.Subprocess(
                stdout=w, stderr="share", environment={"ONLY": "this"}))
            os.close(w)
            with open(r, "rb") as f:
                out = f.read()
            assert await actor.wait() == 0
            sys.stdout.write(out.decode())

        pactors.run(main)
        """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ONLY": "this"}
    assert result.stderr == "to stderr\n"


async def describe_stdio(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    info = {}
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
            info[str(fd)] = [st.st_dev, st.st_ino, st.st_rdev]
        except OSError as e:
            info[str(fd)] = e.errno
    info["stdin_read"] = list(os.read(0, 100))
    await msg["reply_to"].send(info)


def test_stdio_null_share_and_fd() -> None:
    async def main() -> None:
        inbox = pactors.current_inbox()
        null = os.stat(os.devnull)
        null_id = [null.st_dev, null.st_ino, null.st_rdev]
        ours = os.fstat(2)  # as it was when pactors.run forked the supervisor
        r, w = os.pipe()
        try:
            os.write(w, b"fed on stdin")
            os.close(w)
            w = -1
            cases = [
                (pactors.Subprocess(stdin=None, stdout=None, stderr="share"),
                 null_id, null_id, [ours.st_dev, ours.st_ino, ours.st_rdev], b""),
                (pactors.Subprocess(stdin=r, stdout=None, stderr=None),
                 [os.fstat(r).st_dev, os.fstat(r).st_ino, 0], null_id, null_id,
                 b"fed on stdin"),
            ]
            for options, stdin, stdout, stderr, data in cases:
                actor = await pactors.spawn_actor(describe_stdio, subprocess=options)
                await actor.send({"reply_to": inbox.address})
                info = await inbox.receive()
                assert (info["0"], info["1"], info["2"]) == (stdin, stdout, stderr)
                assert bytes(info["stdin_read"]) == data
                assert await actor.wait() == 0
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    run_actors(main)


# Many spawns and the supervisor --------------------------------------------------

def test_thousand_spawns_leave_no_zombie_fd_or_supervisor_growth() -> None:
    batch_size = 20

    async def batch(inbox: pactors.Inbox) -> None:
        actors: list[pactors.Actor] = []

        async def spawn_one() -> None:
            actors.append(await pactors.spawn_actor(echo_once, subprocess=QUIET))

        async with anyio.create_task_group() as tg:
            for _ in range(batch_size):
                tg.start_soon(spawn_one)
        for actor in actors:
            await actor.send({"reply_to": inbox.address})
        pids = {(await inbox.receive())["pid"] for _ in actors}
        assert pids == {actor.child_pid for actor in actors}
        for actor in actors:
            assert await actor.wait() == 0
            actor.close()

    async def main() -> dict[str, Any]:
        inbox = pactors.current_inbox()
        sup = supervisor_pid()
        for _ in range(2):  # warm up the supervisor's allocator
            await batch(inbox)
        rss_before = vmrss_kib(sup)
        zombies = 0
        started = time.monotonic()
        for i in range(1000 // batch_size):
            await batch(inbox)
            if i % 10 == 0:
                zombies += sum(s == "Z" for s in children_of(sup).values())
        elapsed = time.monotonic() - started
        assert zombies == 0
        assert children_of(sup) == {}  # every actor ended and was reaped
        assert "Z" not in children_of(os.getpid()).values()
        return {"rss_before": rss_before, "rss_after": vmrss_kib(sup), "elapsed": elapsed}

    fds_before = open_fds()
    result = run_actors(main, timeout=60)
    gc.collect()
    assert open_fds() == fds_before
    growth = result["rss_after"] - result["rss_before"]
    assert growth < 1024, f"supervisor RSS grew by {growth} KiB over 1000 spawns"
    assert result["elapsed"] < 20


def test_finished_actors_release_their_descriptors() -> None:
    """Regression: every Actor stayed in its spawner's children, with a socket open."""

    async def main() -> None:
        for _ in range(3):  # whatever is created once
            actor = await pactors.spawn_actor(returns_at_once, subprocess=QUIET)
            await actor.wait()
        del actor
        gc.collect()
        before = open_fds()
        for _ in range(30):
            actor = await pactors.spawn_actor(returns_at_once, subprocess=QUIET)
            assert await actor.wait() == 0
            actor.close()
        del actor
        gc.collect()
        leaked = len(open_fds().keys() - before.keys())
        assert leaked == 0, f"{leaked} descriptors still open after 30 finished actors"

    run_actors(main)


def test_supervisor_survives_a_busy_spawner() -> None:
    """Regression: with its socket full, the supervisor's send() recursed until
    RecursionError ended it, and every actor with it."""
    count = 320  # more exit reports than the socket buffer holds (about 280)

    async def main() -> list[int]:
        actors: list[pactors.Actor] = []

        async def spawn_one() -> None:
            actors.append(await pactors.spawn_actor(sleeper, subprocess=QUIET))

        for _ in range(count // 20):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(spawn_one)
        for actor in actors:
            actor.kill(signal.SIGTERM)
        time.sleep(2)  # the event loop is blocked: the exit reports pile up
        return [await actor.wait() for actor in actors]

    statuses = run_actors(main)
    assert statuses == [128 + signal.SIGTERM] * count


def test_run_reaps_its_supervisor() -> None:
    """Regression: the supervisor stayed a zombie child of pactors.run's caller."""
    sups: list[int] = []

    async def main() -> None:
        sups.append(supervisor_pid())

    try:
        pactors.run(main)
        sup = sups[0]
        # Either run() reaps it, or it was never our child (a double fork).
        wait_until(lambda: proc_state(sup) in (None, "Z"), 5)
        assert sup not in children_of(os.getpid()), (
            f"supervisor {sup} is our child in state {proc_state(sup)}")
    finally:
        with contextlib.suppress(ChildProcessError):
            reap_child(sups[0], 5)


def test_supervisor_does_not_spin_once_its_connection_failed() -> None:
    async def main() -> int:
        sup = supervisor_pid()
        detached = await pactors.spawn_actor(sleeper, subprocess=QUIET)
        detached.detach()
        kept = await pactors.spawn_actor(sleeper, subprocess=QUIET)
        # The supervisor's next report fails with EPIPE, as when its spawner has
        # just exited; it must then behave as when it sees its spawner go.
        client = _context().runtime._supervisor
        assert client is not None
        client.sock.shutdown(socket.SHUT_RD)
        kept.kill()
        try:
            assert wait_until(lambda: gone(kept.child_pid), 2)  # reaped, report failed
            time.sleep(0.05)
            start = cpu_ticks(sup)
            time.sleep(0.5)
            return cpu_ticks(sup) - start
        finally:
            os.kill(detached.child_pid, signal.SIGKILL)
            assert wait_until(lambda: gone(detached.child_pid), 2)

    ticks = run_actors(main)
    assert ticks <= 5, f"the idle supervisor used {ticks} clock ticks in 0.5 s"


def test_sending_a_channel_its_own_address() -> None:
    async def echo_twice(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        # ``me`` is a new channel into our own inbox, minted by the sender.
        await msg["me"].send("to myself")
        assert await inbox.receive() == "to myself"
        await msg["reply_to"].send("done")

    async def main() -> None:
        actor = await pactors.spawn_actor(echo_twice, subprocess=QUIET)
        inbox = pactors.current_inbox()
        await actor.send({"me": actor.address, "reply_to": inbox.address})
        assert await inbox.receive() == "done"
        assert await actor.wait() == 0

    run_actors(main)


def test_sys_exit_in_a_subprocess_actor_is_its_exit_status() -> None:
    async def exits(inbox: pactors.Inbox) -> None:
        sys.exit(9)

    async def main() -> None:
        actor = await pactors.spawn_actor(exits, subprocess=QUIET)
        assert await actor.wait() == 9

    run_actors(main)


@pytest.mark.parametrize(("code", "status"), [(None, 0), (True, 1), ("bye", 1), (300, 44)])
def test_sys_exit_codes_follow_the_interpreter(code: Any, status: int) -> None:
    async def exits(inbox: pactors.Inbox) -> None:
        sys.exit(code)

    async def main() -> None:
        actor = await pactors.spawn_actor(exits, subprocess=QUIET)
        assert await actor.wait() == status

    run_actors(main)


async def send_three(inbox: pactors.Inbox) -> None:
    msg = await inbox.receive()
    for i in range(3):
        await msg["to"].send(i)


def test_queued_messages_do_not_make_an_idle_receiver_spin() -> None:
    """The event loop keeps watching an inbox between receives; messages that
    wait while nobody receives must not wake it over and over."""

    async def main() -> float:
        inbox = pactors.current_inbox()
        sender = await pactors.spawn_actor(send_three)
        await sender.send({"to": inbox.address})
        assert await inbox.receive() == 0  # waited: the inbox is watched now
        await anyio.sleep(0.05)  # 1 and 2 are queued by now
        cpu = time.process_time()
        await anyio.sleep(0.5)
        spent = time.process_time() - cpu
        assert [await inbox.receive(), await inbox.receive()] == [1, 2]
        await sender.wait()
        return spent

    assert run_actors(main) < 0.1, "the receiver's event loop spun while messages waited"


def test_a_cancelled_receive_leaves_the_inbox_usable() -> None:
    async def main() -> list[int]:
        inbox = pactors.current_inbox()
        sender = await pactors.spawn_actor(send_three_on_go)
        await sender.send({"reply_to": inbox.address})
        with anyio.move_on_after(0.05):
            await inbox.receive()  # the sender waits for "go": times out
            pytest.fail("received before go")
        await sender.send("go")
        got = [await inbox.receive() for _ in range(3)]
        await sender.wait()
        return got

    assert run_actors(main) == [0, 1, 2]


async def collect(inbox: pactors.Inbox) -> None:
    """Sleeps (so its senders fill the socket), then reports every message."""
    first = await inbox.receive()
    await anyio.sleep(0.3)
    got = [await inbox.receive() for _ in range(first["expect"])]
    await first["reply_to"].send(got)


def test_concurrent_senders_on_a_full_channel_keep_their_order() -> None:
    """Tasks sharing one channel while its socket is full all get through,
    each in its own order (the lock queues them; no task fails to wait)."""
    tasks, per_task = 4, 300

    async def main() -> list[list[int]]:
        inbox = pactors.current_inbox()
        actor = await pactors.spawn_actor(collect, subprocess=QUIET)
        await actor.send({"reply_to": inbox.address, "expect": tasks * per_task})

        async def sender(t: int) -> None:
            for i in range(per_task):
                await actor.send([t, i, "x" * 2000])

        async with anyio.create_task_group() as tg:
            for t in range(tasks):
                tg.start_soon(sender, t)
        got = await inbox.receive()
        assert await actor.wait() == 0
        return [[i for t2, i, _ in got if t2 == t] for t in range(tasks)]

    assert run_actors(main) == [list(range(per_task))] * tasks


def lingering_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection whose client end blocks 5 s in close()
    (SO_LINGER, unsent data, a server end that does not read) until the
    server end is closed."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            client.send(b"x" * 65536)
    return client, server


async def send_lingering_socket(inbox: pactors.Inbox) -> None:
    """Sends a TCP socket whose close blocks for 5 s (SO_LINGER, unsent data,
    a loopback peer that does not read), then waits for "go"."""
    msg = await inbox.receive()
    client, server = lingering_tcp_pair()
    await msg["reply_to"].send({"fd": pactors.Fd(client)})
    os.close(client.detach())  # the receiver holds the socket now
    assert await inbox.receive() == "go"
    server.close()  # resets the connection: the receiver's close returns


def test_a_dropped_peer_descriptor_is_closed_off_the_event_loop() -> None:
    """Closing a descriptor a peer sent can block (here 5 s): a received Fd
    that is dropped must not stall the receiver's event loop."""

    async def main() -> float:
        inbox = pactors.current_inbox()
        sender = await pactors.spawn_actor(send_lingering_socket, subprocess=QUIET)
        await sender.send({"reply_to": inbox.address})
        msg = await inbox.receive()
        started = time.monotonic()
        del msg  # its Fd is garbage now
        await anyio.sleep(0.1)
        stalled = time.monotonic() - started
        await sender.send("go")
        assert await sender.wait() == 0
        deadline = time.monotonic() + 10
        while _closer_busy() and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        return stalled

    assert run_actors(main) < 2, "the event loop waited for a peer's descriptor to close"


def _closer_busy() -> bool:
    """Whether pactors' closer still holds a TCP socket of this process."""
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if not link.startswith("socket:"):
            continue
        inode = link[len("socket:["):-1]
        with open("/proc/self/net/tcp") as f:
            if any(line.split()[9] == inode for line in f.readlines()[1:]):
                return True
    return False


def test_the_supervisor_forks_while_the_closer_is_busy() -> None:
    """pactors' closer thread may be stuck in a peer's close: the supervisor
    is forked all the same (the thread holds nothing the child needs)."""
    client, server = lingering_tcp_pair()
    _wire.close_later([client.detach()])  # blocks the closer for 5 s
    try:
        assert any(t.name == _wire.CLOSER_THREAD for t in threading.enumerate())

        async def main() -> int:
            actor = await pactors.spawn_actor(returns_at_once, subprocess=QUIET)
            return await actor.wait()

        assert run_actors(main) == 0
    finally:
        server.close()  # resets the connection: the closer's close returns
