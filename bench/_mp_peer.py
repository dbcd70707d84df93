"""The multiprocessing peers, run as a main module of their own.

multiprocessing's "spawn" and "forkserver" start methods re-run the parent's
main module in every child (Python 3.11), so the peers run from this small
file rather than from a benchmark script: the children then import no more
than a minimal program would. Prints one JSON object on stdout.

    python bench/_mp_peer.py spawn-latency METHOD RUNS WARMUP BUDGET_S
    python bench/_mp_peer.py round-trips METHOD ROUND_TRIPS BATCHES   (small messages)
    python bench/_mp_peer.py fd-round-trips METHOD ROUND_TRIPS BATCHES
    python bench/_mp_peer.py anyio-round-trips METHOD ROUND_TRIPS BATCHES
    python bench/_mp_peer.py idle-memory METHOD

Keep the top level to multiprocessing, os, sys and time: everything else is
imported inside the functions the parent alone runs.
"""

import multiprocessing
import os
import sys
import time

# Children -------------------------------------------------------------------


def reply_once(conn):
    conn.send("ready")
    conn.close()


def echo(conn):
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg)


def echo_with_handle(conn):
    from multiprocessing import reduction

    ppid = os.getppid()
    while True:
        msg = conn.recv()
        if msg is None:
            return
        fd = reduction.recv_handle(conn)
        conn.send(msg)
        reduction.send_handle(conn, fd, ppid)
        os.close(fd)


def echo_send_fds(sock):
    import pickle
    import socket

    while True:
        data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        msg = pickle.loads(data)
        if msg is None:
            return
        socket.send_fds(sock, [pickle.dumps(msg)], fds)
        for fd in fds:
            os.close(fd)


def anyio_echo(sock):
    import pickle

    import anyio

    async def loop():
        while True:
            await anyio.wait_readable(sock)
            msg = pickle.loads(sock.recv(65536))
            if msg is None:
                return
            sock.send(pickle.dumps(msg))

    sock.setblocking(False)
    anyio.run(loop)


class _Watched:
    """A socket the running asyncio loop keeps watching: each wait is a future,
    not an add_reader/remove_reader pair (as pactors' inboxes wait)."""

    def __init__(self, sock):
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.waiter = None
        self.loop.add_reader(sock.fileno(), self._ready)

    def _ready(self):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self):
        self.waiter = self.loop.create_future()
        await self.waiter
        self.waiter = None


def asyncio_echo(sock):
    import pickle

    import anyio

    async def loop():
        watched = _Watched(sock)
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                await watched.wait()
                continue
            msg = pickle.loads(data)
            if msg is None:
                return
            sock.send(pickle.dumps(msg))

    sock.setblocking(False)
    anyio.run(loop)


def idle(conn):
    conn.send("ready")
    conn.recv()


# Parent ---------------------------------------------------------------------


def spawn_latency(method, runs, warmup, budget_s):
    """Process.start() to the child's first message over a Pipe; the join is not timed."""
    ctx = multiprocessing.get_context(method)
    samples = []
    start = time.perf_counter()
    for i in range(warmup + runs):
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=reply_once, args=(child,))
        t0 = time.perf_counter()
        p.start()
        child.close()
        msg = parent.recv()
        t1 = time.perf_counter()
        parent.close()
        p.join()
        if msg != "ready" or p.exitcode != 0:
            raise RuntimeError(f"{method} child failed: {msg!r}, exit {p.exitcode}")
        if i >= warmup:
            samples.append(t1 - t0)
            if len(samples) >= 10 and time.perf_counter() - start > budget_s:
                break
    return {"samples": samples}


def batch_seconds(batches, run_batch):
    """Times ``batches`` calls of ``run_batch`` after one more as a warmup."""
    times = []
    for b in range(batches + 1):
        t0 = time.perf_counter()
        run_batch()
        if b:
            times.append(time.perf_counter() - t0)
    return times


def round_trips(method, n, batches, window=32):
    """Seconds per batch of n small-message round trips over a duplex Pipe.

    "batch_seconds": one message in flight; "pipelined_seconds": ``window``
    messages sent before their echoes are read.
    """
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=echo, args=(child,))
    p.start()
    child.close()

    def one_in_flight():
        for i in range(n):
            parent.send({"seq": i, "op": "ping"})
            parent.recv()

    def in_windows():
        for i in range(0, n, window):
            for j in range(window):
                parent.send({"seq": i + j, "op": "ping"})
            for _ in range(window):
                parent.recv()

    times = batch_seconds(batches, one_in_flight)
    pipelined = batch_seconds(batches, in_windows)
    parent.send(None)
    p.join()
    return {"batch_seconds": times, "pipelined_seconds": pipelined, "n": n, "window": window}


def fd_round_trips(method, n, batches):
    """Round trips of a small message plus one fd: both mp ways of passing a handle."""
    import pickle
    import socket
    from multiprocessing import reduction

    ctx = multiprocessing.get_context(method)
    r, w = os.pipe()
    out = {"n": n}

    parent, child = ctx.Pipe()
    p = ctx.Process(target=echo_with_handle, args=(child,))
    p.start()
    child.close()

    def with_handles():
        for i in range(n):
            parent.send({"seq": i, "op": "ping"})
            reduction.send_handle(parent, w, p.pid)
            parent.recv()
            os.close(reduction.recv_handle(parent))

    out["send_handle"] = batch_seconds(batches, with_handles)
    parent.send(None)
    p.join()

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = ctx.Process(target=echo_send_fds, args=(theirs,))
    p.start()
    theirs.close()

    def with_send_fds():
        for i in range(n):
            socket.send_fds(ours, [pickle.dumps({"seq": i, "op": "ping"})], [w])
            data, fds, _, _ = socket.recv_fds(ours, 4096, 1)
            pickle.loads(data)
            for fd in fds:
                os.close(fd)

    out["send_fds"] = batch_seconds(batches, with_send_fds)
    socket.send_fds(ours, [pickle.dumps(None)], [w])
    p.join()
    os.close(r)
    os.close(w)
    return out


def anyio_round_trips(method, n, batches, watched=False):
    """The floor for an anyio program: recv/send + pickle on both sides, and a
    wait for the socket: anyio.wait_readable, or with ``watched`` a future of a
    loop that keeps the socket registered between waits."""
    import pickle
    import socket

    import anyio

    ctx = multiprocessing.get_context(method)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    p = ctx.Process(target=asyncio_echo if watched else anyio_echo, args=(theirs,))
    p.start()
    theirs.close()
    ours.setblocking(False)

    async def main():
        wait = _Watched(ours).wait if watched else lambda: anyio.wait_readable(ours)
        times = []
        for b in range(batches + 1):
            t0 = time.perf_counter()
            for i in range(n):
                ours.send(pickle.dumps({"seq": i, "op": "ping"}))
                while True:
                    try:
                        data = ours.recv(65536)
                        break
                    except BlockingIOError:
                        await wait()
                pickle.loads(data)
            if b:
                times.append(time.perf_counter() - t0)
        ours.send(pickle.dumps(None))
        return times

    times = anyio.run(main)
    p.join()
    return {"batch_seconds": times, "n": n}


def idle_memory(method):
    """smaps_rollup fields of an idle child blocked in Connection.recv()."""
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    p = ctx.Process(target=idle, args=(child,))
    p.start()
    child.close()
    parent.recv()
    time.sleep(0.2)
    fields = {}
    with open(f"/proc/{p.pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    parent.send(None)
    p.join()
    return {"smaps": fields}


def main():
    import json

    what, method, *rest = sys.argv[1:]
    if what == "spawn-latency":
        result = spawn_latency(method, int(rest[0]), int(rest[1]), float(rest[2]))
    elif what == "round-trips":
        result = round_trips(method, int(rest[0]), int(rest[1]))
    elif what == "fd-round-trips":
        result = fd_round_trips(method, int(rest[0]), int(rest[1]))
    elif what == "anyio-round-trips":
        result = anyio_round_trips(method, int(rest[0]), int(rest[1]))
    elif what == "asyncio-round-trips":
        result = anyio_round_trips(method, int(rest[0]), int(rest[1]), watched=True)
    elif what == "idle-memory":
        result = idle_memory(method)
    else:
        raise SystemExit(f"unknown measurement {what!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
