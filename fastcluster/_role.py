"""Which role this process plays, the state the public facade shows, and the
fork seam: the one module that joins primary/ and worker_side/.

Theory of operation: a process starts as the primary. The cluster-wide
EventEmitter, the `workers` dict and the `settings` dict live here and are
the very objects the facade exports, so they stay current as the primary
mutates them. The primary's loop is made here, given worker_side/boot.py's
start_child: its forked child calls that to become the worker (the fork
seam; primary/ itself never imports worker_side/). When a worker starts (fork
child or spawned interpreter), worker_side/current.py's become() records its
runtime and calls _become_worker() (registered below), which rebinds the
facade's module globals (is_primary, is_worker, worker, workers, settings)
for the worker's code, which runs after that.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .wire.events import EventEmitter
from .worker_side import current

if TYPE_CHECKING:
    from .primary.loop import Primary
    from .wire.handle import Worker
    from .worker_side.runtime import WorkerRuntime

events = EventEmitter()  # cluster.on/once/off
workers: dict[int, Worker] = {}  # the primary's live workers (cluster.workers)
settings: dict[str, Any] = {}  # cluster.settings
runtime: WorkerRuntime | None = None  # set in a worker (a mirror of current.runtime)
_primary: Primary | None = None


def is_worker() -> bool:
    return runtime is not None


def primary() -> Primary:
    global _primary
    if _primary is None:
        from .primary.loop import Primary  # imported when first needed, as before
        from .worker_side import boot

        # THE FORK SEAM: the primary's forked child hands over to the worker's
        # start through this callable (wire/boot.py's StartChild)
        _primary = Primary(events, workers, settings, start_child=boot.start_child)
    return _primary


def _become_worker(rt: WorkerRuntime, worker_settings: dict[str, Any]) -> None:
    global runtime, _primary, workers, settings
    runtime = rt
    _primary = None
    events.remove_all_listeners()
    workers = {}
    settings = dict(worker_settings)
    pkg = sys.modules.get("fastcluster")
    if pkg is not None:
        pkg.is_primary = False  # type: ignore[attr-defined]
        pkg.is_worker = True  # type: ignore[attr-defined]
        pkg.worker = rt.worker  # type: ignore[attr-defined]
        pkg.workers = workers  # type: ignore[attr-defined]
        pkg.settings = settings  # type: ignore[attr-defined]


current.on_become(_become_worker)
