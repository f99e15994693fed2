"""Hang detection, the primary's half: arms each worker's slot with its
timeout before the fork and checks the slots' beat stamps (and stalled
intakes) on a timer of the loop; a hung worker gets SIGABRT, then SIGKILL.
The theory of operation is in fastcluster/wire/beat.py.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Protocol

from ..wire.beat import interval_for

if TYPE_CHECKING:
    from .._core import CounterTable, Dispatcher
    from ..wire.settings import Settings
    from .proc import Proc
    from .timers import Timer, Timers

log = logging.getLogger("fastcluster")

ABORT_GRACE = 2.0  # seconds from SIGABRT (stack dump, maybe a core) to SIGKILL


class Loop(Protocol):
    """What the watchdog needs of the primary's loop (primary/loop.py)."""

    @property
    def table(self) -> CounterTable | None: ...
    @property
    def dispatcher(self) -> Dispatcher | None: ...
    @property
    def _timers(self) -> Timers: ...
    @property
    def _by_slot(self) -> dict[int, Proc]: ...
    @property
    def _procs(self) -> dict[int, Proc]: ...
    def config(self) -> Settings: ...
    def _kill(self, proc: Proc, signum: int) -> None: ...


class Watchdog:
    """The primary's half: arms each slot before the fork, checks on a timer."""

    def __init__(self, primary: Loop) -> None:
        self._primary = primary
        self._timeouts: dict[int, float] = {}  # slot -> timeout of its current worker
        self._timer: Timer | None = None
        self._aborted: set[int] = set()  # worker ids sent SIGABRT
        self._progress: dict[int, tuple[int, float]] = {}  # slot -> (taken, since when)

    def prepare(self, slot: int) -> None:
        """Before the fork (after the dispatcher zeroed the slot): tells the
        slot its worker's timeout, and makes sure the checks run."""
        p = self._primary
        timeout = float(p.config().timeout or 0.0)
        if p.table is None:
            return
        p.table.set_timeout_ms(slot, round(timeout * 1000.0))
        self._timeouts[slot] = timeout
        self._progress.pop(slot, None)  # a new worker: its counters start again
        if timeout > 0:
            self._schedule(interval_for(timeout))

    def _schedule(self, delay: float) -> None:
        t = self._timer
        if t is not None and not t.cancelled:
            if t.deadline <= time.monotonic() + delay:
                return
            t.cancel()
        self._timer = self._primary._timers.call_later(delay, self.check)

    def check(self) -> None:
        """Aborts every watched worker whose stamp is older than its timeout."""
        p = self._primary
        self._timer = None
        table = p.table
        if table is None:
            return
        now = time.monotonic_ns()
        delay: float | None = None
        for slot, proc in list(p._by_slot.items()):
            timeout = self._timeouts.get(slot, 0.0)
            if timeout <= 0 or proc.dead:
                continue
            step = interval_for(timeout)
            delay = step if delay is None else min(delay, step)
            if proc.worker.id in self._aborted:
                continue
            stalled = self._stalled(slot, now / 1e9)
            if stalled > timeout:
                self._abort(proc, stalled, timeout, "has not taken the connections waiting "
                            "for it")
                continue
            stamp = table.beat(slot)
            if stamp == 0:
                continue  # not serving yet (boot allowance), or not watchable
            age = (now - stamp) / 1e9
            if age > timeout:
                self._abort(proc, age, timeout)
        self._aborted.intersection_update(p._procs)
        if delay is not None:
            self._schedule(delay)

    def _stalled(self, slot: int, now: float) -> float:
        """Seconds connections have waited for the worker in slot while its
        `taken` counter stood still (0.0 when none wait or it moved)."""
        dispatcher = self._primary.dispatcher
        if dispatcher is None:
            return 0.0
        try:
            s = dispatcher.slot_stats(slot)
        except (OSError, ValueError):
            return 0.0
        last = self._progress.get(slot)
        if s["dispatched"] <= s["taken"] or last is None or last[0] != s["taken"]:
            self._progress[slot] = (s["taken"], now)
            return 0.0
        return now - last[1]

    def _abort(self, proc: Proc, age: float, timeout: float,
               what: str = "its serving loop has not beaten") -> None:
        p = self._primary
        w = proc.worker
        self._aborted.add(w.id)
        self._progress.pop(proc.slot, None)
        if _stopped(w.pid):
            # SIGABRT would wait for a SIGCONT (and SIGKILL for ABORT_GRACE):
            # a stopped process has no stack to dump; SIGKILL acts at once
            p._kill(proc, signal.SIGKILL)  # first: under steer its slot is biased out here
            log.error("fastcluster: worker %d (pid %d) is hung: %s for %.2f s (timeout "
                      "%g s), and it is stopped (SIGSTOP or a debugger); SIGKILL", w.id,
                      w.pid, what, age, timeout)
            return
        p._kill(proc, signal.SIGABRT)  # first: under steer its slot is biased out here
        log.error("fastcluster: worker %d (pid %d) is hung: %s for %.2f s (timeout %g s); "
                  "SIGABRT (stack on its stderr), SIGKILL in %g s", w.id, w.pid, what, age,
                  timeout, ABORT_GRACE)

        def still_alive() -> None:
            if not proc.dead:
                log.error("fastcluster: hung worker %d (pid %d) survived SIGABRT; SIGKILL",
                          w.id, w.pid)
                p._kill(proc, signal.SIGKILL)

        p._timers.call_later(ABORT_GRACE, still_alive)


def _stopped(pid: int) -> bool:
    """True if /proc says pid is stopped (T) or stopped by a tracer (t)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in (b"T", b"t")
