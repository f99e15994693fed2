"""The worker's end of its data channel: batches of fds -> per-listener queues.

Theory of operation: the primary's C dispatcher sends a worker batches of
accepted fds over one SOCK_SEQPACKET channel, each fd tagged with the id
(lid) of the listening socket it came from. A worker may listen on several
addresses, so batches are routed here to one Port per lid. A Port's fileno()
is what a selector watches for its Listener: an epoll fd holding the port's
eventfd, kept signalled while the port's queue is not empty, so a server
never sleeps on connections that were already delivered. Readiness must
also mean "a connection for *this* listener", or a blocking accept() after
select() would wait for its own connection while a sibling's sits queued.
So, two modes:

  direct  (one port, the usual case) the port's epoll also holds the data
          channel: accept() pulls batches itself, no other thread involved.
  routed  (two ports or more) no port holds the channel; a router (the
          worker's channel thread) watches it and calls pull(), which routes
          each fd to its port and signals that port's eventfd. accept()
          still pulls opportunistically when its queue is empty.

fds for a lid nobody listens on any more are closed (and counted closed, for
`least`).

Holding only what can be started. The primary never has more than this
worker's `window` fds in flight to it; the worker sets it (limit_window):
to what its free fds can take (fdbudget.py, lowered as they run out) and,
for a server that starts one connection at a time (a plain socketserver), to
1, so a kill loses the connection being served, not a batch. Before each
receive the intake checks that what the channel holds fits under
RLIMIT_NOFILE; when it does not (or a batch was cut short anyway, EMSGSIZE),
the worker is at its limit: hand_back() closes the channel without reading
it, the primary reads back every fd in it (its hold on our end) and serves
them elsewhere, and on_limit tells the runtime to leave.

stop() (graceful disconnect) drains what the channel holds, then closes it:
the primary passes anything sent later to other workers. Queues
keep what was received; listeners hand those out to the end. Everything is
under one lock: the asyncio loop, socketserver threads and the channel
thread may all touch it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Protocol

from .._core import WorkerChannel
from .fdbudget import FdBudget

log = logging.getLogger("fastcluster")

MAX_BATCHES_PER_PULL = 16


class Router(Protocol):
    def route(self, fd: int | None) -> None:
        """Watch this data channel fd and call Intake.pull() when it is
        readable (None: stop watching)."""


class Port:
    """One listener's queue of received fds, and the fd a selector watches."""

    def __init__(self, lid: int) -> None:
        self.lid = lid
        self.fds: collections.deque[int] = collections.deque()
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ep = select.epoll()
        self.ep.register(self.efd, select.EPOLLIN)
        self.channel_fd: int | None = None  # registered in ep (direct mode)
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

    def watch_channel(self, fd: int | None) -> None:
        if self.closed or fd == self.channel_fd:
            return
        if self.channel_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ep.unregister(self.channel_fd)
        self.channel_fd = fd
        if fd is not None:
            self.ep.register(fd, select.EPOLLIN)


class Intake:
    def __init__(self, channel: WorkerChannel | None, router: Router | None = None) -> None:
        self.channel = channel
        self.router = router
        self.lock = threading.RLock()
        self.ports: dict[int, Port] = {}
        self.stopped = channel is None
        self._routed = False
        self.on_failure: Callable[[], None] | None = None  # the channel failed (runtime)
        self.on_limit: Callable[[str], None] | None = None  # at the fd limit (runtime)
        self.on_window: Callable[[int], None] | None = None  # window lowered (runtime)
        self.window = 1 << 16  # fds the primary may have in flight to us (limit_window)
        self.budget: FdBudget | None = None  # set by the runtime (None: unchecked)

    def _arrange(self) -> None:
        """Direct mode for one port, routed mode for more (see above)."""
        fd = None if self.stopped or self.channel is None else self.channel.fileno()
        routed = fd is not None and len(self.ports) > 1 and self.router is not None
        for port in self.ports.values():
            port.watch_channel(None if routed else fd)
        if routed != self._routed and self.router is not None:
            self._routed = routed
            self.router.route(fd if routed else None)

    def open_port(self, lid: int) -> Port:
        with self.lock:
            if lid in self.ports:
                raise OSError(errno.EADDRINUSE, "this worker already listens on that address")
            port = Port(lid)
            self.ports[lid] = port
            self._arrange()
            return port

    def take(self, port: Port) -> int | None:
        """One fd for port (now the caller's), or None if none is waiting."""
        with self.lock:
            if port.closed:
                raise OSError(errno.EBADF, "listener is closed")
            if not port.fds and not self.stopped:
                # a small window is a server that starts few at once: one batch
                self._pull(1 if self.window < MAX_BATCHES_PER_PULL else MAX_BATCHES_PER_PULL)
            fd = port.fds.popleft() if port.fds else None
            port.sync()
            return fd

    def take_many(self, port: Port, limit: int) -> list[int]:
        """Up to limit fds for port (now the caller's): one lock, one pull."""
        with self.lock:
            if port.closed:
                raise OSError(errno.EBADF, "listener is closed")
            if not port.fds and not self.stopped:
                self._pull()
            fds = port.fds
            got = [fds.popleft() for _ in range(min(limit, len(fds)))]
            port.sync()
            return got

    def pull(self) -> None:
        """Routes what the channel holds (the router calls it)."""
        with self.lock:
            if not self.stopped:
                self._pull()

    def _pull(self, max_batches: int = MAX_BATCHES_PER_PULL) -> None:
        channel = self.channel
        assert channel is not None
        touched: set[Port] = set()
        budget = self.budget
        for _ in range(max_batches):
            if budget is not None and not budget.room(self.window, channel.fileno()):
                self._at_limit(f"{max(budget.free(), 0)} fds free of RLIMIT_NOFILE="
                               f"{budget.limit}, fewer than its channel holds")
                break
            try:
                batch = channel.recv()
            except (OSError, ValueError) as e:
                if isinstance(e, OSError) and e.errno == errno.EMSGSIZE:
                    self._at_limit(f"a batch did not fit under RLIMIT_NOFILE ({e}); its "
                                   "connections are lost")
                    break
                log.error("fastcluster: worker data channel failed (%s); taking no more "
                          "connections", e)
                self._close_channel()
                if self.on_failure is not None:
                    self.on_failure()
                break
            if batch is None:
                self._close_channel()
                break
            if not batch:
                break
            if budget is not None:
                budget.held += len(batch)
                lower = budget.lower(self.window)
                if lower < self.window and self.on_window is not None:
                    self.window = lower
                    self.on_window(lower)  # the primary sends no batch larger from now
            for lid, fd in batch:
                port = self.ports.get(lid)
                if port is None or port.closed:
                    os.close(fd)
                    self.connection_closed()
                    continue
                port.fds.append(fd)
                touched.add(port)
        for port in touched:
            port.sync()

    def _at_limit(self, why: str) -> None:
        log.error("fastcluster: worker out of fds (%s): taking no more connections; "
                  "the ones its channel holds go to other workers", why)
        self.hand_back()
        if self.on_limit is not None:
            self.on_limit(why)

    def hand_back(self) -> None:
        """Closes the channel unread: the primary passes what it holds on."""
        with self.lock:
            self._close_channel()

    def limit_window(self, window: int) -> int:
        """Lowers the window (never raises it); returns the window now."""
        with self.lock:
            self.window = max(1, min(self.window, window))
            return self.window

    def _close_channel(self) -> None:
        if self.stopped and self.channel is None:
            return
        self.stopped = True
        self._arrange()  # nobody watches the channel any more
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
        if self.budget is not None:
            self.budget.held -= 1
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
            port.watch_channel(None)
            port.closed = True
            port.ep.close()
            os.close(port.efd)
            self._arrange()

    def close(self) -> None:
        """Closes every port and the channel (worker exit)."""
        with self.lock:
            for port in list(self.ports.values()):
                self.close_port(port)
            self._close_channel()

    def forget(self) -> None:
        """In a child the worker's code forked: drops this process's
        descriptors and nothing else; the fds, counters and channel stay the
        worker's (a shutdown() here would hang up the worker's channel)."""
        with self.lock:
            for port in self.ports.values():
                if not port.closed:
                    for fd in port.fds:
                        os.close(fd)
                    port.fds.clear()
                    port.closed = True
                    port.ep.close()
                    os.close(port.efd)
            self.ports.clear()
            self.stopped = True
            if self.channel is not None:
                self.channel.forget()
