"""Health and readiness for load balancers: /healthz, /readyz, drain on SIGTERM.

Theory of operation. Opt-in (setting `health`, e.g. "127.0.0.1:8081", bound by
setup_primary() so a busy port is an error before any fork): the
primary serves a tiny HTTP endpoint on its own address, apart from the
workers' ports, so a balancer (HAProxy, a Kubernetes probe) can ask:

  GET /healthz   200 while the primary's loop runs (it answers: it is alive)
                 and some worker has been alive within `health_grace`
                 seconds; 503 once there has been none for longer (every
                 respawn failing, a crash loop backing off: a liveness
                 probe should restart the primary)
  GET /readyz    200 while at least one worker listens and no drain or
                 shutdown is under way; else 503 with the reason

The answers are the same facts `facts()` returns for `fastcluster status`.

The endpoint lives in the primary's single-threaded loop: the listening
socket and each health connection are non-blocking fds in the C
dispatcher's epoll set (Primary.add_reader), so a probe costs one wake-up
and no thread exists in a process that forks. Nothing a health client does
can stall the loop: reads never block; a request is bounded (MAX_REQUEST
bytes, else 431) and so is its time (CONN_TIMEOUT, then the connection is
closed); at most MAX_CONNS health connections are kept, the oldest is
dropped for a new one (a probe from the balancer gets through a flood of
idle clients); the answer is under 200 bytes, written once into a fresh
socket's send buffer, then the connection is closed (never waited on).
This is control-plane traffic a few times a second; served connections
never reach Python in the primary.

Drain (Health.drain, called on SIGTERM): /readyz turns to 503 at once
while workers keep serving; after `drain_delay` seconds the graceful
shutdown starts (stop accepting, workers finish what they hold). Balancers
that probe /readyz (or, in Kubernetes, that drop the pod from the Service
when it starts terminating) stop sending new connections within that delay,
so none is refused. drain_delay=0 (the default) shuts down at once.

The health sockets are closed in any child forked from the primary
(os.register_at_fork), so a worker never holds the health port.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import socket
import time
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from ..wire.address import parse_address
from .acceptpause import OUT_OF_FDS, AcceptPause

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..wire.handle import Worker
    from ..wire.settings import Settings
    from .timers import Timer, Timers

log = logging.getLogger("fastcluster")

MAX_REQUEST = 2048  # bytes of request line and headers read before 431
MAX_CONNS = 32  # open health connections; the oldest is dropped for a new one
CONN_TIMEOUT = 2.0  # seconds a health client gets to send its request
ACCEPT_BATCH = 16  # accepts per wake-up
BACKLOG = 64

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}

_open_servers: weakref.WeakSet[_Server] = weakref.WeakSet()


def _close_in_child() -> None:
    for server in list(_open_servers):
        server.forget()


os.register_at_fork(after_in_child=_close_in_child)


# -- readiness --------------------------------------------------------------

class Loop(Protocol):
    """What health needs of the primary's loop (primary/loop.py)."""

    @property
    def _shutdown(self) -> str | None: ...
    @property
    def _stopping(self) -> bool: ...
    @property
    def _timers(self) -> Timers: ...
    @property
    def workers(self) -> dict[int, Worker]: ...
    def config(self) -> Settings: ...
    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...


class HasHealth(Protocol):
    """facts()'s argument: the primary's loop."""

    @property
    def health(self) -> Health: ...


class Health:
    """The primary's readiness state, drain, and (if configured) its endpoint."""

    def __init__(self, primary: Loop) -> None:
        self._p = primary
        self.draining = False  # SIGTERM seen, waiting drain_delay before the shutdown
        self._drain_end = 0.0  # time.monotonic() when the shutdown starts
        self._drain_timer: Timer | None = None
        self._server: _Server | None = None
        self._no_worker_since: float | None = None  # monotonic: the last worker's exit

    def no_worker(self) -> None:
        """The last worker is gone (a new one makes _dead_for() 0 again)."""
        self._no_worker_since = time.monotonic()

    def _dead_for(self) -> float:
        """Seconds with no worker alive past health_grace (0.0: alive enough)."""
        if self._no_worker_since is None or self._p.workers:
            return 0.0
        gone = time.monotonic() - self._no_worker_since
        return gone if gone > self._p.config().health_grace else 0.0

    def _listening(self) -> int:
        return sum(1 for w in self._p.workers.values()
                   if w.state == "listening" and not w.exited_after_disconnect)

    def _not_ready(self) -> str | None:
        """Why /readyz fails, or None when ready."""
        p = self._p
        if p._shutdown is not None:
            return "shutting down"
        if self.draining:
            return "draining"
        if p._stopping:
            return "disconnecting"
        if self._listening() == 0:
            return "no worker listens"
        return None

    def ready(self) -> bool:
        return self._not_ready() is None

    def facts(self) -> dict[str, Any]:
        """What /healthz and /readyz answer, as a dict (for `fastcluster status --json`)."""
        reason = self._not_ready()
        cfg = self._p.config()
        return {
            "alive": not self._dead_for(),  # as /healthz
            "ready": reason is None,
            "reason": reason or "ready",
            "draining": self.draining and self._p._shutdown is None,
            "drain_left": (max(0.0, self._drain_end - time.monotonic())
                           if self.draining and self._p._shutdown is None else None),
            "drain_delay": cfg.drain_delay,
            "shutdown": self._p._shutdown,
            "workers": len(self._p.workers),
            "listening": self._listening(),
            "health": None if self._server is None else self._server.address,
        }

    # -- drain ---------------------------------------------------------------

    def drain(self, shutdown: Callable[[], object]) -> None:
        """SIGTERM: fail readiness now, call shutdown() after drain_delay."""
        if self.draining:
            return
        delay = self._p.config().drain_delay
        if delay <= 0:
            shutdown()
            return
        self.draining = True
        self._drain_end = time.monotonic() + delay
        log.info("fastcluster: draining: /readyz fails now, graceful shutdown in %.3g s", delay)

        def done() -> None:
            self._drain_timer = None
            if self._p._shutdown is None:
                shutdown()

        self._drain_timer = self._p._timers.call_later(delay, done)

    # -- endpoint ------------------------------------------------------------

    def configure(self, cfg: Settings) -> None:
        """Binds the endpoint the `health` setting names (setup_primary()
        calls this before the new settings take effect), closing one bound
        for an earlier value. Raises OSError naming the address if it cannot
        bind; the endpoint in place then stays."""
        if self._server is not None and self._server.setting == cfg.health:
            return
        new = None if cfg.health is None else _Server(self._p, cfg.health, self._answer)
        self.close()
        self._server = new

    def start(self) -> None:
        """run() calls this: binds the endpoint if it is set and not bound
        (after a close())."""
        self.configure(self._p.config())

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _answer(self, method: str, path: str) -> tuple[int, str]:
        if path not in ("/healthz", "/readyz"):
            return 404, "not found: try /healthz or /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, "method not allowed: GET or HEAD\n"
        if path == "/healthz":
            gone = self._dead_for()
            if gone:
                return 503, f"not alive: no worker alive for {gone:.1f} s\n"
            return 200, "ok\n"
        reason = self._not_ready()
        if reason is None:
            return 200, "ready\n"
        return 503, f"not ready: {reason}\n"


def facts(primary: HasHealth) -> dict[str, Any]:
    """The health facts of this primary (for `fastcluster status --json`):
    alive, ready, reason, draining, drain_left, drain_delay, shutdown,
    workers, listening, health (the endpoint's bound address or None)."""
    return primary.health.facts()


# -- the HTTP endpoint --------------------------------------------------------

class _Conn:
    __slots__ = ("buf", "sock", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.timer: Timer | None = None


class _Server:
    """Non-blocking HTTP/1.x on one TCP address, served from the primary's loop."""

    def __init__(self, primary: Loop, address: str,
                 answer: Callable[[str, str], tuple[int, str]]) -> None:
        self._p = primary
        self.setting = address  # the `health` value it was bound for
        self._answer = answer
        self._conns: dict[int, _Conn] = {}  # by fd, oldest first
        host, port = parse_address(address)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _type, _proto, _name, sockaddr = infos[0]
        except socket.gaierror as e:
            raise OSError(errno.EINVAL, f"health endpoint {address!r}: {e}") from None
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"health endpoint {address!r}: {e.strerror}") from None
        self._sock = sock
        self._pauser = AcceptPause(primary, sock.fileno(), self._on_accept, "health endpoint")
        name = sock.getsockname()
        self.address = (f"[{name[0]}]:{name[1]}" if family == socket.AF_INET6
                        else f"{name[0]}:{name[1]}")
        primary.add_reader(sock.fileno(), self._on_accept)
        _open_servers.add(self)

    def _on_accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_FDS:
                    self._pauser.pause(e)  # level-triggered: retrying now would spin
                return  # ECONNABORTED and the like: the next wake-up tries again
            conn.setblocking(False)
            if len(self._conns) >= MAX_CONNS:
                self._drop(next(iter(self._conns.values())))
            c = _Conn(conn)
            self._conns[conn.fileno()] = c
            c.timer = self._p._timers.call_later(CONN_TIMEOUT, functools.partial(self._drop, c))
            self._p.add_reader(conn.fileno(), functools.partial(self._on_readable, c))

    def _on_readable(self, c: _Conn) -> None:
        try:
            chunk = c.sock.recv(MAX_REQUEST + 1 - len(c.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if not chunk:
            self._drop(c)
            return
        c.buf += chunk
        head_end = c.buf.find(b"\r\n\r\n")
        if head_end < 0:
            head_end = c.buf.find(b"\n\n")
        if head_end < 0:
            if len(c.buf) > MAX_REQUEST:
                self._reply(c, "GET", 431, "request too large\n")
            return
        self._respond(c, c.buf[:head_end])

    def _respond(self, c: _Conn, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._reply(c, "GET", 400, "bad request\n")
            return
        method = parts[0].decode("latin-1")
        path = parts[1].split(b"?", 1)[0].decode("latin-1")
        status, body = self._answer(method, path)
        self._reply(c, method, status, body)

    def _reply(self, c: _Conn, method: str, status: int, body: str) -> None:
        payload = body.encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\n"
                f"Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(OSError):  # a short write cannot happen this small
            c.sock.send(head if method == "HEAD" else head + payload)
        self._drop(c)

    def _drop(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if self._conns.pop(fd, None) is None:
            return
        if c.timer is not None:
            c.timer.cancel()
        self._p.remove_reader(fd)
        c.sock.close()

    def close(self) -> None:
        for c in list(self._conns.values()):
            self._drop(c)
        self._pauser.cancel()
        if self._sock.fileno() >= 0:
            self._p.remove_reader(self._sock.fileno())
            self._sock.close()
        _open_servers.discard(self)

    def forget(self) -> None:
        """In a forked child: close our copies only (the epoll set is the parent's)."""
        for c in self._conns.values():
            c.sock.close()
        self._conns.clear()
        self._sock.close()
        _open_servers.discard(self)
