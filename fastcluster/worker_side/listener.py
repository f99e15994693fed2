"""The worker's listeners: IntakeListener (rr/least: connections arrive as
fds from the primary's C dispatcher, see intake.py) and listen_server().
The interface and the socket kind are in fastcluster/wire/listener.py.

For socketserver/http.server: `listen_server(server)` replaces the server's
own socket with cluster.listen(server.server_address):

    server = HTTPServer(("127.0.0.1", 8000), Handler, bind_and_activate=False)
    cluster.listen_server(server).serve_forever()
"""

from __future__ import annotations

import errno
import http.server
import socket
import socketserver
import time
from collections.abc import Callable
from typing import Any

from ..wire.address import Address
from ..wire.listener import Listener, Release, Tracker, wrap_connection
from . import heart as _heartbeat
from .intake import Intake, Port


class IntakeListener(Listener):
    """rr/least: connections come as fds from the primary's dispatcher."""

    def __init__(self, intake: Intake, port: Port, family: int, address: Address,
                 tracker: Tracker) -> None:
        super().__init__()
        self.family = family
        self.lid = port.lid
        self._intake = intake
        self._port = port
        self._address = address
        self._tracker = tracker

    def fileno(self) -> int:
        if self._closed:
            return -1
        return self._port.fileno()

    def getsockname(self) -> Any:
        return self._address

    def _take_raw(self) -> tuple[int, Release] | None:
        """One connection's fd and the callback that reports it finished."""
        if self._closed:
            raise OSError(errno.EBADF, "listener is closed")
        fd = self._intake.take(self._port)
        if fd is None:
            return None
        self._tracker.conn_opened()
        intake, tracker = self._intake, self._tracker

        def done() -> None:
            tracker.conn_closed()
            intake.connection_closed()

        return fd, Release(done)

    def _take_batch(self, limit: int) -> list[int]:
        """Up to limit connections' fds at once (the asyncio intake). Each is
        the caller's, counted open: report its end with _finished()."""
        if self._closed:
            raise OSError(errno.EBADF, "listener is closed")
        fds = self._intake.take_many(self._port, limit)
        if fds:
            self._tracker.conn_opened(len(fds))
        return fds

    def _finished(self) -> None:
        """One connection from _take_batch() is over."""
        self._tracker.conn_closed()
        self._intake.connection_closed()

    def accept(self) -> tuple[socket.socket, Any]:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            got = self._take_raw()
            if got is not None:
                return wrap_connection(got[0], self.family, got[1])
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no connection is waiting")
            if self._intake.stopped and not self._port.fds:
                raise OSError(errno.EINVAL, "listener takes no more connections "
                              "(the worker is disconnecting)")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError("timed out")
            self._wait(deadline)

    def _pending(self) -> int:
        return 0 if self._closed else len(self._port.fds)

    def _close(self) -> None:
        self._intake.close_port(self._port)


def server_concurrency(server: Any) -> int | None:
    """How many connections a socketserver server starts at once: its
    `fastcluster_concurrency` if it says (an int > 0: a pool's size), 1 if it
    serves each request inline (BaseServer.process_request, as HTTPServer
    and TCPServer do), None (no bound) if it hands them to threads or
    processes (ThreadingMixIn, ForkingMixIn, its own process_request)."""
    said = getattr(server, "fastcluster_concurrency", None)
    if isinstance(said, int) and not isinstance(said, bool) and said > 0:
        return said
    process = getattr(type(server), "process_request", None)
    return 1 if process is socketserver.BaseServer.process_request else None


def listen_server(server: Any, listen: Callable[[Any, int | None], Listener],
                  backlog: int | None = None,
                  declare: Callable[[int], None] | None = None) -> Any:
    """Makes a socketserver server (e.g. http.server.HTTPServer, built with
    bind_and_activate=False) take its connections through the cluster, on
    its server_address. Returns the server. declare(n), if given, is told
    first how many connections the server starts at once (so the worker
    holds no more than that: intake.py)."""
    concurrency = server_concurrency(server)
    if declare is not None and concurrency is not None:
        declare(concurrency)
    old = getattr(server, "socket", None)
    listener = listen(server.server_address, backlog)
    if isinstance(old, socket.socket):
        old.close()
    server.socket = listener
    _heartbeat.watch_server(server)  # serve_forever() beats (hang detection)
    name = listener.getsockname()
    server.server_address = name
    if isinstance(name, tuple) and isinstance(server, http.server.HTTPServer):
        server.server_name = name[0]  # what HTTPServer.server_bind would set
        server.server_port = name[1]
    return server
