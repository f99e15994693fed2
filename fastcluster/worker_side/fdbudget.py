"""A worker's fd budget: can it receive the next batch of connections?

Theory of operation: a batch of fds (SCM_RIGHTS) that does not fit under the
receiver's RLIMIT_NOFILE is cut short by the kernel (EMSGSIZE) and the fds
that did not fit are lost; the primary closed its copies when it sent them.
So the worker must never receive a batch it cannot hold. It tells the
primary a window (at most that many fds in flight to it: the largest batch
it can get) that fits in its free fds at start, and before each receive
checks that a whole window still fits. Counting open fds exactly
(/proc/self/fd) costs a directory read; it is done only when a cheap
estimate (fds open at the last count + connections received and not yet
closed since) says the limit is near. When a window no longer fits, the
worker is at its limit: it hands back what its channel holds and leaves
(intake.py, runtime.py).
"""

from __future__ import annotations

import os
import resource

RESERVE = 16  # fds left to the worker's own code (files, a database) when sizing the window
SLACK = 32  # the estimate's margin: closer to the limit than this, count exactly


def open_fds(limit: int) -> int:
    """Fds open in this process now (exact). At the limit the listing itself
    cannot open its directory: then every fd is taken (limit)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
    except OSError:
        return limit


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

    def window(self, cap: int) -> int:
        """The largest window that fits in the fds free now, leaving RESERVE."""
        return max(1, min(cap, self.limit - self.base - self.held - RESERVE))

    def room_for(self, n: int) -> bool:
        """True if n more fds fit under the limit (exact when close to it)."""
        self.limit = soft_limit()  # one getrlimit: setrlimit() may come at any time
        if self.limit - (self.base + self.held) >= n + SLACK:
            return True
        used = open_fds(self.limit)
        self.base = used - self.held
        return self.limit - used >= n

    def free(self) -> int:
        return self.limit - self.base - self.held
