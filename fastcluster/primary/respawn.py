"""Respawn: replacing workers that exit without being asked.

Theory of operation: at reap, a worker that exits with respawn on, the
cluster not stopping and its exit not asked for (kill(), disconnect(), a
rolling restart, a shutdown) gets a replacement with the same fork(env=...)
extras. With `keep_count` (the CLI's), so does a worker that left on its own
(SIGTERM from outside, its own disconnect()), as gunicorn keeps its count.
Three cases, and the log line says which:

  ready   it had listened on every address it asked for (at least one):
          it served, so its death is no crash loop. It is replaced right
          there, inside the reap, with no timer in between: the replacement
          is forked within the loop turn that saw the SIGCHLD (gunicorn's
          way). Unless more than `respawn_burst` ready workers died within
          `respawn_stable` seconds: a request that kills every worker it
          reaches must not become a fork bomb, so from there on the deaths
          go through the crash-loop pacer too.
  stable  it never became ready but lived `respawn_stable` seconds: at once.
  young   it died before it was ready, younger than `respawn_stable`: the
          crash-loop pacer (backoff.py), a timer with a growing delay, and a
          log line that says what happens (an error once the crashes repeat,
          so a worker that cannot boot is reported, not silently retried).

Pending replacements are cancelled when the cluster stops, so SIGTERM during
a long backoff exits at once.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import TYPE_CHECKING, Protocol

from .timers import Timer

if TYPE_CHECKING:
    from ..wire.handle import Worker
    from ..wire.settings import Settings
    from .backoff import Backoff
    from .proc import Proc
    from .timers import Timers

log = logging.getLogger("fastcluster")

LOUD_AFTER = 3  # crashes in a row after which each one is logged as an error


class Loop(Protocol):
    """What respawning needs of the primary's loop (primary/loop.py)."""

    @property
    def _stopping(self) -> bool: ...
    @property
    def _backoff(self) -> Backoff: ...
    @property
    def _timers(self) -> Timers: ...
    def config(self) -> Settings: ...
    def _spawn(self, extra: dict[str, str]) -> Worker: ...


class Respawner:
    def __init__(self, primary: Loop) -> None:
        self.p = primary
        self._pending: list[Timer] = []
        self._ready_deaths: collections.deque[float] = collections.deque()  # monotonic times

    @property
    def pending(self) -> int:
        self._pending = [t for t in self._pending if not t.cancelled]
        return len(self._pending)

    def cancel(self) -> None:
        for t in self._pending:
            t.cancel()
        self._pending.clear()

    def on_listening(self, proc: Proc) -> None:
        """A "listening" frame: ready once every granted listen was followed
        by one (a frame for an address it was not given counts for nothing
        more than one it was: it can only speed up its own respawn)."""
        proc.listened += 1
        if proc.listens_ok > 0 and proc.listened >= proc.listens_ok:
            proc.ready = True

    def replaces(self, proc: Proc) -> bool:
        """Whether on_exit starts a replacement for proc (now or after a backoff)."""
        p = self.p
        cfg = p.config()
        if not cfg.respawn or p._stopping or proc.replaced:
            return False
        # asked to go (or it left and keep_count is off: Node's voluntary exit)
        return not proc.worker.exited_after_disconnect or (cfg.keep_count and proc.left)

    def on_exit(self, proc: Proc, code: int | None, signame: str | None,
                how: str | None = None) -> bool:
        """Replaces proc if it is to be; True if a replacement was forked or
        is scheduled."""
        p = self.p
        if not self.replaces(proc):
            return False
        lifetime = time.monotonic() - proc.started
        if how is None:
            how = f"signal {signame}" if signame else f"code {code}"
        w = proc.worker
        if proc.ready:
            return self._ready_died(proc, how, lifetime)
        backoff = p._backoff
        delay = backoff.on_exit(lifetime, asked=False)
        if delay <= 0:
            log.info("fastcluster: worker %d (pid %d) exited (%s) %.2f s after it started; "
                     "replacing it now", w.id, w.pid, how, lifetime)
            return self.spawn(proc.env)
        if backoff.streak >= LOUD_AFTER:
            log.error("fastcluster: worker %d (pid %d) exited (%s) %.2f s after it started, "
                      "before it was ready; %d workers in a row died within %.0f s: is the "
                      "worker's main failing at boot? next respawn in %.2f s (backoff up to "
                      "%.0f s)", w.id, w.pid, how, lifetime, backoff.streak,
                      backoff.stable_after, delay, backoff.cap)
        else:
            log.warning("fastcluster: worker %d (pid %d) exited (%s) %.2f s after it started, "
                        "before it was ready (listening); respawning in %.2f s", w.id, w.pid,
                        how, lifetime, delay)
        self.later(delay, proc.env)
        return True

    def _ready_died(self, proc: Proc, how: str, lifetime: float) -> bool:
        cfg = self.p.config()
        now = time.monotonic()
        deaths = self._ready_deaths
        deaths.append(now)
        while deaths and now - deaths[0] > cfg.respawn_stable:
            deaths.popleft()
        w = proc.worker
        if len(deaths) <= cfg.respawn_burst:
            log.info("fastcluster: worker %d (pid %d) exited (%s) after %.2f s, ready "
                     "(listening); replacing it now", w.id, w.pid, how, lifetime)
            return self.spawn(proc.env)
        delay = self.p._backoff.on_exit(0.0, asked=False)
        log.error("fastcluster: worker %d (pid %d) exited (%s) after %.2f s, ready "
                  "(listening); %d ready workers died within %.0f s (respawn_burst=%d): "
                  "something kills them as they serve; next respawn in %.2f s (backoff)",
                  w.id, w.pid, how, lifetime, len(deaths), cfg.respawn_stable,
                  cfg.respawn_burst, delay)
        self.later(delay, proc.env)
        return True

    def later(self, delay: float, env: dict[str, str]) -> None:
        def again() -> None:
            if not self.p._stopping:
                self.spawn(env)

        self._pending.append(self.p._timers.call_later(delay, again))

    def spawn(self, env: dict[str, str]) -> bool:
        try:
            self.p._spawn(env)
        except Exception:
            delay = self.p._backoff.on_exit(0.0, asked=False)
            log.exception("fastcluster: respawn failed; trying again in %.2f s", delay)
            self.later(delay, env)
        return True
