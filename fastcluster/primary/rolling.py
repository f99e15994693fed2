"""Rolling restart (SIGHUP) and graceful recycling: replace workers one
batch at a time, never dropping a connection.

Theory of operation. A step replaces one old worker: fork a replacement
(same fork(env=...) extras), wait until it is ready, then disconnect the old
one gracefully (it stops taking connections, finishes what it holds, exits;
SIGKILL after graceful_timeout). Ready means the replacement listens on
every address the old one listens on (also one the old worker starts to
listen on meanwhile). If the old worker never listened (yet), the
replacement is ready once it listens on anything, or after SETTLE seconds
online: a replacement that is merely online, its main not yet run, would
otherwise retire a worker that was about to listen. Listening sockets belong to the primary and
stay open the whole time, so connections keep queueing in the kernel and
the dispatcher hands them to whichever workers are subscribed: at every
moment at least the old worker or its ready replacement takes them.

At most `rolling_batch` steps are under way at once. The queue holds the
ids of workers still to replace:

  hup()        on_reload hook, sd_notify RELOADING=1, then the queue becomes
               every live worker (not leaving): a HUP during a rolling
               restart starts over from the current set instead of piling
               up a second restart. A replacement still starting is in the
               set too (it may run the code from before this HUP); its own
               replacement starts once it is ready.
  recycle(w)   max_requests / max_rss (recycle.py): queue one worker.

A replacement that exits before it is ready, or is not ready within
`ready_timeout` (then it is SIGKILLed), fails its step: the old worker
stays, the error is logged, and the rest of the queue is dropped (the next
replacement would most likely fail the same way). When the queue and the
steps are empty after a HUP, sd_notify READY=1.

If an old worker dies while its replacement starts, the replacement takes
its place (no respawn on top); if that replacement then fails, the old one
is respawned through the crash-loop pacer.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import hooks as _hooks
from . import systemd as _systemd
from .timers import Timer

if TYPE_CHECKING:
    from ..wire.handle import Worker
    from ..wire.settings import Settings
    from .backoff import Backoff
    from .proc import Proc
    from .respawn import Respawner
    from .timers import Timers

log = logging.getLogger("fastcluster")

COOLDOWN = 10.0  # seconds after a failed step before recycling tries again
SETTLE = 1.0  # seconds online that make ready a replacement of a worker that never listened


class Loop(Protocol):
    """What a rolling restart needs of the primary's loop (primary/loop.py)."""

    @property
    def _shutdown(self) -> str | None: ...
    @property
    def _stopping(self) -> bool: ...
    @property
    def _procs(self) -> dict[int, Proc]: ...
    @property
    def _timers(self) -> Timers: ...
    @property
    def _backoff(self) -> Backoff: ...
    @property
    def _respawner(self) -> Respawner: ...
    def config(self) -> Settings: ...
    def _spawn(self, extra: dict[str, str]) -> Worker: ...
    def _kill(self, proc: Proc, signum: int) -> None: ...
    def worker_disconnect(self, worker: Worker) -> None: ...


@dataclass
class _Step:
    old: int  # the worker id being replaced
    new: int  # its replacement's id
    need: set[str]  # addresses (JSON wire form) the replacement must listen on
    env: dict[str, str]
    timer: Timer | None = None
    old_died: bool = False
    started: float = field(default_factory=time.monotonic)


class Rolling:
    def __init__(self, primary: Loop) -> None:
        self.p = primary
        self._addrs: dict[int, set[str]] = {}  # worker id -> addresses it listens on
        self._queue: list[int] = []  # worker ids to replace, in order
        self._reasons: dict[int, str] = {}
        self._steps: dict[int, _Step] = {}  # by replacement id
        self.reloading = False  # a HUP's restart is under way
        self.failed_at = float("-inf")

    # -- queries -------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._queue or self._steps)

    def busy(self, wid: int) -> bool:
        """True if worker wid is queued, being replaced or is a replacement."""
        return wid in self._reasons or wid in self._steps or \
            any(s.old == wid for s in self._steps.values())

    def cooling_down(self) -> bool:
        return time.monotonic() - self.failed_at < COOLDOWN

    # -- starting ------------------------------------------------------------

    def hup(self, signame: str = "SIGHUP") -> None:
        p = self.p
        if p._shutdown is not None or p._stopping:
            return
        _hooks.call(p.config(), "on_reload")
        _systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        replacing = {step.old for step in self._steps.values()}  # going anyway
        ids = sorted(wid for wid, proc in p._procs.items()
                     if not proc.dead and not proc.worker.exited_after_disconnect
                     and wid not in replacing)
        log.info("fastcluster: %s: rolling restart of %d worker(s), %d at a time",
                 signame, len(ids), p.config().rolling_batch)
        self._queue = ids
        self._reasons = dict.fromkeys(ids, signame)
        self.reloading = True
        self.pump()

    def recycle(self, proc: Proc, reason: str) -> None:
        wid = proc.worker.id
        if self.busy(wid) or self.p._shutdown is not None or self.p._stopping:
            return
        log.info("fastcluster: worker %d (pid %d) reached %s; replacing it gracefully",
                 wid, proc.worker.pid, reason)
        self._queue.append(wid)
        self._reasons[wid] = reason
        self.pump()

    def pump(self) -> None:
        p = self.p
        batch = p.config().rolling_batch
        later: list[int] = []  # replacements still starting: their turn comes once ready
        while len(self._steps) < batch and self._queue and p._shutdown is None:
            wid = self._queue.pop(0)
            if wid in self._steps:
                later.append(wid)
                continue
            reason = self._reasons.pop(wid, "")
            old = p._procs.get(wid)
            if old is None or old.dead or old.worker.exited_after_disconnect:
                continue
            try:
                new = p._spawn(old.env)
            except Exception:
                log.exception("fastcluster: could not fork a replacement for worker %d "
                              "(%s); it stays", wid, reason)
                self._fail()
                return
            step = _Step(wid, new.id, set(self._addrs.get(wid, ())), old.env)
            step.timer = p._timers.call_later(p.config().ready_timeout,
                                              functools.partial(self._timed_out, new.id))
            self._steps[new.id] = step
        self._queue[:0] = later
        if self.reloading and not self.active:
            self.reloading = False
            log.info("fastcluster: rolling restart done")
            _systemd.notify("READY=1")

    # -- events from the primary ---------------------------------------------

    def on_online(self, proc: Proc) -> None:
        step = self._steps.get(proc.worker.id)
        if step is not None and not step.need:  # the old one has not listened (yet?)
            self.p._timers.call_later(SETTLE, functools.partial(self._check, proc))

    def on_listening(self, proc: Proc, wire: Any) -> None:
        key = _key(wire)
        self._addrs.setdefault(proc.worker.id, set()).add(key)
        for step in self._steps.values():
            if step.old == proc.worker.id:
                step.need.add(key)  # an old worker that listens late raises the bar
        self._check(proc)

    def on_exit(self, proc: Proc) -> bool:
        """A worker was reaped. True: taken care of here, do not respawn it."""
        wid = proc.worker.id
        self._addrs.pop(wid, None)
        if wid in self._reasons:
            self._reasons.pop(wid, None)
            self._queue = [i for i in self._queue if i != wid]
        handled = False
        for other in self._steps.values():
            if other.old == wid and not proc.worker.exited_after_disconnect:
                other.old_died = True  # its replacement, starting now, takes its place
                handled = True
        step = self._steps.pop(wid, None)
        if step is not None:
            handled = True
            if step.timer is not None:
                step.timer.cancel()
            if not proc.worker.exited_after_disconnect:
                log.error("fastcluster: replacement worker %d (pid %d) for worker %d exited "
                          "before it was ready (listening on %s); keeping worker %d; "
                          "rolling restart stopped", wid, proc.worker.pid, step.old,
                          _show(step.need), step.old)
            self._fail(step)
        return handled

    # -- internals -----------------------------------------------------------

    def _check(self, proc: Proc) -> None:
        step = self._steps.get(proc.worker.id)
        if step is None or proc.dead or proc.worker.state == "none":
            return
        have = self._addrs.get(proc.worker.id, set())
        if not step.need <= have:
            return
        if not step.need and not have and time.monotonic() - step.started < SETTLE:
            return  # neither listens: online and SETTLE seconds old is ready
        del self._steps[proc.worker.id]
        if step.timer is not None:
            step.timer.cancel()
        old = self.p._procs.get(step.old)
        log.info("fastcluster: worker %d (pid %d) ready in %.0f ms; retiring worker %d",
                 proc.worker.id, proc.worker.pid, (time.monotonic() - step.started) * 1000,
                 step.old)
        if old is not None and not old.dead:
            self.p.worker_disconnect(old.worker)
        self.pump()

    def _timed_out(self, nid: int) -> None:
        step = self._steps.pop(nid, None)
        proc = self.p._procs.get(nid)
        if step is None:
            return
        log.error("fastcluster: replacement worker %d (pid %s) for worker %d was not ready "
                  "(listening on %s) within ready_timeout=%s s; killing it, keeping worker "
                  "%d; rolling restart stopped", nid, proc.worker.pid if proc else "?",
                  step.old, _show(step.need), self.p.config().ready_timeout, step.old)
        if proc is not None and not proc.dead:
            proc.worker.exited_after_disconnect = True  # asked for: no respawn
            self.p._kill(proc, signal.SIGKILL)
        self._fail(step)

    def _fail(self, step: _Step | None = None) -> None:
        self.failed_at = time.monotonic()
        self._queue.clear()
        self._reasons.clear()
        if step is not None and step.old_died and not self.p._stopping:
            self.p._respawner.later(self.p._backoff.on_exit(0.0, asked=False), step.env)
        if self.reloading and not self._steps:
            self.reloading = False
            _systemd.notify("READY=1")  # still serving, with the old workers

    def stop(self) -> None:
        """The cluster shuts down: drop the queue (workers are disconnected)."""
        for step in self._steps.values():
            if step.timer is not None:
                step.timer.cancel()
        self._steps.clear()
        self._queue.clear()
        self._reasons.clear()
        self.reloading = False


def _key(wire: Any) -> str:
    return json.dumps(wire, sort_keys=True)


def _show(need: set[str]) -> str:
    return ", ".join(sorted(need)) or "(online: it never listened)"
