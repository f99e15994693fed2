"""Out of fds, a listening socket on the primary's loop leaves the epoll set
for a while: the loop is level-triggered and the listener stays readable,
so retrying at once would spin. The health endpoint, the status socket and
the metrics server share this (the C dispatcher has its own, csrc/dispatch.c).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .timers import Timer, Timers

log = logging.getLogger("fastcluster")

PAUSE = 1.0  # seconds a server stops accepting when out of fds
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Loop(Protocol):
    """What pausing needs of the primary's loop (primary/loop.py)."""

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    @property
    def _timers(self) -> Timers: ...


class AcceptPause:
    """pause(err) takes fd out of the loop for PAUSE seconds, then gives
    on_ready back its reader, unless cancel() came first (the server closed)."""

    def __init__(self, loop: Loop, fd: int, on_ready: Callable[[], object], what: str) -> None:
        self._loop = loop
        self._fd = fd
        self._on_ready = on_ready
        self._what = what
        self._timer: Timer | None = None

    def pause(self, err: OSError) -> None:
        if self._timer is not None:
            return
        log.warning("fastcluster: %s cannot accept (%s); pausing %.1f s", self._what,
                    err.strerror, PAUSE)
        self._loop.remove_reader(self._fd)
        self._timer = self._loop._timers.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        self._timer = None
        self._loop.add_reader(self._fd, self._on_ready)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
