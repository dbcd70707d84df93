"""pactors' event loop: a receiver that blocks while the loop is idle must
never hold up anything the loop itself would have woken for.

Each test parks a task in ``receive()`` on an inbox whose one sender never
sends, while its own task waits for an event 0.2 s away; it checks that the
parked task did block in ``ActorLoop.wait_readable_if_idle``
(so the test exercises it), and that a timer, another task's descriptor, a
thread's result, a signal or a cancellation still arrive on time. A broken
idle wait would block until a watchdog thread sends the message after
``WATCHDOG_S``: the tests then fail on the time, not by hanging.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest

import pactors
from pactors import _loop, _wire
from pactors._inbox import Inbox

WATCHDOG_S = 3.0
SETTLE_S = 0.05  # the receiver parks this long after the test's task started
PROMPT_S = 0.5  # far below the watchdog, far above scheduling noise


class IdleWaits:
    """Records each call of ``wait_readable_if_idle``: (result, seconds)."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, float]] = []

    def blocked(self, at_least: float) -> bool:
        return any(seconds >= at_least for _, seconds in self.calls)


@pytest.fixture
def idle_waits(monkeypatch: pytest.MonkeyPatch) -> IdleWaits:
    record = IdleWaits()
    original = _loop.ActorLoop.wait_readable_if_idle

    def counted(self: _loop.ActorLoop, fd: int) -> bool:
        t0 = time.monotonic()
        result = original(self, fd)
        record.calls.append((result, time.monotonic() - t0))
        return result

    monkeypatch.setattr(_loop.ActorLoop, "wait_readable_if_idle", counted)
    return record


class ParkedReceiver:
    """An inbox with one silent sender, and a watchdog that sends after
    ``WATCHDOG_S`` unless the test ends first."""

    def __init__(self, senders: int) -> None:
        self.inbox = Inbox()
        self.channels = [self.inbox._new_local_channel() for _ in range(senders)]
        self.channel = self.channels[0]
        self._done = threading.Event()
        self._watchdog = threading.Thread(target=self._bark, name="test-watchdog")

    def _bark(self) -> None:
        if not self._done.wait(WATCHDOG_S):
            sock = self.channel._sock
            assert sock is not None
            data, _ = pactors._codec.encode("watchdog", lambda _: None)
            _wire.send_frame_blocking(sock, _wire.MSG, data)

    async def receive_forever(self) -> None:
        # Enter receive() from a timer, once the test's task waits for its
        # event: the loop has nothing else to do then, so the receiver blocks.
        await anyio.sleep(SETTLE_S)
        got = await self.inbox.receive()
        pytest.fail(f"the parked receiver got {got!r}: the loop was held up until the "
                    "watchdog fired")

    def __enter__(self) -> ParkedReceiver:
        self._watchdog.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._watchdog.join()
        for channel in self.channels:
            channel.close()
        self.inbox.close()


@pytest.fixture(params=[1, 2], ids=["one sender", "two senders"])
def senders(request: pytest.FixtureRequest) -> int:
    """How many senders the parked inbox has: with one, the receiver polls
    that socket; with more, the inbox's epoll descriptor."""
    return int(request.param)


def run(main: Callable[[ParkedReceiver], Awaitable[Any]], senders: int) -> Any:
    async def wrapper() -> Any:
        assert isinstance(asyncio_loop(), _loop.ActorLoop)
        with ParkedReceiver(senders) as parked:
            async with anyio.create_task_group() as tg:
                tg.start_soon(parked.receive_forever)
                result = await main(parked)
                tg.cancel_scope.cancel()
            return result

    return pactors.run(wrapper)


def asyncio_loop() -> Any:
    import asyncio

    return asyncio.get_running_loop()


def test_a_timer_fires_on_time(idle_waits: IdleWaits, senders: int) -> None:
    async def main(parked: ParkedReceiver) -> float:
        t0 = time.monotonic()
        await anyio.sleep(0.2)  # the receiver runs now, and blocks until this is due
        return time.monotonic() - t0

    slept = run(main, senders)
    assert slept < 0.2 + PROMPT_S
    assert idle_waits.blocked(0.1), idle_waits.calls


def test_another_tasks_descriptor_wakes_it(idle_waits: IdleWaits, senders: int) -> None:
    r, w = socket.socketpair()

    def write_later() -> None:
        time.sleep(0.2)
        w.send(b"x")

    async def main(parked: ParkedReceiver) -> float:
        writer = threading.Thread(target=write_later)
        writer.start()
        try:
            t0 = time.monotonic()
            await anyio.wait_readable(r)  # registered before the receiver blocks
            return time.monotonic() - t0
        finally:
            writer.join()

    try:
        waited = run(main, senders)
    finally:
        r.close()
        w.close()
    assert waited < 0.2 + PROMPT_S
    assert idle_waits.blocked(0.1), idle_waits.calls


def test_a_call_from_another_thread_arrives(idle_waits: IdleWaits, senders: int) -> None:
    async def main(parked: ParkedReceiver) -> float:
        arrived = anyio.Event()
        token = anyio.lowlevel.current_token()

        def call_later() -> None:
            time.sleep(0.2)
            anyio.from_thread.run_sync(arrived.set, token=token)

        caller = threading.Thread(target=call_later)
        t0 = time.monotonic()
        caller.start()
        try:
            await arrived.wait()
            return time.monotonic() - t0
        finally:
            caller.join()

    assert run(main, senders) < 0.2 + PROMPT_S
    assert idle_waits.blocked(0.1), idle_waits.calls


def test_a_signal_is_handled(idle_waits: IdleWaits, senders: int) -> None:
    def kill_later() -> None:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    async def main(parked: ParkedReceiver) -> float:
        with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
            killer = threading.Thread(target=kill_later)
            t0 = time.monotonic()
            killer.start()
            try:
                async for _ in signals:
                    return time.monotonic() - t0
            finally:
                killer.join()
        raise AssertionError("unreachable")

    assert run(main, senders) < 0.2 + PROMPT_S
    assert idle_waits.blocked(0.1), idle_waits.calls


def test_a_receive_is_cancelled_on_time(idle_waits: IdleWaits, senders: int) -> None:
    async def main(parked: ParkedReceiver) -> float:
        inbox = Inbox()
        channel = inbox._new_local_channel()
        try:
            t0 = time.monotonic()
            with anyio.move_on_after(0.2):
                await inbox.receive()
            elapsed = time.monotonic() - t0
            await channel.send("still usable")
            assert await inbox.receive() == "still usable"
            return elapsed
        finally:
            channel.close()
            inbox.close()

    assert 0.19 < run(main, senders) < 0.2 + PROMPT_S
    assert idle_waits.blocked(0.1), idle_waits.calls


def test_a_message_from_a_subprocess_actor_ends_the_idle_wait(idle_waits: IdleWaits,
                                                              senders: int) -> None:
    async def late_echo(inbox: pactors.Inbox) -> None:
        msg = await inbox.receive()
        await anyio.sleep(0.2)
        await msg["reply_to"].send("late")

    async def main() -> Any:
        inbox = pactors.current_inbox()
        silent = [inbox._new_local_channel() for _ in range(senders - 1)]
        actor = await pactors.spawn_actor(late_echo, subprocess=pactors.Subprocess())
        await actor.send({"reply_to": inbox.address})
        reply = await inbox.receive()
        assert await actor.wait() == 0
        for channel in silent:
            channel.close()
        return reply

    assert pactors.run(main) == "late"
    assert (True, pytest.approx(0.2, abs=0.15)) in [
        (result, seconds) for result, seconds in idle_waits.calls if result]


def test_a_flood_of_messages_does_not_starve_the_other_tasks() -> None:
    """A receiver that always finds a message waiting never has to wait, so
    it must yield now and then on its own: a peer that keeps its inbox full
    (a container's actor, say) must not hold up the rest of the process."""
    work_s = 0.001  # per message

    async def main() -> tuple[int, float]:
        inbox = Inbox()
        channel = inbox._new_local_channel()
        sock = channel._sock
        assert sock is not None
        data, _ = pactors._codec.encode({"op": "noise"}, lambda _: None)
        queued = 0
        while True:  # fill the socket: every receive below finds a message
            try:
                _wire.send_message_nowait(sock, data)
            except BlockingIOError:
                break
            queued += 1
        ticks = [time.monotonic()]

        async def ticker() -> None:
            while True:
                await anyio.sleep(0)
                ticks.append(time.monotonic())

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                await anyio.sleep(0.01)
                for _ in range(queued):
                    await inbox.receive()
                    time.sleep(work_s)  # the actor's own work on the message
                ticks.append(time.monotonic())  # the gap up to now counts too
                tg.cancel_scope.cancel()
        finally:
            channel.close()
            inbox.close()
        return queued, max(b - a for a, b in itertools.pairwise(ticks))

    queued, longest = pactors.run(main)
    assert queued >= 100, "the socket should hold a few hundred small messages"
    # Without yields the ticker would wait for the whole flood (queued ms).
    assert longest < 0.1, f"another task waited {longest:.3f} s for {queued} messages"


def test_wait_readable_if_idle_defers_to_ready_callbacks_and_timers() -> None:
    loop = _loop.ActorLoop()
    r, w = socket.socketpair()
    done = threading.Event()

    def watchdog() -> None:  # a broken wait returns True once this writes
        while not done.wait(WATCHDOG_S):
            w.send(b"w")

    async def main() -> None:
        # A callback is ready: no wait at all.
        loop.call_soon(lambda: None)
        assert loop.wait_readable_if_idle(r.fileno()) is False
        await anyio.sleep(0.01)  # the loop runs it
        # Debug mode, which would report the wait as a slow callback: none.
        loop.set_debug(True)
        await anyio.sleep(0.01)  # set_debug() queues callbacks: let them run
        assert loop.wait_readable_if_idle(r.fileno()) is False
        loop.set_debug(False)
        await anyio.sleep(0.01)
        # A timer due in 0.2 s bounds the wait.
        loop.call_later(0.2, lambda: None)
        t0 = time.monotonic()
        assert loop.wait_readable_if_idle(r.fileno()) is False
        assert 0.19 < time.monotonic() - t0 < 0.2 + PROMPT_S
        await anyio.sleep(0.01)  # the loop runs it
        # Nothing else to do: wait until readable.
        t0 = time.monotonic()
        writer = threading.Timer(0.2, w.send, (b"x",))
        writer.start()
        assert loop.wait_readable_if_idle(r.fileno()) is True
        assert 0.19 < time.monotonic() - t0 < 0.2 + PROMPT_S
        assert r.recv(1) == b"x"
        writer.join()

    dog = threading.Thread(target=watchdog)
    dog.start()
    try:
        anyio.run(main, backend_options={"loop_factory": lambda: loop})
    finally:
        done.set()
        dog.join()
        r.close()
        w.close()


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    yield
    assert threading.active_count() == 1 or all(
        t.name.startswith(("AnyIO worker", _wire.CLOSER_THREAD))
        for t in threading.enumerate() if t is not threading.main_thread())
