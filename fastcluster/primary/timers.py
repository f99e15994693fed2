"""A small timer heap for the primary's loop (no threads, no asyncio).

Theory of operation: call_later() pushes (deadline, seq, timer); the loop asks
next_delay() for its epoll timeout and calls run_due() after each wake-up.
Cancelled timers stay in the heap until they reach the top (lazy delete).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable

log = logging.getLogger("fastcluster")


class Timer:
    __slots__ = ("cancelled", "deadline", "fn")

    def __init__(self, deadline: float, fn: Callable[[], object]) -> None:
        self.deadline = deadline
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()

    def call_later(self, delay: float, fn: Callable[[], object]) -> Timer:
        t = Timer(time.monotonic() + max(0.0, delay), fn)
        heapq.heappush(self._heap, (t.deadline, next(self._seq), t))
        return t

    def next_delay(self) -> float | None:
        """Seconds until the next live timer (0 if due), None if none."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - time.monotonic())

    def run_due(self) -> None:
        now = time.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, _, t = heapq.heappop(self._heap)
            if t.cancelled:
                continue
            t.cancelled = True
            try:
                t.fn()
            except Exception:
                log.exception("fastcluster: a timer callback raised")

    def __len__(self) -> int:
        return sum(1 for _, _, t in self._heap if not t.cancelled)
