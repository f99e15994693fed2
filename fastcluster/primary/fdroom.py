"""The primary's fds: its RLIMIT_NOFILE, and the bound on orphans that keeps
room for respawns and control (issue 17, L1).

Theory of operation. An orphan is an accepted connection whose worker died
before taking it (csrc/dispatch.c reads a dead worker's queue back); each
holds one fd of the primary until another worker takes it. With every
worker hung or dying, orphans could fill the primary's fd table, and then
no replacement can be forked (a socketpair needs fds): the cluster would
stay down with /healthz answering. So:

  - at start the primary raises its soft RLIMIT_NOFILE to the hard limit
    (as nginx's worker_rlimit_nofile or systemd do), and logs it;
  - the C dispatcher keeps at most `max_orphans` orphans, resetting the
    oldest (SO_LINGER 0: the client learns at once) to make room, and
    resets any older than the `orphan_timeout` setting;
  - max_orphans is derived here from the soft limit and the fds in use
    (/proc/self/fd, less the orphans themselves), less a reserve for
    respawns and control (RESERVE, plus PER_WORKER for each worker the
    cluster has had alive at once), recomputed on a timer (INTERVAL) of
    the loop, never per connection. Between two updates the bound is in
    orphans, so it holds whatever the C loop does; the reserve covers the
    fds new workers take meanwhile.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._core import Dispatcher
    from ..wire.settings import Settings
    from .timers import Timer, Timers

log = logging.getLogger("fastcluster")

RESERVE = 64  # fds always kept for control: status and health clients, listen replies
PER_WORKER = 8  # fds a respawn needs (memfd, two socketpairs, the hold), with margin
INTERVAL = 1.0  # seconds between two updates of the bound while the loop runs
NR_OPEN = "/proc/sys/fs/nr_open"  # the most a soft limit can be raised to


def raise_nofile() -> tuple[int, int]:
    """Raises the soft RLIMIT_NOFILE to the hard limit (capped at the
    kernel's nr_open when the hard limit is infinite). Returns (before,
    after); logs when it changed, warns when it could not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(NR_OPEN) as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        log.warning("fastcluster: could not raise the soft RLIMIT_NOFILE from %d to %d (%s)",
                    soft, target, e)
        return soft, soft
    log.info("fastcluster: raised the soft RLIMIT_NOFILE from %d to %d (the hard limit), "
             "for the connections the primary holds", soft, target)
    return soft, target


def fds_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return 0


class Loop(Protocol):
    """What FdRoom needs of the primary's loop (primary/loop.py)."""

    @property
    def dispatcher(self) -> Dispatcher | None: ...
    @property
    def workers(self) -> dict[int, Any]: ...
    @property
    def _running(self) -> bool: ...
    @property
    def _timers(self) -> Timers: ...
    def config(self) -> Settings: ...


class FdRoom:
    """Keeps the dispatcher's orphan bound in step with the fds left."""

    def __init__(self, primary: Loop) -> None:
        self._p = primary
        self._timer: Timer | None = None
        self.peak_workers = 0  # the most workers alive at once
        self.max_orphans = -1  # the bound last given to the dispatcher

    def start(self) -> None:
        """Before the core exists (the first fork): raise the limit."""
        raise_nofile()

    def arm(self) -> None:
        """run(): update now and every INTERVAL while the loop runs."""
        self.update()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def update(self) -> None:
        p = self._p
        if p.dispatcher is None:
            return
        self.peak_workers = max(self.peak_workers, len(p.workers))
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        cfg = p.config()
        timeout_ms = 0 if not cfg.orphan_timeout else max(1, round(cfg.orphan_timeout * 1000))
        if soft == resource.RLIM_INFINITY:
            bound = -1
        else:
            orphans = int(p.dispatcher.stats()["orphaned"])
            others = fds_in_use() - orphans
            reserve = RESERVE + PER_WORKER * max(1, self.peak_workers)
            bound = max(0, min(soft - others - reserve, 1 << 30))
        shed = p.dispatcher.set_orphan_limits(bound, timeout_ms)
        if shed:
            log.warning("fastcluster: %d queued connection(s) of dead workers reset: the "
                        "primary keeps at most %d, to keep fds for respawns (RLIMIT_NOFILE "
                        "%d)", shed, bound, soft)
        self.max_orphans = bound
        if p._running:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = p._timers.call_later(INTERVAL, self.update)
