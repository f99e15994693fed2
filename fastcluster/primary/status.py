"""The cluster's state for `fastcluster status` and Prometheus, served by the primary.

Theory of operation: the primary's loop is the C dispatcher's; these servers
are two more fds in its epoll set (Primary.add_reader), so they need no
thread (the primary forks) and cost nothing until asked. Nothing is counted
in Python per connection: the workers' counters (connections taken and
closed, requests) live in shared memory and the dispatcher counts what it
sent each worker; a snapshot reads them when a client asks.

  StatusServer   a Unix socket, mode 0600 (only the primary's user may
                 read it), whose clients get the snapshot as one JSON
                 document and EOF: no request to parse, so nothing a client
                 sends can stall the primary. Removed at exit.
  MetricsServer  opt-in HTTP on TCP: GET /metrics answers the snapshot in
                 Prometheus' text format. Requests are read non-blocking,
                 one small buffer per client, at most MAX_CLIENTS pending
                 (one more drops the oldest), each for at most
                 CLIENT_TIMEOUT seconds (a timer, so idle clients expire
                 even when nothing new is accepted).

Out of fds (EMFILE) either server leaves the epoll set for a second, as
the health endpoint does (primary/acceptpause.py).

Per-worker `restarts`: a worker forked to replace another inherits that
worker's count plus one: a rolling step (SIGHUP, recycling) names the
worker it replaces; a respawn takes the place of the oldest worker that
died unasked and was not yet replaced. Workers added by TTIN start at 0.

Sockets are closed in any child forked from the primary (os.register_at_fork),
so workers never hold them.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._core import Dispatcher
    from ..wire.events import EventEmitter
    from .health import Health

from . import health as _health
from .acceptpause import OUT_OF_FDS, AcceptPause
from .prometheus import prometheus_text
from .timers import Timer, Timers

log = logging.getLogger("fastcluster")

RECV_MAX = 8192  # bytes of an HTTP request we read before answering
MAX_CLIENTS = 32  # metrics clients waiting for their request to arrive
CLIENT_TIMEOUT = 5.0  # seconds a metrics client gets to send its request
SNDBUF = 1 << 20  # a status answer is written at once: room for 256 workers

_open_servers: weakref.WeakSet[_Server] = weakref.WeakSet()


def _close_in_child() -> None:
    for server in list(_open_servers):
        server.close(unlink=False)


os.register_at_fork(after_in_child=_close_in_child)


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Source(Protocol):
    """What the snapshot and the servers need of the primary's loop (primary/loop.py)."""

    @property
    def events(self) -> EventEmitter: ...
    @property
    def settings(self) -> dict[str, Any]: ...
    @property
    def dispatcher(self) -> Dispatcher | None: ...
    @property
    def health(self) -> Health: ...
    def worker_stats(self) -> list[dict[str, Any]]: ...
    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    @property
    def _timers(self) -> Timers: ...


class Snapshot:
    """Collects the state; `info` is static facts about the primary (app, bind...)."""

    def __init__(self, info: dict[str, Any], primary: Source) -> None:
        self.info = info
        self.primary = primary
        self.started = time.monotonic()
        self.addresses: list[Any] = []
        self.restarts_total = 0
        self._restarts: dict[int, int] = {}  # worker id -> restarts
        self._leavers: collections.deque[int] = collections.deque()  # died, to respawn
        self._initial = 0  # workers still to fork before anything is a replacement
        primary.events.on("fork", self._on_fork)
        primary.events.on("exit", self._on_exit)
        primary.events.on("listening", self._on_listening)

    def expect_initial(self, n: int) -> None:
        self._initial = n

    def _replaces(self, wid: int) -> int | None:
        """The worker a rolling step (SIGHUP, recycling) forked wid to replace."""
        steps = getattr(getattr(self.primary, "_rolling", None), "_steps", None)
        step = steps.get(wid) if isinstance(steps, dict) else None
        old = getattr(step, "old", None)
        return old if isinstance(old, int) else None

    def _on_fork(self, w: Any) -> None:
        old = self._replaces(w.id)
        if self._initial > 0:
            self._initial -= 1
            self._restarts[w.id] = 0
        elif old is not None:  # rolled or recycled: it takes old's place
            self._restarts[w.id] = self._restarts.get(old, 0) + 1
            self.restarts_total += 1
        elif self._leavers:  # a respawn: it takes the place of one that died
            self._restarts[w.id] = self._restarts.pop(self._leavers.popleft(), 0) + 1
            self.restarts_total += 1
        else:  # one more (TTIN)
            self._restarts[w.id] = 0

    def _on_exit(self, w: Any, code: Any, signame: Any) -> None:
        if w.exited_after_disconnect:  # asked to go: replaced already, or not at all
            self._restarts.pop(w.id, None)
            return
        self._leavers.append(w.id)  # died: the supervisor's respawn takes its place
        while len(self._leavers) > 256:
            self._restarts.pop(self._leavers.popleft(), None)

    def _on_listening(self, w: Any, address: Any) -> None:
        wire = list(address) if isinstance(address, tuple) else address
        if wire not in self.addresses:
            self.addresses.append(wire)

    def collect(self) -> dict[str, Any]:
        primary = self.primary
        policy = primary.settings.get("policy", "rr")
        dispatched = policy in ("rr", "least")
        workers = []
        for s in sorted(primary.worker_stats(), key=lambda d: int(d["id"])):
            taken, closed = s.get("taken"), s.get("closed")
            steer = s.get("steer") or {}  # steer: chosen by the program, open, queued
            workers.append({
                "id": s["id"], "pid": s["pid"],
                "state": "exiting" if s["exiting"] and s["state"] != "dead" else s["state"],
                "uptime": round(float(s["uptime"]), 3),
                "dispatched": s.get("dispatched") if dispatched else steer.get("chosen"),
                "open": (taken - closed) if dispatched and taken is not None
                and closed is not None else steer.get("open"),
                "queued": steer.get("queued"),
                "requests": s.get("requests"),
                "restarts": self._restarts.get(int(s["id"]), 0),
                "rss": rss_bytes(int(s["pid"])),
            })
        core = primary.dispatcher.stats() if primary.dispatcher is not None else {}
        return {
            "version": 1,
            "primary": {
                **self.info,
                "pid": os.getpid(),
                "uptime": round(time.monotonic() - self.started, 3),
                "policy": policy,
                "addresses": self.addresses,
                "stopping": bool(getattr(primary, "_stopping", False)),
                "health": _health.facts(primary),  # ready, draining... as /readyz says
                "workers": len(workers),
                "restarts": self.restarts_total,
                "rss": rss_bytes(os.getpid()),
                "dispatcher": core,
            },
            "workers": workers,
        }


# -- servers on the primary's loop ----------------------------------------------

class _Server:
    def __init__(self, sock: socket.socket, snapshot: Snapshot) -> None:
        self.sock = sock
        self.snapshot = snapshot
        self.closed = False
        self._pauser = AcceptPause(snapshot.primary, sock.fileno(), self._on_ready,
                                   type(self).__name__)
        _open_servers.add(self)
        snapshot.primary.add_reader(sock.fileno(), self._on_ready)

    def _on_ready(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: not the primary's death
                if e.errno in OUT_OF_FDS:
                    self._pauser.pause(e)  # level-triggered: retrying now would spin
                    return
                if e.errno == errno.ECONNABORTED:
                    continue
                raise
            self.on_client(conn)

    def on_client(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self, unlink: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        _open_servers.discard(self)
        self._pauser.cancel()
        if unlink:
            with contextlib.suppress(Exception):
                self.snapshot.primary.remove_reader(self.sock.fileno())
        self.sock.close()


class StatusServer(_Server):
    def __init__(self, path: str, snapshot: Snapshot) -> None:
        self.path = path
        self.pid = os.getpid()
        sock = _unix_listener(path)
        super().__init__(sock, snapshot)

    def on_client(self, conn: socket.socket) -> None:
        with conn:
            data = json.dumps(self.snapshot.collect()).encode() + b"\n"
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(data)  # a client that does not read loses the rest

    def close(self, unlink: bool = True) -> None:
        was_open = not self.closed
        super().close(unlink)
        if was_open and unlink and os.getpid() == self.pid:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _unix_listener(path: str) -> socket.socket:
    """Binds a 0600 Unix socket at path; a stale socket file is replaced,
    a live one (another primary) is an error."""
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale: nobody serves it
            else:
                raise FileExistsError(errno.EADDRINUSE,
                                      "another fastcluster primary serves it", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


class MetricsServer(_Server):
    def __init__(self, address: tuple[str, int], snapshot: Snapshot) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        # by fd, oldest first: the socket, what it sent so far, its expiry timer
        self._clients: dict[int, tuple[socket.socket, bytearray, Timer | None]] = {}
        super().__init__(sock, snapshot)

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def on_client(self, conn: socket.socket) -> None:
        while len(self._clients) >= MAX_CLIENTS:  # the oldest idle one gives way
            self._drop(next(iter(self._clients)))
        conn.setblocking(False)
        fd = conn.fileno()
        primary = self.snapshot.primary
        timer = primary._timers.call_later(CLIENT_TIMEOUT, lambda: self._drop(fd))
        self._clients[fd] = (conn, bytearray(), timer)
        primary.add_reader(fd, lambda: self._on_request(fd))

    def _on_request(self, fd: int) -> None:
        entry = self._clients.get(fd)
        if entry is None:
            return
        conn, buf, _deadline = entry
        try:
            chunk = conn.recv(RECV_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and b"\r\n\r\n" not in buf and len(buf) < RECV_MAX:
            return
        if chunk:
            self._answer(conn, bytes(buf))
        self._drop(fd)

    def _answer(self, conn: socket.socket, request: bytes) -> None:
        line = request.split(b"\r\n", 1)[0].split()
        path = line[1].split(b"?", 1)[0] if len(line) >= 2 else b""
        if len(line) >= 2 and line[0] in (b"GET", b"HEAD") and path == b"/metrics":
            status = b"200 OK"
            body = prometheus_text(self.snapshot.collect()).encode()
        else:
            status, body = b"404 Not Found", b"not found: GET /metrics\n"
        head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4; "
                b"charset=utf-8\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        with contextlib.suppress(OSError):
            conn.send(head + (b"" if line[:1] == [b"HEAD"] else body))

    def _drop(self, fd: int) -> None:
        entry = self._clients.pop(fd, None)
        if entry is not None:
            with contextlib.suppress(Exception):
                self.snapshot.primary.remove_reader(fd)
            if entry[2] is not None:
                entry[2].cancel()
            entry[0].close()

    def close(self, unlink: bool = True) -> None:
        for fd in list(self._clients):
            if unlink:
                self._drop(fd)
            else:
                self._clients.pop(fd)[0].close()  # a forked child: the timers are not its
        super().close(unlink)
