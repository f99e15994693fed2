"""fastcluster: Node.js's cluster module for Python, with the hot path in C.

    import fastcluster as cluster

    if cluster.is_primary:
        for _ in range(4):
            cluster.fork()
        cluster.on("exit", lambda w, code, sig: print(f"worker {w.pid} died"))
        cluster.run()                       # serve and supervise until shutdown
    else:
        server = HTTPServer(("127.0.0.1", 8000), Handler, bind_and_activate=False)
        cluster.listen_server(server).serve_forever()

Node's names in snake_case (see DESIGN.md, "Public API"). In Python nothing
happens without a loop: cluster.run() is the primary's loop; events,
messages and disconnect callbacks are delivered from it. In a worker,
cluster.run() serves the worker's channel until it is disconnected (a worker
whose main returns does that by itself while it has message handlers or
listeners). Linux only: the import fails with ImportError elsewhere.

Public: the names in __all__ below, and the modules fastcluster.aio,
fastcluster.asgi, fastcluster.wsgi and fastcluster.pytest_plugin (and the
`fastcluster` command). Everything else is private: the subpackages
primary/ (runs in the primary), worker_side/ (runs in a worker), wire/ (what
both share), cli/ (the command), and _role, _core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from . import (
    _core,  # noqa: F401  (ImportError with a clear message off Linux)
    _role,
)
from .wire.errors import ClusterError, ProtocolError
from .wire.events import EventEmitter
from .wire.handle import Worker
from .wire.listener import Listener
from .worker_side import listener as _listener

__all__ = [
    "POLICY_LEAST",
    "POLICY_REUSEPORT",
    "POLICY_RR",
    "POLICY_SHARED",
    "POLICY_STEER",
    "SCHED_NONE",
    "SCHED_RR",
    "ClusterError",
    "Listener",
    "ProtocolError",
    "Worker",
    "disconnect",
    "fork",
    "is_primary",
    "is_worker",
    "listen",
    "listen_server",
    "off",
    "on",
    "once",
    "run",
    "settings",
    "setup_primary",
    "worker",
    "workers",
]

POLICY_RR = "rr"  # the primary accepts; round robin over workers with room (default)
POLICY_LEAST = "least"  # the primary accepts; fewest open connections first
POLICY_SHARED = "shared"  # every worker accepts on the one listening socket
POLICY_REUSEPORT = "reuseport"  # every worker accepts on its own SO_REUSEPORT socket
POLICY_STEER = "steer"  # each worker accepts on its slot's socket; the kernel picks by load
SCHED_RR = POLICY_RR
SCHED_NONE = POLICY_SHARED

# The role's view; rebound in a worker before its code runs (_role._become_worker).
is_primary: bool = True
is_worker: bool = False
worker: Worker | None = None
workers: dict[int, Worker] = _role.workers
settings: dict[str, Any] = _role.settings


def _primary_only(name: str, instead: str = "") -> None:
    if _role.runtime is not None:
        raise RuntimeError(f"cluster.{name}() is for the primary; this is a worker{instead}")


def setup_primary(**options: Any) -> None:
    """Changes settings (cumulatively) for the next fork(); emits "setup"."""
    _primary_only("setup_primary")
    _role.primary().setup(options)


def fork(env: Mapping[str, str] | None = None) -> Worker:
    """Starts a worker (ids from 1, never reused); env adds to its environment."""
    _primary_only("fork")
    return _role.primary().fork(env)


def disconnect(callback: Callable[[], object] | None = None) -> None:
    """Disconnects every worker (gracefully); callback runs, from the loop
    (cluster.run()), once no worker is left."""
    _primary_only("disconnect", " (to disconnect it, cluster.worker.disconnect())")
    _role.primary().disconnect(callback)


def run() -> None:
    """Primary: serve and supervise until no worker is left (after disconnect,
    a signal, or every worker's exit without respawn). Worker: serve its
    channel until disconnected."""
    rt = _role.runtime
    if rt is not None:
        rt.serve()
    else:
        _role.primary().run()


def listen(address: Any, backlog: int | None = None) -> Listener:
    """Listens on address through the cluster: (host, port), a Unix socket
    path, or a port. In a worker, the primary binds it once for all workers
    (port 0: one real port for all); bind errors raise OSError here."""
    if backlog is not None and (isinstance(backlog, bool) or not isinstance(backlog, int)):
        raise TypeError(f"listen(): backlog must be an int >= 0 or None, got {backlog!r}")
    if backlog is not None and backlog < 0:
        raise ValueError(f"listen(): backlog must be an int >= 0 or None, got {backlog!r}")
    rt = _role.runtime
    if rt is not None:
        return rt.listen(address, backlog)
    return _role.primary().listen(address, backlog)


def listen_server(server: Any, backlog: int | None = None) -> Any:
    """Makes a socketserver/http.server server (built with
    bind_and_activate=False) take its connections through the cluster on its
    server_address. Returns the server: listen_server(s).serve_forever().
    A server that serves each request inline (no ThreadingMixIn) is given one
    connection at a time: a worker killed mid-request loses only that one."""
    rt = _role.runtime
    return _listener.listen_server(server, listen, backlog,
                                   None if rt is None else rt.limit_window)


def on(event: str, fn: Callable[..., Any]) -> EventEmitter:
    """Cluster events: "setup"(settings) "fork"(w) "online"(w) "listening"(w,
    address) "message"(w, msg) "disconnect"(w) "exit"(w, code, signal)."""
    return _role.events.on(event, fn)


def once(event: str, fn: Callable[..., Any]) -> EventEmitter:
    return _role.events.once(event, fn)


def off(event: str, fn: Callable[..., Any]) -> EventEmitter:
    return _role.events.off(event, fn)
