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

A max_rss below what a fresh worker already uses would recycle forever (a
fork every tick). So: a warning when max_rss is set below the primary's own
RSS (a forked worker starts near it); and a worker over max_rss at its first
check ("born over") is not recycled at once: it is logged, and such workers
are recycled one per hold period, the hold doubling from HOLD_FIRST up to
HOLD_MAX. A worker once seen under the limit that grows past it is recycled
at the next check, as before.
"""

from __future__ import annotations

import logging
import os
import random
import time
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
HOLD_FIRST = 2.0  # seconds before recycling a worker that was over max_rss from its start
HOLD_MAX = 300.0  # the hold doubles per such recycle up to this
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
        self._under: set[int] = set()  # worker ids seen under max_rss at least once
        self._hold = 0.0  # seconds: the current hold on recycling born-over workers
        self._hold_until = 0.0  # monotonic time the hold ends
        self._rss_checked = 0  # the max_rss value the start-up check was made for

    def on_spawn(self, proc: Proc) -> None:
        cfg = self.p.config()
        if cfg.max_requests:
            jitter = self._rng.randint(0, cfg.max_requests_jitter)
            self._limits[proc.worker.id] = cfg.max_requests + jitter
        self.arm()

    def on_exit(self, proc: Proc) -> None:
        self._limits.pop(proc.worker.id, None)
        self._under.discard(proc.worker.id)

    def arm(self) -> None:
        cfg = self.p.config()
        if cfg.max_rss and cfg.max_rss != self._rss_checked:
            self._rss_checked = cfg.max_rss
            self._hold = self._hold_until = 0.0
            own = rss_bytes(os.getpid())
            if own is not None and own >= cfg.max_rss:
                log.warning("fastcluster: max_rss (%d bytes) is below the primary's own "
                            "resident memory (%d bytes); a forked worker starts about there, "
                            "so it would be recycled as soon as it starts: raise max_rss",
                            cfg.max_rss, own)
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
            if rss is None:
                return None
            if rss < cfg.max_rss:
                self._under.add(proc.worker.id)
            elif proc.worker.id in self._under:
                return f"max_rss ({rss} bytes resident, limit {cfg.max_rss})"
            else:
                return self._born_over(proc, rss, cfg.max_rss)
        return None

    def _born_over(self, proc: Proc, rss: int, limit: int) -> str | None:
        """A worker over max_rss since its start: recycle one per hold period."""
        now = time.monotonic()
        if now < self._hold_until:
            return None
        first = self._hold == 0.0
        self._hold = HOLD_FIRST if first else min(self._hold * 2, HOLD_MAX)
        self._hold_until = now + self._hold
        log.warning("fastcluster: worker %d (pid %d) is already over max_rss at its start "
                    "(%d bytes resident, limit %d): recycling cannot bring a fresh worker "
                    "under it; raise max_rss. Such workers are recycled one per %.0f s",
                    proc.worker.id, proc.worker.pid, rss, limit, self._hold)
        if first:
            return None
        return f"max_rss ({rss} bytes resident since its start, limit {limit})"
