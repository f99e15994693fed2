"""asyncio helpers: start_server() and create_server() on a cluster address.

    server = await fastcluster.aio.start_server(handle, ("127.0.0.1", 8000))
    await server.serve_forever()

Theory of operation: in a worker they ask the primary for the address, as
cluster.listen() does, but without blocking the loop. Under rr/least the
connections arrive as fds in batches on the data channel; the Listener's
fileno() goes to loop.add_reader(), and each fd taken becomes a task calling
loop.connect_accepted_socket() with the protocol factory. Under
shared/reuseport the listening socket is real and goes to
loop.create_server(sock=...). Either way every protocol is tracked (its
connection_lost() wrapped) so the worker knows how many connections are open
and `least` counts them in shared memory. Works with uvloop too: only public
loop methods are used.

Using these helpers attaches the worker's message channel to the loop: the
"message" and "disconnect" handlers of cluster.worker then run on it.

Graceful disconnect (w.disconnect() in the primary, SIGTERM): the server
stops taking new connections, hands out the ones already received, and once
the open connections are finished (or graceful_timeout passed) closes:
serve_forever() then returns normally, so `asyncio.run(main())` ends and the
worker exits 0. Unlike asyncio.Server, wait_closed() (and so serve_forever())
waits for open connections to finish, as Python 3.12's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import Any

from . import _role
from .wire.listener import Listener, SocketListener
from .worker_side import heart as _heartbeat
from .worker_side.aioconns import AcceptedSocket, Conn, Counting, connection_ended, track
from .worker_side.listener import IntakeListener

__all__ = ["Server", "connection_ended", "create_server", "start_server"]

log = logging.getLogger("fastcluster")

ACCEPT_BURST = 256  # fds taken per wake-up before yielding to the loop

_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


async def create_server(protocol_factory: ProtocolFactory, address: Any, *,
                        backlog: int | None = None, ssl: _ssl.SSLContext | None = None,
                        ssl_handshake_timeout: float | None = None,
                        start_serving: bool = True) -> Server:
    """Like loop.create_server(protocol_factory, host, port), on a cluster address."""
    loop = asyncio.get_running_loop()
    rt = _role.runtime
    if rt is None:
        listener = _role.primary().listen(address, backlog)
    else:
        rt.attach_loop(loop)
        reply, fds = await rt.request_async(rt.listen_frame(address, backlog))
        listener = rt.make_listener(reply, fds)
    server = Server(loop, listener, protocol_factory, ssl, ssl_handshake_timeout)
    try:
        await server._open(start_serving, backlog)
    except BaseException:
        server.close()
        raise
    if rt is not None:
        rt.add_server(server)
        _heartbeat.server_opened(loop, server)  # the loop beats while it serves
        rt.listening(listener)
    return server


async def start_server(client_connected_cb: Callable[[asyncio.StreamReader,
                                                      asyncio.StreamWriter], Any],
                       address: Any, *, limit: int = 2 ** 16, backlog: int | None = None,
                       ssl: _ssl.SSLContext | None = None,
                       ssl_handshake_timeout: float | None = None,
                       start_serving: bool = True) -> Server:
    """Like asyncio.start_server(client_connected_cb, host, port), on a cluster address."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, address, backlog=backlog, ssl=ssl,
                               ssl_handshake_timeout=ssl_handshake_timeout,
                               start_serving=start_serving)


class Server:
    """What create_server()/start_server() return: asyncio.Server's interface."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: Listener,
                 protocol_factory: ProtocolFactory, ssl: _ssl.SSLContext | None,
                 ssl_handshake_timeout: float | None) -> None:
        self._loop = loop
        self._listener = listener
        self._factory = protocol_factory
        self._ssl = ssl
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._name = listener.getsockname()
        self._aserver: asyncio.base_events.Server | None = None  # shared/reuseport
        self._reading = False
        self._closed = False
        self._stopped = False  # graceful disconnect: no new connections
        self._conns = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._serve_fut: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        if isinstance(listener, SocketListener):  # asyncio accepts, we count
            self._counting = Counting(self._conn_opened, self._conn_closed)
        else:  # the intake's fds: Conn counts, and also covers a failed set-up
            self._counting = Counting(None, Conn.lost_of, needs_dict=True)

    async def _open(self, start_serving: bool, backlog: int | None) -> None:
        if isinstance(self._listener, SocketListener):
            sock = self._listener.detach_socket()
            sock.setblocking(False)
            self._aserver = await self._loop.create_server(
                self._socket_protocol, sock=sock, backlog=backlog or 511, ssl=self._ssl,
                ssl_handshake_timeout=self._ssl_handshake_timeout,
                start_serving=start_serving)
        elif start_serving:
            self._start_reading()

    # -- connections ---------------------------------------------------------

    # shared/reuseport: asyncio calls connection_made once per accepted
    # connection and connection_lost once after it, so no once-guard here

    def _conn_opened(self, _proto: Any = None) -> None:
        self._conns += 1
        rt = _role.runtime
        if rt is not None:
            rt.conn_opened()

    def _conn_closed(self, _proto: Any = None) -> None:
        self._conns -= 1
        rt = _role.runtime
        if rt is not None:
            rt.conn_closed()
        self._wake_waiters()

    def _socket_protocol(self) -> asyncio.BaseProtocol:
        proto = self._factory()
        if self._counting.adopt(proto):
            return proto
        return track(proto, self._conn_opened, self._conn_closed)

    def _start_reading(self) -> None:
        if self._reading or self._closed or (self._stopped and not self._pending()):
            return
        self._reading = True
        self._loop.add_reader(self._listener.fileno(), self._on_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(self._listener.fileno())

    def _pending(self) -> int:
        return self._listener._pending()

    def _on_ready(self) -> None:
        # The per-connection path of a worker: one lock and one pull for the
        # whole batch, sockets made with their family and type given (no
        # getsockopt/getsockname to guess them; the primary accepted them
        # non-blocking), one task each (connect_accepted_socket is a coroutine).
        listener = self._listener
        assert isinstance(listener, IntakeListener)
        try:
            fds = listener._take_batch(ACCEPT_BURST)
        except OSError:
            self._stop_reading()
            return
        if not fds:
            return
        self._conns += len(fds)
        loop, family = self._loop, listener.family
        for fd in fds:
            conn = Conn(self, listener)
            try:
                sock = AcceptedSocket(family, _STREAM_NONBLOCK, 0, fd)
            except BaseException:
                os.close(fd)
                conn.lost()
                raise
            conn.sock = sock
            task = loop.create_task(loop.connect_accepted_socket(
                conn.protocol, sock, ssl=self._ssl,
                ssl_handshake_timeout=self._ssl_handshake_timeout))
            self._tasks.add(task)
            task.add_done_callback(conn.set_up)

    def _conn_finished(self) -> None:
        self._conns -= 1
        self._wake_waiters()

    # -- asyncio.Server's interface -----------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        if self._aserver is not None:
            return self._aserver.is_serving()
        return self._reading

    @property
    def sockets(self) -> tuple[Any, ...]:
        if self._aserver is not None:
            return tuple(self._aserver.sockets)
        return () if self._closed else (self._listener,)

    def getsockname(self) -> Any:
        """The address served (the real port when 0 was asked)."""
        return self._name

    async def start_serving(self) -> None:
        if self._aserver is not None:
            await self._aserver.start_serving()
        else:
            self._start_reading()

    async def serve_forever(self) -> None:
        """Serves until close() (or a graceful disconnect), then waits for
        open connections to finish and returns."""
        if self._serve_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        await self.start_serving()
        self._serve_fut = self._loop.create_future()
        try:
            await self._serve_fut
        except asyncio.CancelledError:
            self.close()
            raise
        finally:
            self._serve_fut = None
        await self.wait_closed()

    def close(self) -> None:
        """Stops serving; open connections are left open (as asyncio's)."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._aserver is not None:
            self._aserver.close()
        self._listener.close()
        rt = _role.runtime
        if rt is not None:
            rt.remove_server(self)
            _heartbeat.server_closed(self._loop, self)
        if self._serve_fut is not None and not self._serve_fut.done():
            self._serve_fut.set_result(None)
        self._wake_waiters()

    async def wait_closed(self) -> None:
        """Waits until the server is closed and its connections are finished."""
        if self._closed and self._conns <= 0:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        await fut

    def _wake_waiters(self) -> None:
        if self._closed and self._conns <= 0:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    # -- graceful disconnect (called on the loop by the worker runtime) -------

    def _stop_intake(self) -> None:
        self._stopped = True
        if self._aserver is not None:
            self._aserver.close()  # stops accepting; connections stay
        # rr/least: keep reading what the listener still holds

    def _finish(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fastcluster.aio.Server {self._name!r}>"


ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]
