"""Which role this process plays, and the state the public facade shows.

Theory of operation: a process starts as the primary. The cluster-wide
EventEmitter, the `workers` dict and the `settings` dict live here and are
the very objects the facade exports, so they stay current as the primary
mutates them. When a worker starts (fork child or spawned interpreter),
become_worker() records its runtime and rebinds the facade's module
globals (is_primary, is_worker, worker, workers, settings) for the worker's
code, which runs after that.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .wire.events import EventEmitter

if TYPE_CHECKING:
    from .primary.loop import Primary
    from .wire.handle import Worker
    from .worker.runtime import WorkerRuntime

events = EventEmitter()  # cluster.on/once/off
workers: dict[int, Worker] = {}  # the primary's live workers (cluster.workers)
settings: dict[str, Any] = {}  # cluster.settings
runtime: WorkerRuntime | None = None  # set in a worker
_primary: Primary | None = None


def is_worker() -> bool:
    return runtime is not None


def primary() -> Primary:
    global _primary
    if _primary is None:
        from .primary.loop import Primary

        _primary = Primary(events, workers, settings)
    return _primary


def become_worker(rt: WorkerRuntime, worker_settings: dict[str, Any]) -> None:
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
