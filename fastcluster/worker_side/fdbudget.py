"""A worker's fd budget: can it receive what its data channel holds?

Theory of operation: a batch of fds (SCM_RIGHTS) that does not fit under the
receiver's RLIMIT_NOFILE is cut short by the kernel (EMSGSIZE) and the fds
that did not fit are lost; the primary closed its copies when it sent them.
So the worker never receives a batch it cannot hold. It keeps its window
(the most fds the primary has in flight to it, so the largest batch) within
its free fds: sized when it starts and at each listen (its main may lower the
limit), and lowered (halved) as connections use fds up. Before each receive
the intake checks that the channel's content fits: while a whole window and
SLACK fit by a cheap estimate (fds open at the last count + connections
received and not yet closed since) nothing more is done; closer to the limit
it counts exactly (/proc/self/fd) and asks the channel how many fds wait in
it (FIONREAD: the queued bytes, 4 per fd for the fd's tag). When they do not
fit, or no fd is free, the worker is at its limit: it hands back what its
channel holds and leaves (intake.py, runtime.py).
"""

from __future__ import annotations

import fcntl
import os
import resource
import struct
import termios

RESERVE = 16  # fds left to the worker's own code (files, a database) when sizing the window
SLACK = 32  # the estimate's margin: closer to the limit than this, count exactly
TAG_BYTES = 4  # bytes of payload per fd in a batch (its listener id: csrc/fdpass.h)


def open_fds(limit: int) -> int:
    """Fds open in this process now (exact). At the limit the listing itself
    cannot open its directory: then every fd is taken (limit)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
    except OSError:
        return limit


def queued_fds(fd: int) -> int:
    """Fds waiting in a data channel (every message: SIOCINQ sums them on a
    SOCK_SEQPACKET socket); on error, more than any window."""
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 1 << 30
    return int(struct.unpack("i", raw)[0]) // TAG_BYTES


def soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


class FdBudget:
    def __init__(self) -> None:
        self.limit = soft_limit()
        self.base = open_fds(self.limit)  # fds open at the last count, less `held` then
        self.held = 0  # connections received and not reported closed

    def count(self) -> None:
        """Counts exactly (the worker's code may have changed the limit)."""
        self.limit = soft_limit()
        self.base = open_fds(self.limit) - self.held

    def free(self) -> int:
        return self.limit - self.base - self.held

    def window(self, cap: int) -> int:
        """The largest window that fits in the fds free now, leaving RESERVE."""
        return max(1, min(cap, self.free() - RESERVE))

    def room(self, window: int, channel_fd: int) -> bool:
        """True if what the channel holds fits under the limit (exact near it)."""
        self.limit = soft_limit()  # one getrlimit: setrlimit() may come at any time
        if self.free() >= window + SLACK:
            return True
        self.count()
        return self.free() >= max(1, queued_fds(channel_fd))

    def lower(self, window: int) -> int:
        """The window to ask for now: halved while it does not fit in the free
        fds less RESERVE (never raised)."""
        if window > 1 and self.free() - RESERVE < window:
            return max(1, min(window // 2, self.free() - RESERVE))
        return window
