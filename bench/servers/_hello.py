"""The worker code every benchmark server here runs: one raw asyncio protocol.

`Hello` is the responder of ../shared/anchors/reuseport_asyncio.py, byte for
byte: the same response, the same pipelining rule (one response per
"\\r\\n\\r\\n" in the chunk), the same close rule, uvloop when it is installed.
What it adds is counting, so the harness can see each worker's share:

- `connection_made` and `data_received` bump two Python ints;
- a 10 ms timer copies them into a small file under $BENCH_COUNT_DIR, named
  after the worker's pid (no syscall per request, no response header);
- the monotonic time of the worker's first connection is written at once, so
  the harness can tell when a replacement worker started accepting.

Slow worker: when $BENCH_SLOW_INDEX names this worker's index, it blocks its
event loop for $BENCH_SLOW_MS (50) ms on $BENCH_SLOW_PERCENT (5) % of its
requests, as a CPU-bound handler would.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import random
import struct
import time
from collections.abc import Callable

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nHello from Cluster!\n"

# connections, requests, first-connection CLOCK_MONOTONIC (0.0: none yet),
# pid, worker index, 1 if uvloop
RECORD = struct.Struct("<QQdqqq")


class Stats:
    """This worker's counts, mirrored into $BENCH_COUNT_DIR/w-<pid>."""

    def __init__(self, index: int, uvloop: bool) -> None:
        self.connections = 0
        self.requests = 0
        self.index = index
        self.uvloop = uvloop
        self.first = 0.0
        self.mm: mmap.mmap | None = None
        d = os.environ.get("BENCH_COUNT_DIR")
        if d:
            path = os.path.join(d, f"w-{os.getpid()}")
            fd = os.open(path + ".tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, RECORD.size)
                self.mm = mmap.mmap(fd, RECORD.size)
            finally:
                os.close(fd)
            self.flush()
            os.rename(path + ".tmp", path)  # appears complete

    def first_connection(self) -> None:
        self.first = time.monotonic()
        self.flush()

    def flush(self) -> None:
        if self.mm is not None:
            RECORD.pack_into(self.mm, 0, self.connections, self.requests, self.first,
                             os.getpid(), self.index, int(self.uvloop))

    def start_flushing(self, loop: asyncio.AbstractEventLoop, every: float = 0.01) -> None:
        def tick() -> None:
            self.flush()
            loop.call_later(every, tick)

        if self.mm is not None:
            loop.call_later(every, tick)


def new_loop() -> tuple[asyncio.AbstractEventLoop, bool]:
    """A fresh event loop, uvloop's when it is installed (as the anchor does)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop(), False
    return uvloop.new_event_loop(), True


def protocol_factory(
    stats: Stats, on_lost: Callable[[], None] | None = None
) -> Callable[[], asyncio.Protocol]:
    """The responder class for this worker: plain, or slow when it is the slow one,
    with `on_lost` called per closed connection when given (the core's `least`)."""
    slow_index = os.environ.get("BENCH_SLOW_INDEX")
    slow = slow_index not in (None, "") and int(slow_index) == stats.index
    slow_p = float(os.environ.get("BENCH_SLOW_PERCENT", "5")) / 100.0
    slow_s = float(os.environ.get("BENCH_SLOW_MS", "50")) / 1000.0
    rng = random.Random(12345 + stats.index)

    class Hello(asyncio.Protocol):
        t: asyncio.Transport

        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t = t  # type: ignore[assignment]
            stats.connections += 1
            if not stats.first:
                stats.first_connection()

        def data_received(self, d: bytes) -> None:
            n = d.count(b"\r\n\r\n")
            stats.requests += n
            self.t.write(RESPONSE * n)
            if b"onnection: close" in d:
                self.t.close()

    class SlowHello(Hello):
        def data_received(self, d: bytes) -> None:
            n = d.count(b"\r\n\r\n")
            for _ in range(n):
                if rng.random() < slow_p:
                    time.sleep(slow_s)  # blocks the whole loop, like real CPU work
            super().data_received(d)

    cls: type[Hello] = SlowHello if slow else Hello
    if on_lost is None:
        return cls
    lost = on_lost

    class Counted(cls):  # type: ignore[valid-type,misc]
        def connection_lost(self, exc: Exception | None) -> None:
            lost()

    return Counted
