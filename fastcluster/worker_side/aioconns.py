"""fastcluster.aio's per-connection machinery, in the worker: counting each
protocol's connection_made/connection_lost (by retyping it to a counting
subclass, Counting, or else wrapping it, track()), and Conn, one dispatched
connection whose end is reported exactly once. aio.py's Server uses them.
"""

from __future__ import annotations

import _socket
import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .listener import IntakeListener

log = logging.getLogger("fastcluster")


class ConnServer(Protocol):
    """What a Conn needs of its server (fastcluster.aio.Server)."""

    @property
    def _factory(self) -> Callable[[], asyncio.BaseProtocol]: ...
    @property
    def _counting(self) -> Counting: ...
    @property
    def _tasks(self) -> set[asyncio.Task[Any]]: ...
    def _conn_finished(self) -> None: ...


def connection_ended(proto: asyncio.BaseProtocol) -> None:
    """Reports the end of the connection proto was made for, when its
    transport went on with another protocol (transport.set_protocol(), as a
    WebSocket upgrade does): the transport then calls that protocol's
    connection_lost(), never proto's, so the new protocol calls this from
    its own. A protocol these servers did not count is ignored."""
    lost = getattr(type(proto), "_fc_lost", None)  # a Counting subclass
    if lost is not None:
        lost(proto)
        return
    on_lost = getattr(proto, "_fc_on_lost", None)  # track()'s
    if on_lost is not None:
        on_lost()


def track(proto: asyncio.BaseProtocol, on_made: Callable[[], None] | None,
           on_lost: Callable[[], None]) -> asyncio.BaseProtocol:
    """Makes proto call on_made/on_lost around its own connection_made/lost
    (the general way, for protocols Counting cannot retype)."""
    orig_made = proto.connection_made
    orig_lost = proto.connection_lost

    def connection_made(transport: asyncio.BaseTransport) -> None:
        if on_made is not None:
            on_made()
        orig_made(transport)

    def connection_lost(exc: Exception | None) -> None:
        try:
            orig_lost(exc)
        finally:
            on_lost()

    try:
        proto._fc_on_lost = on_lost  # type: ignore[attr-defined]  # connection_ended()
        proto.connection_made = connection_made  # type: ignore[method-assign]
        proto.connection_lost = connection_lost  # type: ignore[method-assign]
        return proto
    except AttributeError:  # __slots__: wrap it instead
        cls = BufferedProxy if isinstance(proto, asyncio.BufferedProtocol) else Proxy
        proxy = cls(proto, connection_made, connection_lost)
        proxy._fc_on_lost = on_lost
        return proxy


class Counting:
    """Counts a server's connections by retyping each new protocol object to
    a subclass of its own class, made once per class, whose
    connection_made/connection_lost call the hooks around the original ones.

    Per connection that is one __class__ assignment, where track makes two
    closures and sets two bound-method attributes: this is the worker's
    per-connection path. The protocol keeps its behaviour and
    isinstance(); only type(proto) is the subclass. Classes that cannot be
    retyped (C types, incompatible __slots__) fall back to track."""

    def __init__(self, made: Callable[[Any], None] | None,
                 lost: Callable[[Any], None], needs_dict: bool = False) -> None:
        self._needs_dict = needs_dict  # the hooks keep state on the protocol
        self._made = made
        self._lost = lost
        self._subclasses: dict[type, type | None] = {}

    def adopt(self, proto: asyncio.BaseProtocol) -> bool:
        """Retypes proto; False if its class cannot be (use track then)."""
        cls = type(proto)
        sub = self._subclasses.get(cls, cls)
        if sub is cls:
            sub = self._subclasses[cls] = self._subclass(cls)
        if sub is None:
            return False
        own = getattr(proto, "__dict__", None)
        if own and ("connection_made" in own or "connection_lost" in own):
            return False  # hooks set on the instance would shadow the subclass's
        try:
            proto.__class__ = sub
        except TypeError:
            self._subclasses[cls] = None
            return False
        return True

    def _subclass(self, cls: type[Any]) -> type | None:
        if self._needs_dict and not cls.__dictoffset__:
            return None
        made, lost = self._made, self._lost
        cls_made, cls_lost = cls.connection_made, cls.connection_lost

        def connection_made(proto: Any, transport: asyncio.BaseTransport) -> None:
            if made is not None:
                made(proto)
            cls_made(proto, transport)

        def connection_lost(proto: Any, exc: Exception | None) -> None:
            try:
                cls_lost(proto, exc)
            finally:
                lost(proto)

        try:
            return type(cls.__name__, (cls,), {
                "__slots__": (), "__module__": cls.__module__,
                "__qualname__": cls.__qualname__, "_fc_lost": staticmethod(lost),
                "connection_made": connection_made, "connection_lost": connection_lost})
        except TypeError:  # a class that cannot be subclassed
            return None


class Proxy(asyncio.Protocol):
    _fc_on_lost: Callable[[], None] | None = None

    def __init__(self, inner: Any, made: Callable[[Any], None],
                 lost: Callable[[Exception | None], None]) -> None:
        self._inner = inner
        self._made = made
        self._lost = lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class BufferedProxy(Proxy, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> Any:
        return self._inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._inner.buffer_updated(nbytes)




class AcceptedSocket(socket.socket):
    """A dispatched connection's socket, whose family and type are plain ints.

    The event loop reads sock.type and sock.family (twice under uvloop) in
    connect_accepted_socket(), and socket.socket's properties turn each into
    an IntEnum: about 15 times the cost of the C attribute (measured with
    timeit: 4.8 µs against 0.3 for the three reads), on every connection,
    where a server accepting natively makes no Python socket at all."""

    __slots__ = ()
    family = _socket.socket.family  # type: ignore[assignment]
    type = _socket.socket.type  # type: ignore[assignment]


class Conn:
    """One dispatched connection in an asyncio worker: reports its end once,
    whether the protocol saw connection_lost() or the set-up failed."""

    __slots__ = ("done", "listener", "server", "sock")

    def __init__(self, server: ConnServer, listener: IntakeListener) -> None:
        self.server = server
        self.listener = listener
        self.sock: socket.socket | None = None
        self.done = False

    def protocol(self) -> asyncio.BaseProtocol:
        proto = self.server._factory()
        if self.server._counting.adopt(proto):
            proto._fc_conn = self  # type: ignore[attr-defined]
            return proto
        return track(proto, None, self.lost)

    @staticmethod
    def lost_of(proto: Any) -> None:
        proto._fc_conn.lost()

    def lost(self) -> None:
        if not self.done:
            self.done = True
            self.listener._finished()
            self.server._conn_finished()

    def set_up(self, task: asyncio.Task[Any]) -> None:
        self.server._tasks.discard(task)
        exc: BaseException | None = (
            asyncio.CancelledError() if task.cancelled() else task.exception())
        if exc is not None:
            if self.sock is not None:
                self.sock.close()
            self.lost()
            if not isinstance(exc, asyncio.CancelledError):
                log.debug("fastcluster: connection setup failed: %r", exc)
