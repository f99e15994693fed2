"""Serving an ASGI app in a worker with uvicorn's HTTP protocol classes.

    # in a worker (what `fastcluster run module:app` does)
    fastcluster.asgi.serve(app, ("127.0.0.1", 8000))

Theory of operation: uvicorn's HTTP protocols (HttpToolsProtocol when
httptools is installed, else H11Protocol) are asyncio Protocols built from a
uvicorn Config, a ServerState shared by the worker's connections and the
lifespan state. fastcluster.aio.create_server() takes the worker's
connections (fds dispatched by the primary under rr/least, or a real
listening socket under shared/reuseport) and hands each to
loop.connect_accepted_socket() with a factory building one of those
protocols; uvicorn's own Server (which binds and runs its own signal and
shutdown logic) is not used. What uvicorn's Server does besides, done here:
the lifespan startup (before the worker listens: a failed startup exits
with BOOT_ERROR and the primary never sends it a connection) and shutdown
(after its last connection), the Date/Server default headers refreshed
once a second, and on a graceful disconnect (a rolling restart, SIGTERM)
closing idle keep-alive connections and letting busy ones finish their
response without keep-alive (uvicorn's connection.shutdown()), again every
DRAIN_TICK for connections the worker still had queued. The requests
uvicorn's protocols count (ServerState.total_requests) are added to the
worker's shared-memory slot (what `fastcluster status` shows) every TICK,
so counting costs nothing per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import ssl as _ssl
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from . import _role, aio
from .worker_side.current import request_counter as worker_request_counter

__all__ = ["MissingDependency", "require_uvicorn", "serve"]

log = logging.getLogger("fastcluster")

INSTALL_HINT = "pip install 'fastcluster-server[asgi]'"
BOOT_ERROR = 3  # exit status of a worker that could not start serving
DRAIN_TICK = 0.1  # seconds between passes over the connections while draining
HEADER_TICK = 1.0  # seconds between refreshes of the Date header
TICK = 0.1  # seconds between publications of the request count


class MissingDependency(ImportError):
    """uvicorn (or a chosen part of it) is not installed; says what to install."""


# --ws NAME -> the module its uvicorn implementation needs
WS_NEEDS = {"websockets": "websockets", "websockets-sansio": "websockets", "wsproto": "wsproto"}


def require_uvicorn(http: str = "auto", loop: str = "auto", ws: str = "auto") -> None:
    """Raises MissingDependency naming what to install if ASGI cannot be served."""
    try:
        import uvicorn
        from uvicorn.lifespan.on import LifespanOn  # noqa: F401
    except ImportError as e:
        raise MissingDependency(f"serving an ASGI app needs uvicorn ({e}); install it with: "
                                f"{INSTALL_HINT}") from None
    if http == "auto" and not (_installed("httptools") or _installed("h11")):
        raise MissingDependency(f"uvicorn needs httptools or h11 to speak HTTP; install "
                                f"them with: {INSTALL_HINT}")
    for flag, name in (("http", http), ("loop", loop)):
        if name in ("httptools", "h11", "uvloop") and not _installed(name):
            raise MissingDependency(f"--{flag} {name}: {name} is not installed; install it "
                                    f"with: pip install {name}")
    from uvicorn.config import WS_PROTOCOLS
    if ws not in WS_PROTOCOLS:
        raise MissingDependency(f"--ws {ws}: the installed uvicorn ({uvicorn.__version__}) "
                                f"has no such WebSocket implementation; it has: "
                                + ", ".join(WS_PROTOCOLS))
    needs = WS_NEEDS.get(ws)
    if needs is not None and not _installed(needs):
        raise MissingDependency(f"--ws {ws}: {needs} is not installed; install it with: "
                                f"pip install {needs}")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop in ("auto", "uvloop"):
        try:
            uvloop = importlib.import_module("uvloop")  # optional: not for the type checker
        except ImportError:
            if loop == "uvloop":
                raise
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def serve(app: Any, address: Any, *, http: str = "auto", loop: str = "auto",
          lifespan: str = "auto", access_log: bool = False, timeout_keep_alive: int = 5,
          backlog: int | None = None, ssl: _ssl.SSLContext | None = None,
          startup_timeout: float | None = None, **uvicorn_options: Any) -> int:
    """Serves app on a cluster address until the worker is disconnected (or
    SIGTERM); returns 0, or BOOT_ERROR if the lifespan startup failed (or
    did not complete within startup_timeout seconds, if given) or the
    address could not be listened on. uvicorn_options go to uvicorn.Config."""
    require_uvicorn(http, loop)
    ev_loop = _loop_factory(loop)()
    asyncio.set_event_loop(ev_loop)
    try:
        return ev_loop.run_until_complete(_serve(
            app, address, http=http, lifespan=lifespan, access_log=access_log,
            timeout_keep_alive=timeout_keep_alive, backlog=backlog, ssl=ssl,
            startup_timeout=startup_timeout, options=uvicorn_options))
    finally:
        with contextlib.suppress(Exception):
            ev_loop.run_until_complete(ev_loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        ev_loop.close()


async def _serve(app: Any, address: Any, *, http: str, lifespan: str, access_log: bool,
                 timeout_keep_alive: int, backlog: int | None, ssl: _ssl.SSLContext | None,
                 startup_timeout: float | None, options: dict[str, Any]) -> int:
    import uvicorn
    from uvicorn.lifespan.off import LifespanOff
    from uvicorn.lifespan.on import LifespanOn
    from uvicorn.server import ServerState

    config = uvicorn.Config(app, http=http, lifespan=lifespan, access_log=access_log,  # type: ignore[arg-type]
                            timeout_keep_alive=timeout_keep_alive, log_config=None,
                            **options)
    config.load()
    life: Any = LifespanOff(config) if lifespan == "off" else LifespanOn(config)
    try:
        await asyncio.wait_for(life.startup(), startup_timeout)
    except asyncio.TimeoutError:
        log.error("fastcluster: worker pid %s: the app's lifespan startup did not complete "
                  "within %g s (ready_timeout)", os.getpid(), startup_timeout)
        return BOOT_ERROR
    if life.should_exit:
        log.error("fastcluster: worker pid %s: the app's lifespan startup failed",
                  os.getpid())
        return BOOT_ERROR
    state = ServerState()
    protocol_class: Any = config.http_protocol_class
    ws_class: Any = config.ws_protocol_class
    if ws_class is not None:  # read by each HTTP protocol as it is made
        ws_class = config.ws_protocol_class = _upgraded(ws_class)
    loop = asyncio.get_running_loop()

    # a partial, as uvicorn's own server: no Python frame of ours per connection
    factory = functools.partial(protocol_class, config=config, server_state=state,
                                app_state=life.state, _loop=loop)

    ticker = _Ticker(config, state)
    headers = loop.create_task(ticker.run())
    servers = []
    # a list: several addresses (the CLI's repeated --bind), each served
    for one in address if isinstance(address, list) else [address]:
        try:
            servers.append(await aio.create_server(factory, one, backlog=backlog, ssl=ssl))
        except OSError as e:
            headers.cancel()
            log.error("fastcluster: worker pid %s cannot listen on %r: %s", os.getpid(), one, e)
            for server in servers:
                server.close()
            await life.shutdown()
            return BOOT_ERROR
    drain = _Drain(loop, state, ws_class)
    rt = _role.runtime
    if rt is not None:
        rt.add_server(drain)
    try:
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        headers.cancel()
        drain.stop()
        if rt is not None:
            rt.remove_server(drain)
    while state.tasks:  # background tasks the app started with its responses
        await asyncio.sleep(DRAIN_TICK)
    ticker.publish()
    await life.shutdown()
    return 0


class _Ticker:
    """uvicorn's Server.on_tick: default headers with a Date once a second;
    and the requests uvicorn counted (ServerState.total_requests) added to
    the worker's shared counter every TICK: nothing per request."""

    def __init__(self, config: Any, state: Any) -> None:
        self.config = config
        self.state = state
        self.published = 0
        self.add_requests = worker_request_counter()

    def publish(self) -> None:
        total = self.state.total_requests
        if total != self.published:
            self.add_requests(total - self.published)
            self.published = total

    async def run(self) -> None:
        n = 0
        while True:
            if n % round(HEADER_TICK / TICK) == 0:
                date = formatdate(usegmt=True).encode()
                self.state.default_headers = (
                    [(b"date", date)] if self.config.date_header else []
                ) + self.config.encoded_headers
            self.publish()
            n += 1
            await asyncio.sleep(TICK)


def _upgraded(ws_class: Any) -> Any:
    """uvicorn's WebSocket protocol class, made to end the connection it took over.

    On an upgrade uvicorn's HTTP protocol makes a WebSocket protocol, calls
    its connection_made(transport) and transport.set_protocol() to it: from
    then on the transport calls the WebSocket protocol's connection_lost(),
    never the HTTP one's, which the aio server counted. So the WebSocket
    protocol reports that connection's end (aio.connection_ended), and the
    worker's open count goes back down when the socket closes."""

    class Upgraded(ws_class):  # type: ignore[misc]
        _fc_http: Any = None
        _fc_shut = False

        def connection_made(self, transport: Any) -> None:
            self._fc_http = transport.get_protocol()  # the HTTP one: set_protocol() follows
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                http, self._fc_http = self._fc_http, None
                if http is not None and http is not self:
                    aio.connection_ended(http)

        def shutdown(self) -> None:
            """uvicorn's: close code 1012 (service restart); once, however
            many drain ticks see this connection."""
            if not self._fc_shut:
                self._fc_shut = True
                super().shutdown()

    Upgraded.__name__, Upgraded.__qualname__ = ws_class.__name__, ws_class.__qualname__
    Upgraded.__module__ = ws_class.__module__
    return Upgraded


class _Drain:
    """Sits beside the aio server in the worker runtime: a graceful
    disconnect calls _stop_intake() (on the loop), then _finish().

    Each tick it shuts down what is open: an HTTP connection once it has had
    a request (idle: closed; busy: no keep-alive after this response), a
    WebSocket at once (close code 1012, as uvicorn's own shutdown), so no
    connection keeps the worker past the drain."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state: Any, ws_class: Any) -> None:
        self._loop = loop
        self._state = state
        self._ws_class = ws_class
        self._task: asyncio.Task[None] | None = None

    def _stop_intake(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            ws_class = self._ws_class
            for conn in list(self._state.connections):
                transport = getattr(conn, "transport", None)
                if transport is None or transport.is_closing():
                    continue
                # a connection that has had no request yet may be a queued one
                # whose request is on its way: it is served first
                if getattr(conn, "cycle", None) is None and not (
                        ws_class is not None and isinstance(conn, ws_class)):
                    continue
                try:
                    conn.shutdown()  # idle: close; busy: no keep-alive after this response
                except Exception as e:  # one connection's trouble must not stop the drain
                    log.debug("fastcluster: shutting a connection down: %r", e)
            await asyncio.sleep(DRAIN_TICK)

    def _finish(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
