"""Hang detection, the worker's half: the beaters (asyncio loops, sync
servers' serve_forever(), cluster.run() in the main thread) and the stamp
they write to the worker's shared-memory slot. The theory of operation is
in fastcluster/wire/beat.py; the primary's half is primary/watchdog.py.

A worker that forks (ForkingMixIn, a subprocess via fork) does not beat from
the child: the child's heart is switched off at fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..wire.beat import interval_for

if TYPE_CHECKING:
    from .._core import WorkerChannel

log = logging.getLogger("fastcluster")


class Heart:
    """A worker's beaters and the stamp they write to its slot."""

    def __init__(self, channel: WorkerChannel, pid: int) -> None:
        self._channel = channel
        self.pid = pid
        self.timeout = channel.timeout_ms / 1000.0
        self.on = self.timeout > 0
        self.interval = interval_for(self.timeout) if self.on else 0.0
        self._last: dict[object, int] = {}
        self._lock = threading.Lock()
        self._skip_ns = int(self.interval * 1e9 / 4)  # a busy loop beats at most 4x/interval
        if self.on and not faulthandler.is_enabled():
            _enable_faulthandler()

    def beat(self, key: object) -> None:
        """key's thread is free to serve now."""
        if not self.on:
            return
        now = time.monotonic_ns()
        if now - self._last.get(key, 0) < self._skip_ns:
            return  # beat recently (a serve_forever() busy with requests)
        with self._lock:
            self._last[key] = now
            self._channel.beat(min(self._last.values()))

    def forget(self, key: object) -> None:
        """key serves no more: it stops counting."""
        if not self.on:
            return
        with self._lock:
            if self._last.pop(key, None) is None:
                return
            self._channel.beat(min(self._last.values()) if self._last else 0)

    def off(self) -> None:
        self.on = False


def _enable_faulthandler() -> None:
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):
        with contextlib.suppress(ValueError, OSError, RuntimeError):
            faulthandler.enable(file=2, all_threads=True)


_heart: Heart | None = None
_channel: WorkerChannel | None = None  # this worker's data channel (install())
_owner = 0  # the pid install() was called in


def install(channel: WorkerChannel | None, pid: int) -> None:
    """At the worker's start (boot): the channel whose slot the heart stamps.
    The Heart itself is made at the first heart() call."""
    global _channel, _owner
    _channel, _owner = channel, pid


def heart() -> Heart | None:
    """This worker's heart; None in the primary (and in a worker's child)."""
    global _heart
    if _channel is None or _owner != os.getpid():
        return None
    if _heart is None:
        _heart = Heart(_channel, os.getpid())
    return _heart if _heart.pid == os.getpid() else None


def _forked_child() -> None:
    if _heart is not None:
        _heart.off()


os.register_at_fork(after_in_child=_forked_child)


class _LoopBeat:
    """Beats on one asyncio loop while a fastcluster.aio server is open on it."""

    def __init__(self, h: Heart, loop: asyncio.AbstractEventLoop) -> None:
        self.heart = h
        self.loop = loop
        self.servers: set[object] = set()
        self.handle: asyncio.TimerHandle | None = None

    def tick(self) -> None:
        self.heart.beat(self)
        self.handle = self.loop.call_later(self.heart.interval, self.tick)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.heart.forget(self)


_loops: dict[asyncio.AbstractEventLoop, _LoopBeat] = {}


def server_opened(loop: asyncio.AbstractEventLoop, server: object) -> None:
    """aio: a server is serving on loop (called on the loop)."""
    h = heart()
    if h is None or not h.on:
        return
    lb = _loops.get(loop)
    if lb is None or lb.heart is not h:
        lb = _loops[loop] = _LoopBeat(h, loop)
    first = not lb.servers
    lb.servers.add(server)
    if first:
        lb.tick()


def server_closed(loop: asyncio.AbstractEventLoop, server: object) -> None:
    """aio: a server on loop is closed; the last one stops the loop's beat."""
    lb = _loops.get(loop)
    if lb is None:
        return
    lb.servers.discard(server)
    if not lb.servers:
        del _loops[loop]
        lb.stop()


def watch_server(server: Any) -> None:
    """listen_server(): makes serve_forever() beat through service_actions()."""
    h = heart()
    if h is None or not h.on:
        return
    token = object()
    serve_forever: Callable[..., Any] = server.serve_forever
    service_actions: Callable[[], Any] = server.service_actions

    def beating_service_actions() -> Any:
        h.beat(token)
        return service_actions()

    def beating_serve_forever(poll_interval: float = 0.5) -> Any:
        if poll_interval > h.timeout / 2:
            log.warning("fastcluster: serve_forever(poll_interval=%g) beats less often than "
                        "the hang timeout (%g s) needs; an idle worker may be taken for a "
                        "hung one", poll_interval, h.timeout)
        h.beat(token)
        try:
            return serve_forever(poll_interval)
        finally:
            h.forget(token)

    server.service_actions = beating_service_actions
    server.serve_forever = beating_serve_forever


def wait_serving(done: threading.Event) -> None:
    """cluster.run() in a worker's main thread: waits for done, beating."""
    h = heart()
    if h is None or not h.on:
        while not done.wait(0.5):
            pass
        return
    token = object()
    try:
        h.beat(token)
        while not done.wait(h.interval):
            h.beat(token)
    finally:
        h.forget(token)
