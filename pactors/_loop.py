"""The event loop pactors runs actors on: asyncio's, plus an idle wait.

A task waiting for a message normally costs two turns of the loop: the loop
polls, runs a callback that resolves a future, then polls again and resumes
the task. That is most of a small message's round trip. ``ActorLoop`` lets
a task that is about to wait for one descriptor block on it directly
instead, but only when the loop has nothing else to do: no callback ready
and no timer due. Anything that would wake the loop wakes that wait too, so
the loop misses nothing:

- the loop's own epoll descriptor is polled beside the task's, so I/O that
  another task waits for ends the wait;
- the wait lasts no longer than the time to the loop's next timer;
- other threads (``call_soon_threadsafe``, anyio's worker threads) and
  signals reach the loop through its self-pipe, which that epoll watches.

When the wait ends for any reason but the task's descriptor, the task
awaits as usual and the loop takes over.

This reads attributes of ``asyncio.BaseEventLoop`` that are not public
(``_ready``, ``_scheduled``, ``_stopping``, ``_debug``): those its
``_run_once`` decides its own wait by. Where they do not exist, or the loop
is in debug mode (whose slow-callback report would count the wait), the
idle wait is never used.
"""

from __future__ import annotations

import asyncio
import math
import select
import selectors
from typing import Any


class ActorLoop(asyncio.SelectorEventLoop):
    """asyncio's selector event loop with ``wait_readable_if_idle``."""

    def __init__(self) -> None:
        super().__init__(selectors.EpollSelector())
        self._idle_ok = all(hasattr(self, name) for name in _RUN_ONCE_STATE)
        selector: Any = self._selector  # type: ignore[attr-defined]
        self._idle_poll = select.poll()
        self._idle_poll.register(selector.fileno(), select.POLLIN)
        self._idle_fd = -1

    def wait_readable_if_idle(self, fd: int) -> bool:
        """Blocks until ``fd`` is readable, for as long as the loop would idle.

        Returns True once ``fd`` is readable (or has an error or hang-up to
        report). Returns False, at once or later, when the loop has other work:
        a callback ready, a timer due, or a descriptor it watches ready. The
        caller must then await ``fd`` through the loop as usual.

        Call it only from a task running on this loop.
        """
        if not self._idle_ok:
            return False
        if self._ready or self._stopping or self._debug:  # type: ignore[attr-defined]
            return False
        timeout_ms = -1
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if scheduled:
            # The first timer may have been cancelled: waking for it early
            # only hands control back to the loop.
            delay = scheduled[0]._when - self.time()
            if delay <= 0:
                return False
            timeout_ms = math.ceil(delay * 1000)
        if fd != self._idle_fd:
            if self._idle_fd >= 0:
                self._idle_poll.unregister(self._idle_fd)
            self._idle_poll.register(fd, select.POLLIN)  # poll(2) adds errors and hang-ups
            self._idle_fd = fd
        for ready, _ in self._idle_poll.poll(timeout_ms):  # noqa: SIM110 - any() costs a frame
            if ready == fd:
                return True
        return False


# What BaseEventLoop._run_once decides its wait by.
_RUN_ONCE_STATE = ("_ready", "_scheduled", "_stopping", "_debug")


def backend_options(backend: str) -> dict[str, Any]:
    """``anyio.run``'s backend options that put asyncio on ``ActorLoop``."""
    return {"loop_factory": ActorLoop} if backend == "asyncio" else {}
