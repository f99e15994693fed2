"""Hang detection (what both halves share): a worker whose serving loop
stops beating for `timeout` seconds is killed (SIGABRT, then SIGKILL) and, with `respawn`, replaced.

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

The beating half is fastcluster/worker_side/heart.py, the checking half
fastcluster/primary/watchdog.py.

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

MIN_INTERVAL = 0.05  # seconds: the fastest beat / check
MAX_INTERVAL = 1.0  # seconds: the slowest beat / check


def interval_for(timeout: float) -> float:
    """How often a worker beats, and the primary checks, for a timeout."""
    return min(MAX_INTERVAL, max(MIN_INTERVAL, timeout / 8.0))
