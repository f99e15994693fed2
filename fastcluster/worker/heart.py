"""Hang detection: a worker whose serving loop stops beating for `timeout`
seconds is killed (SIGABRT, then SIGKILL) and, with `respawn`, replaced.

Theory of operation. The proof of life is a stamp (time.monotonic_ns(),
CLOCK_MONOTONIC, the same clock in every process) in the worker's 64-byte
shared-memory slot (csrc/counters.h, `beat`). It is written only by a thread
that serves connections, at a moment when that thread is free to serve, so
a loop blocked by a handler (time.sleep, a CPU-bound request, a deadlock)
stops the stamp even while other threads of the worker run happily. The
worker's control-channel thread never beats, and neither does anything that
answers a message: a reply from a side thread proves nothing about the loop
(uvicorn's supervisor pings the worker's pipe, which a thread answers while
the event loop is stuck). Who beats:

  asyncio   fastcluster.aio servers: a loop.call_later() tick on the loop
            that serves the connections, from the first server opened on
            that loop until the last one closes.
  sync      a socketserver/http.server given to cluster.listen_server():
            its service_actions(), which serve_forever() calls between
            select() calls (at least every poll_interval, 0.5 s by default)
            and after each request it handles, while serve_forever() runs.
            A single-threaded server blocked in a handler stops beating; a
            ThreadingMixIn server keeps serving, and beating, beside a slow
            request thread. A poll_interval above timeout/2 is warned about:
            an idle server would beat too rarely.
  main      cluster.run() in a worker's main thread (nothing else to do but
            wait for the disconnect): its wait, sliced.

A worker may have several beaters (two loops, a server thread beside a main
thread in cluster.run()): each records its own last beat, and what goes to
shared memory is the oldest of them, so one stuck loop is seen even while
another beats. A beater that stops serving (server closed, serve_forever()
returned) is dropped; with none left the stamp goes back to 0.

The primary writes the timeout into the slot before the fork (so spawned
workers learn it too, without any boot plumbing); each worker beats every
interval_for(timeout) (timeout/8, from 50 ms to 1 s). The primary checks
the slots on a timer of its loop (same interval, never per connection): a
stamp older than `timeout` gets the worker SIGABRT (faulthandler, enabled
in every watched worker, prints every thread's Python stack to the worker's
stderr, so the log shows where it hung), then SIGKILL ABORT_GRACE seconds
later if it is still alive. The exit is then an ordinary unasked exit: the
"exit" event (signal "SIGABRT" or "SIGKILL") and, with `respawn`, a
replacement through the usual backoff. Worst-case detection: the last
stamp is no later than the hang's start, and the check that sees it older
than `timeout` comes at most one interval after that: timeout + 1 interval
from the hang's start (plus the primary's own timer lateness).

Boot allowance: the timeout runs from the worker's first beat, not from its
fork or "online": a slot whose stamp is 0 (booting: imports, warm-up;
or serving by means this module does not know: its own accept loop, a
third-party server on a shared socket) is not checked. The cost is that a
worker that hangs before it ever serves is not detected.

A worker that forks (ForkingMixIn, a subprocess via fork) does not beat from
the child: the child's heart is switched off at fork.

Stalled intake: the same check also reads the dispatcher's per-slot counts.
A worker that has had connections waiting for it (dispatched, not taken)
while its `taken` counter stood still for `timeout` seconds is treated as
hung even if its loop beats: its loop does not take them (its data channel
fd was closed by a bug, say; the primary holds that channel's other end,
so no hang-up tells it). Killing it hands those connections to the others
(the primary reads the dead worker's queue back).
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _role

if TYPE_CHECKING:
    from .._core import WorkerChannel
    from ..primary.loop import Primary, _Proc
    from ..primary.timers import Timer

log = logging.getLogger("fastcluster")

MIN_INTERVAL = 0.05  # seconds: the fastest beat / check
MAX_INTERVAL = 1.0  # seconds: the slowest beat / check
ABORT_GRACE = 2.0  # seconds from SIGABRT (stack dump, maybe a core) to SIGKILL


def interval_for(timeout: float) -> float:
    """How often a worker beats, and the primary checks, for a timeout."""
    return min(MAX_INTERVAL, max(MIN_INTERVAL, timeout / 8.0))


# -- worker side ----------------------------------------------------------------


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


def heart() -> Heart | None:
    """This worker's heart; None in the primary (and in a worker's child)."""
    global _heart
    rt = _role.runtime
    if rt is None or rt.worker.pid != os.getpid():
        return None
    if _heart is None:
        channel = rt.intake.channel
        if channel is None:
            return None
        _heart = Heart(channel, os.getpid())
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


# -- primary side ---------------------------------------------------------------


class Watchdog:
    """The primary's half: arms each slot before the fork, checks on a timer."""

    def __init__(self, primary: Primary) -> None:
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

    def _abort(self, proc: _Proc, age: float, timeout: float,
               what: str = "its serving loop has not beaten") -> None:
        p = self._primary
        w = proc.worker
        self._aborted.add(w.id)
        self._progress.pop(proc.slot, None)
        log.error("fastcluster: worker %d (pid %d) is hung: %s for %.2f s (timeout %g s); "
                  "SIGABRT (stack on its stderr), SIGKILL in %g s", w.id, w.pid, what, age,
                  timeout, ABORT_GRACE)
        p._kill(proc, signal.SIGABRT)

        def still_alive() -> None:
            if not proc.dead:
                log.error("fastcluster: hung worker %d (pid %d) survived SIGABRT; SIGKILL",
                          w.id, w.pid)
                p._kill(proc, signal.SIGKILL)

        p._timers.call_later(ABORT_GRACE, still_alive)
