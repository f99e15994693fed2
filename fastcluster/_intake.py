"""The worker's end of its data channel: batches of fds -> per-listener queues.

Theory of operation: the primary's C dispatcher sends a worker batches of
accepted fds over one SOCK_SEQPACKET channel, each fd tagged with the id
(lid) of the listening socket it came from. A worker may listen on several
addresses, so batches are routed here to one Port per lid. A Port is what a
Listener's fileno() shows a selector: an epoll fd holding

  - the data channel, readable when a batch is waiting (for anyone), and
  - the port's eventfd, kept signalled while the port's queue is not empty,

so a selector wakes while this listener has fds it has not handed out, and
no server sleeps on connections that were already delivered. Whoever takes
from a Port first pulls any waiting batches and routes them. fds for a lid
nobody listens on any more are closed (and counted closed for `least`).

stop() (graceful disconnect) drains what the channel holds, then closes it:
the primary re-dispatches anything sent after that to other workers. The
queues keep what was already received; listeners hand those out to the end.
All of it is under one lock: the aio loop, a socketserver thread and the
control thread may all touch it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import threading

from ._core import WorkerChannel

log = logging.getLogger("fastcluster")

MAX_BATCHES_PER_PULL = 16


class Port:
    """One listener's queue of received fds, and the fd a selector watches."""

    def __init__(self, lid: int, channel_fd: int | None) -> None:
        self.lid = lid
        self.fds: collections.deque[int] = collections.deque()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep = select.epoll()
        self.ep.register(self.efd, select.EPOLLIN)
        self.channel_fd = channel_fd
        if channel_fd is not None:
            self.ep.register(channel_fd, select.EPOLLIN)
        self.signalled = False
        self.closed = False

    def fileno(self) -> int:
        return self.ep.fileno()

    def sync(self) -> None:
        """Keeps the eventfd signalled exactly while the queue is not empty."""
        if self.closed:
            return
        if self.fds and not self.signalled:
            os.eventfd_write(self.efd, 1)
            self.signalled = True
        elif not self.fds and self.signalled:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.efd)
            self.signalled = False

    def forget_channel(self) -> None:
        if self.channel_fd is not None and not self.closed:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(self.channel_fd)
        self.channel_fd = None


class Intake:
    def __init__(self, channel: WorkerChannel | None) -> None:
        self.channel = channel
        self.lock = threading.RLock()
        self.ports: dict[int, Port] = {}
        self.stopped = channel is None

    def open_port(self, lid: int) -> Port:
        with self.lock:
            if lid in self.ports:
                raise OSError(errno.EADDRINUSE, "this worker already listens on that address")
            port = Port(lid, None if self.stopped or self.channel is None
                        else self.channel.fileno())
            self.ports[lid] = port
            return port

    def take(self, port: Port) -> int | None:
        """One fd for port (now the caller's), or None if none is waiting."""
        with self.lock:
            if port.closed:
                raise OSError(errno.EBADF, "listener is closed")
            if not port.fds and not self.stopped:
                self._pull()
            fd = port.fds.popleft() if port.fds else None
            port.sync()
            return fd

    def _pull(self, max_batches: int = MAX_BATCHES_PER_PULL) -> None:
        channel = self.channel
        assert channel is not None
        touched: set[Port] = set()
        for _ in range(max_batches):
            try:
                batch = channel.recv()
            except (OSError, ValueError) as e:
                log.error("fastcluster: worker data channel failed (%s); taking no more "
                          "connections", e)
                self._close_channel()
                break
            if batch is None:
                self._close_channel()
                break
            if not batch:
                break
            for lid, fd in batch:
                port = self.ports.get(lid)
                if port is None or port.closed:
                    os.close(fd)
                    channel.connection_closed(1)
                    continue
                port.fds.append(fd)
                touched.add(port)
        for port in touched:
            port.sync()

    def _close_channel(self) -> None:
        self.stopped = True
        for port in self.ports.values():
            port.forget_channel()
        if self.channel is not None:
            self.channel.close()

    def stop(self) -> None:
        """Takes what the channel holds, then closes it (graceful disconnect)."""
        with self.lock:
            if self.stopped:
                return
            self._pull(max_batches=1 << 20)
            self._close_channel()

    def queued(self) -> int:
        with self.lock:
            return sum(len(p.fds) for p in self.ports.values())

    def connection_closed(self) -> None:
        if self.channel is not None:
            self.channel.connection_closed(1)

    def close_port(self, port: Port) -> None:
        with self.lock:
            if port.closed:
                return
            if self.ports.get(port.lid) is port:
                del self.ports[port.lid]
            while port.fds:
                os.close(port.fds.popleft())
                self.connection_closed()
            port.closed = True
            port.ep.close()
            os.close(port.efd)

    def close(self) -> None:
        """Closes every port and the channel (worker exit, or fork away)."""
        with self.lock:
            for port in list(self.ports.values()):
                self.close_port(port)
            self._close_channel()
