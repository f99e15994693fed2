"""Respawn: replacing workers that exit without being asked.

Theory of operation: at reap, a worker that exits with respawn on, the
cluster not stopping and its exit not asked for (kill(), disconnect(), a
rolling restart, a shutdown) gets a replacement with the same fork(env=...)
extras. A worker that lived `respawn_stable` seconds is replaced right there,
inside the reap, with no timer in between: the replacement is forked within
the same loop turn that saw the SIGCHLD. One that died younger goes through
the crash-loop pacer (backoff.py): a timer with a growing delay, and a log
line that says what happens (an error once the crashes repeat, so a worker
that cannot boot is reported, not silently retried). Pending replacements are
cancelled when the cluster stops, so SIGTERM during a long backoff exits at
once.
"""

from __future__ import annotations

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

    @property
    def pending(self) -> int:
        self._pending = [t for t in self._pending if not t.cancelled]
        return len(self._pending)

    def cancel(self) -> None:
        for t in self._pending:
            t.cancel()
        self._pending.clear()

    def replaces(self, proc: Proc) -> bool:
        """Whether on_exit starts a replacement for proc (now or after a backoff)."""
        p = self.p
        return p.config().respawn and not p._stopping and not proc.worker.exited_after_disconnect

    def on_exit(self, proc: Proc, code: int | None, signame: str | None) -> None:
        p = self.p
        if not self.replaces(proc):
            return
        lifetime = time.monotonic() - proc.started
        backoff = p._backoff
        delay = backoff.on_exit(lifetime, asked=False)
        if delay <= 0:
            self.spawn(proc.env)
            return
        how = f"signal {signame}" if signame else f"code {code}"
        if backoff.streak >= LOUD_AFTER:
            log.error("fastcluster: worker %d (pid %d) exited (%s) %.2f s after it started; "
                      "%d workers in a row died within %.0f s: is the worker's main failing "
                      "at boot? next respawn in %.2f s (backoff up to %.0f s)",
                      proc.worker.id, proc.worker.pid, how, lifetime, backoff.streak,
                      backoff.stable_after, delay, backoff.cap)
        else:
            log.warning("fastcluster: worker %d (pid %d) exited (%s) %.2f s after it started; "
                        "respawning in %.2f s", proc.worker.id, proc.worker.pid, how,
                        lifetime, delay)
        self.later(delay, proc.env)

    def later(self, delay: float, env: dict[str, str]) -> None:
        def again() -> None:
            if not self.p._stopping:
                self.spawn(env)

        self._pending.append(self.p._timers.call_later(delay, again))

    def spawn(self, env: dict[str, str]) -> None:
        try:
            self.p._spawn(env)
        except Exception:
            delay = self.p._backoff.on_exit(0.0, asked=False)
            log.exception("fastcluster: respawn failed; trying again in %.2f s", delay)
            self.later(delay, env)
