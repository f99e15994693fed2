"""Micro-benchmarks of the C core (pytest-benchmark): `pytest bench/test_micro.py`.

fd passing: one round = one sendmsg of a batch + one recvmsg + closing the
received fds, as a worker does. fds/s = batch / round time, in extra_info.
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
        for _tag, fd in ch.recv() or ():
            os.close(fd)

    benchmark(intake)
    benchmark.extra_info["fds_per_second"] = 64 / benchmark.stats.stats.mean
    ch.close()
    table.close()
    for fd in fds:
        os.close(fd)
