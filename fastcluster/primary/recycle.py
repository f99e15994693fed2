"""Recycling: replace a worker that served `max_requests` or grew past
`max_rss` bytes, gracefully, through the rolling-restart path (rolling.py:
the replacement listens first, then the old worker finishes what it holds).

Theory of operation: nothing is counted per connection in Python. A timer
in the primary's loop (every CHECK_EVERY seconds, only while a limit is
set) reads, per worker:

  requests   the worker's shared-memory slot (Dispatcher.slot_stats): the
             `requests` counter if the worker bumps it
             (WorkerChannel.request_done), else `taken`, the connections it
             took from the dispatcher. The bundled listeners and asyncio
             helpers do not count HTTP requests, so with them max_requests
             counts connections (a keep-alive connection is one). With the
             shared/reuseport policies the dispatcher passes no connection,
             so only request_done() counts.
  rss        /proc/<pid>/statm, resident pages times the page size.

Each worker's request limit is max_requests plus a random 0..jitter drawn
at its fork, so workers started together do not all recycle at once. After
a replacement failed to boot, recycling waits _rolling.COOLDOWN seconds.
"""

from __future__ import annotations

import logging
import os
import random
from typing import TYPE_CHECKING, Protocol

from .timers import Timer

if TYPE_CHECKING:
    from .._core import Dispatcher
    from ..wire.settings import Settings
    from .proc import Proc
    from .rolling import Rolling
    from .timers import Timers

log = logging.getLogger("fastcluster")

CHECK_EVERY = 0.5  # seconds between checks
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int) -> int | None:
    """Resident set size of pid in bytes, None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class Loop(Protocol):
    """What recycling needs of the primary's loop (primary/loop.py)."""

    @property
    def _shutdown(self) -> str | None: ...
    @property
    def _procs(self) -> dict[int, Proc]: ...
    @property
    def _rolling(self) -> Rolling: ...
    @property
    def _timers(self) -> Timers: ...
    @property
    def dispatcher(self) -> Dispatcher | None: ...
    def config(self) -> Settings: ...


class Recycler:
    def __init__(self, primary: Loop) -> None:
        self.p = primary
        self._limits: dict[int, int] = {}  # worker id -> its max_requests with jitter
        self._timer: Timer | None = None
        self._rng = random.Random()

    def on_spawn(self, proc: Proc) -> None:
        cfg = self.p.config()
        if cfg.max_requests:
            jitter = self._rng.randint(0, cfg.max_requests_jitter)
            self._limits[proc.worker.id] = cfg.max_requests + jitter
        self.arm()

    def on_exit(self, proc: Proc) -> None:
        self._limits.pop(proc.worker.id, None)

    def arm(self) -> None:
        cfg = self.p.config()
        if self._timer is None and (cfg.max_requests or cfg.max_rss):
            self._timer = self.p._timers.call_later(CHECK_EVERY, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        p = self.p
        if p._shutdown is not None or not p._procs:
            return
        if not p._rolling.cooling_down():
            for proc in list(p._procs.values()):
                if proc.dead or proc.worker.exited_after_disconnect or \
                        p._rolling.busy(proc.worker.id):
                    continue
                reason = self._over(proc)
                if reason is not None:
                    p._rolling.recycle(proc, reason)
        self.arm()

    def _over(self, proc: Proc) -> str | None:
        cfg = self.p.config()
        limit = self._limits.get(proc.worker.id)
        if cfg.max_requests and limit is None:  # max_requests set after this fork
            limit = self._limits[proc.worker.id] = cfg.max_requests
        if limit and self.p.dispatcher is not None:
            try:
                st = self.p.dispatcher.slot_stats(proc.slot)
            except (OSError, ValueError):
                st = {}
            served = max(st.get("requests", 0), st.get("taken", 0))
            if served >= limit:
                return f"max_requests ({served} served, limit {limit})"
        if cfg.max_rss:
            rss = rss_bytes(proc.worker.pid)
            if rss is not None and rss >= cfg.max_rss:
                return f"max_rss ({rss} bytes resident, limit {cfg.max_rss})"
        return None
