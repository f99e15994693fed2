"""This process's worker runtime: None in the primary, set by become() when a
worker starts (worker_side/boot.py), before the worker's main runs.

become() also runs the hooks registered with on_become(): fastcluster/_role.py
registers the one that switches the public facade (cluster.is_worker,
cluster.worker, cluster.workers, cluster.settings) to the worker's role.
Nothing here imports the runtime's module at run time; runtime.py never
imports this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runtime import WorkerRuntime

runtime: WorkerRuntime | None = None
_hooks: list[Callable[[WorkerRuntime, dict[str, Any]], None]] = []


def on_become(hook: Callable[[WorkerRuntime, dict[str, Any]], None]) -> None:
    _hooks.append(hook)


def become(rt: WorkerRuntime, worker_settings: dict[str, Any]) -> None:
    global runtime
    runtime = rt
    for hook in _hooks:
        hook(rt, worker_settings)


def request_counter() -> Callable[[int], None]:
    """In a worker: adds to its `requests` counter in shared memory (else a no-op)."""
    channel = None if runtime is None else runtime.intake.channel
    if channel is None:
        return lambda n: None
    return channel.request_done  # valid after the channel's fd is closed too
