"""The primary's settings and public operations (a mixin of primary/loop.py's
Primary): setup_primary(), disconnect(), listen() in the primary, and the
extra fds and stats the CLI's status socket uses (add_reader, worker_stats).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import EPOLLIN, POLICY_LEAST, POLICY_RR
from ..wire import address as _address
from ..wire.handle import Worker
from ..wire.listener import Listener, NullTracker, SocketListener
from ..wire.settings import Settings, defaults

if TYPE_CHECKING:
    from .._core import CounterTable, Dispatcher
    from ..wire.events import EventEmitter
    from .backoff import Backoff
    from .health import Health
    from .proc import Proc
    from .recycle import Recycler
    from .registry import Registry
    from .respawn import Respawner
    from .rolling import Rolling

log = logging.getLogger("fastcluster")


def core_policy(policy: str) -> int:
    # steer's fallback for what it cannot steer (Unix, systemd sockets) is `least`
    return POLICY_LEAST if policy in ("least", "steer") else POLICY_RR


class Operations:
    """Settings, the public operations, and the extra fds and stats of the CLI's status socket."""

    # the loop's state this part uses (set in Primary.__init__, primary/loop.py)
    _backoff: Backoff
    _disconnect_cbs: list[Callable[[], object]]
    _procs: dict[int, Proc]
    _readers: dict[int, Callable[[], object]]
    _recycler: Recycler
    _respawner: Respawner
    _rolling: Rolling
    _running: bool
    _shutdown: str | None
    _soon: collections.deque[Callable[[], object]]
    _stopping: bool
    cfg: Settings | None
    dispatcher: Dispatcher | None
    events: EventEmitter
    health: Health
    pid: int
    registry: Registry | None
    settings: dict[str, Any]
    workers: dict[int, Worker]

    if TYPE_CHECKING:  # the loop's methods this part calls
        def _all_gone(self) -> None: ...
        def _ensure_core(self) -> tuple[CounterTable, Dispatcher, Registry]: ...

    # -- settings ------------------------------------------------------------

    def config(self) -> Settings:
        if self.cfg is None:
            self.cfg = defaults()
            self._publish()
        return self.cfg

    def _publish(self) -> None:
        assert self.cfg is not None
        self.settings.clear()
        self.settings.update(self.cfg.as_dict())

    def setup(self, updates: dict[str, Any]) -> None:
        cfg = (self.cfg or defaults()).merge(updates)
        self.health.configure(cfg)  # binds the `health` endpoint (OSError: nothing changed)
        self.cfg = cfg
        self._publish()
        if any(name.startswith("respawn_") for name in updates):
            self._backoff.configure(self.cfg.respawn_delay, self.cfg.respawn_delay_max,
                                    self.cfg.respawn_stable)
        if self._running and self._shutdown is None:
            self._recycler.arm()  # max_requests / max_rss set while running
        if self.dispatcher is not None:
            self.dispatcher.set_policy(core_policy(self.cfg.policy))
            self.dispatcher.set_stall_ms(self.cfg.stall_ms)
        self._emit_setup()

    def _emit_setup(self) -> None:
        # Node emits "setup" on the next tick, with the settings of this call:
        # a listener added right after setup_primary() hears it. Here the
        # next tick is the loop's next turn: run() runs it before it serves.
        snapshot = dict(self.settings)
        self._soon.append(lambda: self.events.emit("setup", snapshot))

    def _release_idle(self) -> None:
        """Unix socket paths no worker listens on, kept for no respawn and no
        rolling restart, are closed and unlinked (as Node closes a handle
        when its last worker goes)."""
        if self.registry is None or self._rolling.active or self._respawner.pending \
                or self._shutdown is not None:
            return
        for path in self.registry.release_idle():
            log.info("fastcluster: no worker listens on %s any more: closed and removed", path)


    # -- public operations ---------------------------------------------------

    def disconnect(self, callback: Callable[[], object] | None = None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {callback!r}")
        self._stopping = True
        self._respawner.cancel()
        self._rolling.stop()
        if self.dispatcher is not None:
            self.dispatcher.set_accepting(False)
        if callback is not None:
            self._disconnect_cbs.append(callback)
        if not self.workers:
            self._soon.append(self._all_gone)
        for w in list(self.workers.values()):
            if w.is_connected():
                w.disconnect()

    def listen(self, address: Any, backlog: int | None = None) -> Listener:
        """cluster.listen() in the primary itself: a plain listening socket."""
        wire = _address.to_wire(address)
        family, sockaddr = _address.resolve(wire)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog or self.config().backlog)
        except BaseException:
            sock.close()
            raise
        return SocketListener(sock, NullTracker())

    def adopt(self, sock: socket.socket) -> None:
        """Takes a bound, listening socket as the one for its address, as a
        systemd-passed one (the CLI's --fd, and the Unix sockets it binds with
        their mode): a worker's listen on that address gets it."""
        _t, _d, registry = self._ensure_core()
        registry.inherited.append(sock)

    def _atexit(self) -> None:
        if os.getpid() != self.pid:
            return
        if self.workers and not self._running:
            log.warning("fastcluster: the primary exits with %d worker(s) alive (they die "
                        "with it); call cluster.run() to serve and supervise them",
                        len(self.workers))
        if self.registry is not None:
            self.registry.close_all()

    # -- extra fds and stats (the CLI's status socket) -----------------------

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Calls callback from the loop while fd is readable. For control-plane
        fds (a status socket), never for served connections. fd stays the
        caller's: remove_reader() before closing it."""
        _t, dispatcher, _r = self._ensure_core()
        dispatcher.watch(fd, -fd - 1, EPOLLIN)  # workers' tokens are ids >= 1
        self._readers[-fd - 1] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(-fd - 1, None) is not None and self.dispatcher is not None:
            with contextlib.suppress(OSError, ValueError):
                self.dispatcher.unwatch(fd)

    def _on_reader(self, token: int) -> None:
        callback = self._readers.get(token)
        if callback is not None:
            try:
                callback()
            except Exception:  # still readable, it would be called (and raise) every turn
                fd = -token - 1
                log.exception("fastcluster: the reader of fd %d raised; it is no longer "
                              "watched", fd)
                self.remove_reader(fd)

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: id, pid, state, slot, uptime (s), exiting, and the
        dispatcher's and shared counters (dispatched, held, unsent, taken,
        closed, requests). Read when asked; nothing is counted in Python."""
        out: list[dict[str, Any]] = []
        now = time.monotonic()
        for proc in self._procs.values():
            w = proc.worker
            d: dict[str, Any] = {"id": w.id, "pid": w.pid, "state": w.state,
                                 "slot": proc.slot, "uptime": now - proc.started,
                                 "exiting": bool(w.exited_after_disconnect)}
            if self.dispatcher is not None and not proc.dead:
                with contextlib.suppress(OSError, ValueError):
                    d.update(self.dispatcher.slot_stats(proc.slot))
            if self.registry is not None:  # steer: the kernel's choice, read from C
                d["steer"] = self.registry.steering.slot_info(proc.slot)
            out.append(d)
        return out
