"""Serving a WSGI app in a worker: uvicorn's HTTP/1.1 protocols, with a2wsgi
running the app on a bounded thread pool.

    # in a worker (what `fastcluster run module:app` does for a WSGI app)
    fastcluster.wsgi.serve(app, ("127.0.0.1", 8000), threads=8)

Why this stack: the standard library's wsgiref (served here before) is a
reference implementation, not a server: it lost chunked request bodies,
never answered `Expect: 100-continue`, sent bodies to HEAD, copied the
worker's os.environ into every request, answered a hop-by-hop header with a
500 and spoke HTTP/1.0 without keep-alive. The ASGI path already serves
HTTP/1.1 with uvicorn's protocols (httptools or h11: keep-alive,
pipelining, chunked bodies, 100-continue, HEAD, proxy headers, root_path),
so a WSGI app is served there too, through a2wsgi's WSGIMiddleware: a
maintained WSGI-to-ASGI adapter (the one uvicorn's docs point to in place of
its own deprecated WSGIMiddleware) that runs each request's app call on a
ThreadPoolExecutor of `threads` threads and streams the response back to
the loop. One stack for both interfaces: the same counting, drain, TLS and
hang detection (the loop beats while app threads are busy).

What is ours, in _Guard around the app: hop-by-hop response headers are
dropped (logged once per name; `Connection: close` is kept, and uvicorn
then closes after the response, as gunicorn does), wsgi.errors is stderr,
and a thread that reads the request body waits at most client_timeout for
the client to send more.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

from . import asgi

__all__ = ["require_a2wsgi", "serve"]

log = logging.getLogger("fastcluster.wsgi")

INSTALL_HINT = "pip install 'fastcluster-server[wsgi]'"
# RFC 9110 7.6.1 and PEP 3333's list (wsgiref.util.is_hop_by_hop)
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate",
                        "proxy-authorization", "proxy-connection", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade"))


def require_a2wsgi() -> None:
    """Raises asgi.MissingDependency naming what to install if WSGI cannot be served."""
    try:
        importlib.import_module("a2wsgi")
    except ImportError as e:
        raise asgi.MissingDependency(f"serving a WSGI app needs a2wsgi ({e}); install it "
                                     f"with: {INSTALL_HINT}") from None
    asgi.require_uvicorn()


def serve(app: Any, address: Any, *, threads: int = 8, client_timeout: float = 30.0,
          access_log: bool = False, backlog: int | None = None,
          **asgi_options: Any) -> int:
    """Serves a WSGI app on a cluster address until the worker is disconnected;
    returns 0, or asgi.BOOT_ERROR if the address could not be listened on.
    asgi_options go to fastcluster.asgi.serve (http, loop, ssl, root_path,
    forwarded_allow_ips, timeout_keep_alive, ...)."""
    from a2wsgi import WSGIMiddleware

    guard: Any = _Guard(app, client_timeout)
    middleware = WSGIMiddleware(guard, workers=threads)
    try:
        return asgi.serve(middleware, address, interface="asgi3", lifespan="off",
                          ws="none", access_log=access_log, backlog=backlog, **asgi_options)
    finally:
        middleware.executor.shutdown(wait=False, cancel_futures=True)


class _Guard:
    """The WSGI app as a2wsgi calls it, with fastcluster's fixes around it."""

    def __init__(self, app: Any, client_timeout: float) -> None:
        from a2wsgi.wsgi import Body

        self.app = app
        self.logged: set[str] = set()
        self.body_class = Body
        self.timed_body_class = _timed_body(Body, client_timeout)

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["wsgi.errors"] = sys.stderr  # (a2wsgi: stdout)
        # a2wsgi's body ends where the request's does (chunked too): say so,
        # as gunicorn does, or werkzeug (Flask) reads a body without
        # Content-Length as empty
        environ["wsgi.input_terminated"] = True
        body = environ.get("wsgi.input")
        if type(body) is self.body_class:  # same layout: only its reads change
            body.__class__ = self.timed_body_class

        def guarded_start_response(status: str, headers: list[tuple[str, str]],
                                   exc_info: Any = None) -> Any:
            if any(name.lower() in HOP_BY_HOP for name, _ in headers):
                headers = self._without_hop_by_hop(headers)
            return start_response(status, headers, exc_info)

        result: Iterable[bytes] = self.app(environ, guarded_start_response)
        return result

    def _without_hop_by_hop(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        kept = []
        for name, value in headers:
            low = name.lower()
            if low not in HOP_BY_HOP or (low == "connection"
                                         and value.strip().lower() == "close"):
                kept.append((name, value))
            elif low not in self.logged:
                self.logged.add(low)
                log.warning("fastcluster: the WSGI app set the hop-by-hop header %r (the "
                            "server's to set, PEP 3333); dropped (logged once)",
                            f"{name}: {value}")
        return kept


def _timed_body(body_class: Any, timeout: float) -> Any:
    class TimedBody(body_class):  # type: ignore[misc]
        """a2wsgi's request body, whose reads wait at most `timeout` for the client
        (a2wsgi's own wait forever, holding a thread of the pool)."""

        _has_more: bool

        def _receive_more_data(self) -> bytes:
            if not self._has_more:
                return b""
            future = asyncio.run_coroutine_threadsafe(self.receive(), loop=self.loop)
            try:
                message = future.result(timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise TimeoutError(f"the client sent no more of the request body for "
                                   f"{timeout} s (--client-timeout)") from None
            self._has_more = message.get("more_body", False)
            return message.get("body", b"")  # type: ignore[no-any-return]

    return TimedBody
