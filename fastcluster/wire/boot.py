"""What the primary's fork path and the worker's start share: what a worker
runs as its main (MainSpec), the signature of the hand-over at the fork
(StartChild), the environment variables a spawned worker boots from.

The fork seam: the primary (primary/loop.py) forks, and its child calls the
StartChild it was given; fastcluster/_role.py gives it worker_side/boot.py's
start_child. That is the one place the primary's code hands over to the
worker's, and no module of primary/ imports worker_side/ for it.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import CodeType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .._core import CounterTable, SteerPage
    from .settings import Settings

WORKER_ENV = "FASTCLUSTER_WORKER"
BOOT_ENV = "FASTCLUSTER_BOOT"


@dataclass
class MainSpec:
    """What a worker runs as its main."""

    kind: str  # "target", "ref" (spawn: an importable target), "exec", "path", "module"
    argv: list[str] = field(default_factory=list)  # the worker's sys.argv
    target: Callable[[], object] | None = None
    ref: str = ""  # "module:qualname"
    path: str = ""  # script (exec, path; for a ref in __main__: the main script)
    module: str = ""  # module (module; for a ref in __main__ run with -m)
    code: CodeType | None = None  # fork: the script compiled in the primary (exec, path)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "argv": self.argv, "ref": self.ref, "path": self.path,
                "module": self.module}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MainSpec:
        return cls(kind=d["kind"], argv=list(d["argv"]), ref=d["ref"], path=d["path"],
                   module=d["module"])


class StartChild(Protocol):
    """The forked child's hand-over to the worker's start (worker_side/boot.py's
    start_child): returns the worker's exit status (spawn: never returns)."""

    def __call__(self, *, spawn: bool, worker_id: int, slot: int, ctl: socket.socket,
                 data: socket.socket, table: CounterTable, table_fd: int, spec: MainSpec,
                 cfg: Settings, env: dict[str, str], settings: dict[str, Any],
                 steer_page: SteerPage | None = None) -> int: ...


def flush_stdio() -> None:
    """Flushes stdout and stderr, whatever state they are in."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass
