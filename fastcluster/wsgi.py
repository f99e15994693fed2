"""Serving a WSGI app in a worker: the standard library's wsgiref over a thread pool.

    # in a worker (what `fastcluster run module:app` does for a WSGI app)
    fastcluster.wsgi.serve(app, ("127.0.0.1", 8000), threads=8)

Why wsgiref: it is CPython's reference implementation of PEP 3333 (header
and status checks, start_response/exc_info, write(), wsgi.file_wrapper),
maintained with CPython and parsing requests with http.server; it needs no
dependency and is a socketserver server, which fastcluster already feeds
under all four policies (cluster.listen_server). Its limit: one request per
connection (the response closes it), as gunicorn's sync worker, which turns
keep-alive off for the same reason: a thread held by an idle keep-alive
client serves nobody.

Theory of operation: the server's main thread takes connections
(serve_forever on the cluster Listener) and runs each on a bounded pool of
`threads` threads. When every thread is busy it stops taking connections
(a semaphore), so under rr/least new connections stay with the primary,
which gives them to other workers (the window of fds in flight), and under
shared/reuseport they stay in the kernel's backlog. A client gets
`client_timeout` seconds to send its request. Graceful disconnect is the
worker runtime's: no new connections, finish the open ones, then exit.
Requests are counted in the worker's shared-memory slot (`fastcluster status`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

import fastcluster as cluster

from .worker_side.current import request_counter as worker_request_counter

BOOT_ERROR = 3  # exit status of a worker that could not start serving
SLOT_WAIT = 0.25  # seconds between heartbeats while every thread is busy

__all__ = ["PoolWSGIServer", "RequestHandler", "serve"]

access_log = logging.getLogger("fastcluster.access")
error_log = logging.getLogger("fastcluster.wsgi")


class RequestHandler(WSGIRequestHandler):
    """wsgiref's handler, with logging through `logging` and requests counted."""

    server: PoolWSGIServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.client_timeout)

    def handle(self) -> None:
        # WSGIRequestHandler.handle, but the environ says wsgi.multithread
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = ServerHandler(self.rfile, self.wfile,  # type: ignore[arg-type]
                                self.get_stderr(),
                                self.get_environ(), multithread=True)
        handler.request_handler = self  # type: ignore[attr-defined]  # wsgiref logs through it
        try:
            handler.run(self.server.get_app())  # type: ignore[arg-type]
        finally:
            self.server.count_request(1)

    def address_string(self) -> str:
        return str(self.client_address[0])

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.access_log:
            access_log.info('%s - "%s" %s %s', self.address_string(), self.requestline,
                            code, size)

    def log_error(self, format: str, *args: Any) -> None:
        error_log.warning("%s - %s", self.address_string(), format % args)

    def log_message(self, format: str, *args: Any) -> None:
        error_log.debug("%s - %s", self.address_string(), format % args)


class PoolWSGIServer(WSGIServer):
    """WSGIServer whose requests run on a bounded thread pool."""

    def __init__(self, address: Any, threads: int = 8, client_timeout: float = 30.0,
                 access_log: bool = False) -> None:
        super().__init__(address, RequestHandler, bind_and_activate=False)
        self.threads = threads
        self.fastcluster_concurrency = threads  # listen_server: hold no more than the pool starts
        self.client_timeout = client_timeout
        self.access_log = access_log
        self.count_request = worker_request_counter()
        self._slots = threading.BoundedSemaphore(threads)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="wsgi")

    def process_request(self, request: Any, client_address: Any) -> None:
        if not isinstance(client_address, tuple):  # a Unix socket's peer has no address
            client_address = ("", 0)
        # every thread busy: take no connection now; this thread is not stuck,
        # though (its heartbeat goes on: service_actions; see worker_side/heart.py)
        while not self._slots.acquire(timeout=SLOT_WAIT):
            self.service_actions()
        try:
            self._pool.submit(self._work, request, client_address)
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def _work(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error_log.exception("fastcluster: error while serving %r", client_address)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False)


def serve(app: Any, address: Any, *, threads: int = 8, client_timeout: float = 30.0,
          access_log: bool = False, backlog: int | None = None) -> int:
    """Serves a WSGI app on a cluster address until the worker is
    disconnected (the worker runtime then ends this thread with SystemExit)."""
    server = PoolWSGIServer(address, threads, client_timeout, access_log)
    server.set_app(app)
    try:
        cluster.listen_server(server, backlog)
    except OSError as e:
        server.server_close()
        error_log.error("fastcluster: worker pid %d cannot listen on %r: %s", os.getpid(),
                        address, e)
        return BOOT_ERROR
    if isinstance(server.server_address, str):  # Unix socket: what server_bind would set
        server.server_name, server.server_port = "localhost", 0
    server.setup_environ()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0
