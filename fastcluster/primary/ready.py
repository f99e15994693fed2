"""Readiness: the when_ready hook and systemd's READY=1, once every worker listens.

Theory of operation: after each "listening" event the primary asks
on_listening(); the first time every live worker (not leaving) has listened
at least once, when_ready() runs and sd_notify("READY=1") is sent (a no-op
without NOTIFY_SOCKET). A rolling restart sends RELOADING=1 and READY=1
itself (rolling.py); shutdown sends STOPPING=1 (stopping()).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from . import hooks as _hooks
from . import systemd as _systemd

if TYPE_CHECKING:
    from ..wire.settings import Settings
    from .proc import Proc


class Loop(Protocol):
    """What readiness needs of the primary's loop (primary/loop.py)."""

    @property
    def _shutdown(self) -> str | None: ...
    @property
    def _procs(self) -> dict[int, Proc]: ...
    @property
    def pid(self) -> int: ...
    def config(self) -> Settings: ...


class Ready:
    def __init__(self, primary: Loop) -> None:
        self.p = primary
        self.ready = False
        self._stopping = False

    def on_listening(self) -> None:
        p = self.p
        if self.ready or p._shutdown is not None:
            return
        live = [proc for proc in p._procs.values()
                if not proc.dead and not proc.worker.exited_after_disconnect]
        if live and all(proc.worker.state == "listening" for proc in live):
            self.ready = True
            _hooks.call(p.config(), "when_ready")
            _systemd.notify(f"READY=1\nMAINPID={p.pid}")

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            _systemd.notify("STOPPING=1")
