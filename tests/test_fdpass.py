"""fd batches over SOCK_SEQPACKET (csrc/fdpass.c) through the Cython binding."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator

import pytest

from fastcluster import _core


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def make_fds(n: int) -> list[int]:
    return [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(n)]


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@pytest.mark.parametrize("n", [1, 16, 253])
def test_batch_crosses_with_tags_and_cloexec(pair: tuple[socket.socket, socket.socket], n: int) -> None:
    a, b = pair
    fds = make_fds(n)
    # each fd is a file of a distinct size so the receiver can tell them apart
    close_all(fds)
    fds = [os.memfd_create(f"t{i}", os.MFD_CLOEXEC) for i in range(n)]
    for i, fd in enumerate(fds):
        os.ftruncate(fd, i)
    assert _core.send_fds(a.fileno(), fds, [i * 7 for i in range(n)]) == n
    got, tags = _core.recv_fds(b.fileno())
    try:
        assert len(got) == n
        assert tags == [i * 7 for i in range(n)]
        assert [os.fstat(fd).st_size for fd in got] == list(range(n))
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in got)
        assert not set(got) & set(fds)
    finally:
        close_all(got)
        close_all(fds)


def test_truncated_batch_closes_what_arrived(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    fds = make_fds(16)
    _core.send_fds(a.fileno(), fds)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as info:
        _core.recv_fds(b.fileno(), max_fds=4)
    assert info.value.errno == errno.EMSGSIZE
    assert "recvmsg" in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == before  # nothing leaked
    close_all(fds)


def test_backpressure_is_blocking_io_error(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setblocking(False)
    fds = make_fds(1)
    sent = 0
    with pytest.raises(BlockingIOError):
        for _ in range(100_000):
            _core.send_fds(a.fileno(), fds)
            sent += 1
    assert sent > 0
    b.setblocking(False)
    for _ in range(sent):
        got, _tags = _core.recv_fds(b.fileno())
        close_all(got)
    with pytest.raises(BlockingIOError):
        _core.recv_fds(b.fileno())
    close_all(fds)


def test_hang_up_and_garbage(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.send(b"no fds here")
    with pytest.raises(OSError) as info:
        _core.recv_fds(b.fileno())
    assert info.value.errno == errno.EBADMSG
    a.close()
    assert _core.recv_fds(b.fileno()) == ([], [])


def test_bad_arguments_name_themselves(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    with pytest.raises(ValueError, match="fds must hold 1 to 253"):
        _core.send_fds(a.fileno(), [])
    with pytest.raises(ValueError, match="fds must hold 1 to 253"):
        _core.send_fds(a.fileno(), [0] * 254)
    with pytest.raises(TypeError, match="sock must be an int"):
        _core.send_fds("x", [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tags must have one tag per fd"):
        _core.send_fds(a.fileno(), [0], [1, 2])
    with pytest.raises(ValueError, match="max_fds must be 1 to 253"):
        _core.recv_fds(a.fileno(), max_fds=0)
    with pytest.raises(OSError) as info:
        _core.send_fds(a.fileno(), [987654])
    assert info.value.errno == errno.EBADF
