"""Micro-benchmarks (pytest-benchmark): `pytest bench/test_micro.py`.

- fd passing: one round = one sendmsg of a batch + one recvmsg + closing the
  received fds, as a worker does. fds/s = batch / round time, in extra_info.
- worker intake: a batch of 64 received and counted taken.
- dispatch: the primary's C loop accepting, choosing and passing 64
  connections (µs per connection in extra_info).
- message round trip: a JSON message to a forked echo process and back over
  a control channel.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from fastcluster import _core


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("batch", [1, 16, 253])
def test_fd_passing(benchmark: Any, pair: tuple[socket.socket, socket.socket], batch: int) -> None:
    a, b = pair
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(batch)]
    tags = list(range(batch))
    sfd, rfd = a.fileno(), b.fileno()
    send, recv, close = _core.send_fds, _core.recv_fds, os.close

    def round_trip() -> None:
        send(sfd, fds, tags)
        got, _ = recv(rfd)
        for fd in got:
            close(fd)
        assert len(got) == batch  # a short batch would time less work

    benchmark(round_trip)
    benchmark.extra_info["fds_per_second"] = batch / benchmark.stats.stats.mean
    for fd in fds:
        os.close(fd)


def test_worker_intake(benchmark: Any, pair: tuple[socket.socket, socket.socket]) -> None:
    """The worker's side: receive a batch of 64 and count it taken in shared memory."""
    a, b = pair
    table = _core.CounterTable(1)
    ch = _core.WorkerChannel(os.dup(b.fileno()), table, 0)
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(64)]
    sfd = a.fileno()

    def intake() -> None:
        _core.send_fds(sfd, fds)
        got = ch.recv() or ()
        for _tag, fd in got:
            os.close(fd)
        assert len(got) == 64

    benchmark(intake)
    benchmark.extra_info["fds_per_second"] = 64 / benchmark.stats.stats.mean
    ch.close()
    table.close()
    for fd in fds:
        os.close(fd)


def test_dispatch_batch(benchmark: Any) -> None:
    """The primary's per-connection work, in C: accept4 a backlog of 64
    loopback connections, choose a worker for each (rr over 2) and pass them
    in one sendmsg per worker, closing its copies (the dispatcher holds the
    workers' ends). Each round's connections are made beforehand (not timed)
    and drained by the "workers" afterwards (not timed either)."""
    n = 64
    table = _core.CounterTable(2)
    d = _core.Dispatcher(table, window=4 * n, policy=_core.POLICY_RR)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    lid = d.add_listener(listener.fileno())
    chans = []
    for slot in range(2):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        d.add_worker(slot, mine.detach(), theirs.fileno())
        d.subscribe(slot, lid)
        chans.append(_core.WorkerChannel(theirs.detach(), table, slot))
    clients: list[socket.socket] = []

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        taken = 0
        for ch in chans:  # the previous round's connections, taken and closed
            while batch := ch.recv():
                taken += len(batch)
                for _tag, fd in batch:
                    os.close(fd)
        # every connection of the previous round reached a worker
        assert taken == (n if clients else 0), taken
        for c in clients:
            c.close()
        clients.clear()
        clients.extend(socket.create_connection(listener.getsockname()) for _ in range(n))
        return (), {}

    def dispatch() -> None:
        start = d.stats()["accepted"]
        while d.stats()["accepted"] - start < n:
            d.run(0)  # one pass: accept, choose, send

    benchmark.pedantic(dispatch, setup=setup, rounds=200, warmup_rounds=5)
    benchmark.extra_info["connections_per_second"] = n / benchmark.stats.stats.mean
    benchmark.extra_info["us_per_connection"] = benchmark.stats.stats.mean / n * 1e6
    setup()
    for c in clients:
        c.close()
    d.close()
    for ch in chans:
        ch.close()
    listener.close()
    table.close()


def test_message_round_trip(benchmark: Any) -> None:
    """A JSON message primary -> worker -> primary over a control channel
    (AF_UNIX stream, our framing), the worker a real forked process echoing
    each frame back: encode, send, wake, read, decode, twice."""
    import select

    from fastcluster.wire.channel import ControlSocket
    from fastcluster.wire.frames import encode_message

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            a.close()
            echo = ControlSocket(b)
            while True:
                select.select([echo], [], [])
                alive = echo.read()
                for frame in echo.frames():
                    echo.send_blocking(encode_message(frame["d"]))
                if not alive:
                    break
            code = 0
        finally:
            os._exit(code)
    b.close()
    primary = ControlSocket(a)
    message = {"cmd": "stats", "worker": 1, "values": [1, 2, 3]}

    def round_trip() -> None:
        primary.send_blocking(encode_message(message))
        while True:
            select.select([primary], [], [])
            primary.read()
            for frame in primary.frames():
                assert frame["d"] == message
                return

    benchmark(round_trip)
    benchmark.extra_info["round_trips_per_second"] = 1 / benchmark.stats.stats.mean
    primary.close()
    os.waitpid(pid, 0)
