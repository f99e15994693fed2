"""Listener: what cluster.listen() returns in a worker; a listening socket
look-alike that selectors, socketserver and http.server can use.

Theory of operation: two kinds behind one interface (fileno, accept,
getsockname, close, settimeout/gettimeout/setblocking).

  IntakeListener  rr/least: connections arrive as fds from the primary's C
                  dispatcher (see worker_side/intake.py). fileno() is the Port's epoll fd:
                  readable while a batch waits on the data channel or the
                  listener still holds fds it has not handed out.
  SocketListener  shared/reuseport (and a listen() in the primary): a real
                  listening socket; accept() is the kernel's.

accept() returns (socket, address) like socket.accept(); the socket is a
ConnSocket, a socket.socket whose close (at the last reference, including
makefile()s, or at garbage collection) reports the connection finished
exactly once: the worker counts open connections for a graceful disconnect,
and the `least` policy counts them in shared memory.

A graceful disconnect stops the intake but keeps the fileno valid: an
IntakeListener hands out what it holds and then is never readable again; a
SocketListener's fd is replaced (dup2) by a never-readable eventfd, so a
server blocked in select() on it just sleeps until the worker exits.

IntakeListener and listen_server() (for socketserver/http.server) are the
worker's: fastcluster/worker_side/listener.py.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


class Tracker(Protocol):
    """Counts a worker's open connections (the runtime implements it)."""

    def conn_opened(self, n: int = 1) -> None: ...
    def conn_closed(self) -> None: ...


class NullTracker:
    def conn_opened(self, n: int = 1) -> None:
        pass

    def conn_closed(self) -> None:
        pass


class Release:
    """Calls fn once, however many times it is called."""

    __slots__ = ("_fn", "_lock")

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class ConnSocket(socket.socket):
    """An accepted connection; closing it reports the connection finished."""

    __slots__ = ("_fc_release",)
    _fc_release: Callable[[], None] | None

    def _fc_done(self) -> None:
        release = getattr(self, "_fc_release", None)
        self._fc_release = None
        if release is not None:
            release()

    def _real_close(self, *args: Any, **kwargs: Any) -> None:
        try:
            socket.socket._real_close(self, *args, **kwargs)  # type: ignore[attr-defined]
        finally:
            self._fc_done()

    def detach(self) -> int:
        fd = super().detach()
        self._fc_done()  # the fd is the caller's now: we can follow it no further
        return fd

    def __del__(self) -> None:
        # A Python __del__ replaces _socket.socket's finalizer, which is what
        # closes a forgotten socket: close it here, then report it.
        try:
            if self.fileno() >= 0:
                self._real_close()
        finally:
            self._fc_done()


def _peer(sock: socket.socket, family: int) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return "" if family == socket.AF_UNIX else ("", 0)


def wrap_connection(fd: int, family: int, release: Callable[[], None] | None) -> tuple[
        ConnSocket, Any]:
    """A ConnSocket over an accepted fd, blocking mode as socket.accept() gives."""
    try:
        sock = ConnSocket(family, socket.SOCK_STREAM, 0, fd)  # given: no getsockopt probes
    except BaseException:
        os.close(fd)
        if release is not None:
            release()
        raise
    sock._fc_release = release
    sock.settimeout(socket.getdefaulttimeout())  # None: blocking (the fd came non-blocking)
    return sock, _peer(sock, family)


class Listener:
    """A listening endpoint shared through the cluster."""

    family: int = socket.AF_INET
    type: int = socket.SOCK_STREAM
    proto: int = 0

    def __init__(self) -> None:
        self._timeout: float | None = None
        self._closed = False
        self._stopped = False
        self._on_close: Callable[[Listener], None] | None = None

    # socket look-alike -----------------------------------------------------
    def fileno(self) -> int:
        raise NotImplementedError

    def accept(self) -> tuple[socket.socket, Any]:
        raise NotImplementedError

    def getsockname(self) -> Any:
        raise NotImplementedError

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            if value < 0:
                raise ValueError("Timeout value out of range")
            value = float(value)
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def listen(self, backlog: int = 0) -> None:
        """No-op: the cluster listens already (socketserver's server_activate)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close()
        cb, self._on_close = self._on_close, None
        if cb is not None:
            cb(self)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        try:
            name = self.getsockname()
        except OSError:
            name = "?"
        return f"<{type(self).__name__} {name!r} {state}>"

    # for the runtime -------------------------------------------------------
    def _close(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        """Graceful disconnect: take no new connections."""
        self._stopped = True

    def _pending(self) -> int:
        """Connections received and not yet handed out."""
        return 0

    def _wait(self, deadline: float | None) -> bool:
        """Waits until fileno() is readable or the deadline; False on timeout."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        events = poller.poll(None if timeout is None else timeout * 1000.0)
        return bool(events)


class SocketListener(Listener):
    """shared/reuseport (and the primary's own listen): a real listening socket."""

    def __init__(self, sock: socket.socket, tracker: Tracker) -> None:
        super().__init__()
        self.family = sock.family
        self.type = socket.SOCK_STREAM
        self.proto = sock.proto
        self.sock: socket.socket | None = sock
        self._tracker = tracker
        self._timeout = sock.gettimeout()
        self._name = sock.getsockname()

    def fileno(self) -> int:
        if self.sock is None:
            return -1
        return self.sock.fileno()

    def getsockname(self) -> Any:
        return self._name

    def settimeout(self, value: float | None) -> None:
        super().settimeout(value)
        if self.sock is not None and not self._stopped:
            self.sock.settimeout(value)

    def accept(self) -> tuple[socket.socket, Any]:
        sock = self.sock
        if sock is None or self._closed:
            raise OSError(errno.EBADF, "listener is closed")
        if self._stopped:
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no connection is waiting")
            raise OSError(errno.EINVAL, "listener takes no more connections "
                          "(the worker is disconnecting)")
        conn, addr = sock.accept()
        fd = conn.detach()
        self._tracker.conn_opened()
        conn2, _ = wrap_connection(fd, self.family, Release(self._tracker.conn_closed))
        return conn2, addr

    def detach_socket(self) -> socket.socket:
        """Hands the real socket over (to an asyncio server)."""
        sock = self.sock
        if sock is None:
            raise OSError(errno.EBADF, "listener is closed")
        self.sock = None
        return sock

    def _stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        sock = self.sock
        if sock is not None and sock.fileno() >= 0:
            never = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                os.dup2(never, sock.fileno())  # closes our listening socket in place
            finally:
                os.close(never)

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def reuseport_socket(family: int, address: Any, backlog: int) -> socket.socket:
    """A listening SO_REUSEPORT socket: a worker's own under `reuseport`, a
    slot's under `steer`. SO_REUSEADDR too: the connections it accepts
    inherit it, so their TIME_WAITs never keep a later primary from binding."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
