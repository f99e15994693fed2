"""The Worker object: the primary's handle on a worker process, and in a
worker, `cluster.worker` (the process's own view).

Theory of operation: one public class for both roles, as in Node. The
attributes are plain data; the actions (send, kill, disconnect, the
is_* queries) go to a backend: the Primary for handles in the primary, the
WorkerRuntime for `cluster.worker`. States: "none" (forked), "online",
"listening", "disconnected", "dead".
"""

from __future__ import annotations

import signal as _signal
from typing import Any, Protocol

from .events import EventEmitter


class Backend(Protocol):
    def worker_send(self, worker: Worker, message: Any) -> bool: ...
    def worker_kill(self, worker: Worker, signum: int) -> None: ...
    def worker_disconnect(self, worker: Worker) -> None: ...
    def worker_is_connected(self, worker: Worker) -> bool: ...
    def worker_is_dead(self, worker: Worker) -> bool: ...


_ALLOWED = f"a name such as 'SIGTERM' or 'TERM', or a number from 1 to {_signal.NSIG - 1}"


def signal_number(sig: int | str) -> int:
    """A signal given as a number, a Signals member, or a name ("SIGKILL", "KILL")."""
    if isinstance(sig, str):
        name = sig.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(_signal.Signals[name])
        except KeyError:
            raise ValueError(f"signal: unknown signal name {sig!r}; allowed: {_ALLOWED}"
                             ) from None
    if isinstance(sig, bool) or not isinstance(sig, int):
        raise TypeError(f"signal must be an int or a name, got {sig!r}; allowed: {_ALLOWED}")
    if not 0 < int(sig) < _signal.NSIG:
        raise ValueError(f"signal: {sig!r} is not a signal number; allowed: {_ALLOWED}")
    return int(sig)


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


class Worker(EventEmitter):
    """A worker process. Events: "online", "listening"(address),
    "message"(msg), "disconnect", "exit"(code, signal), "error"(exc)."""

    def __init__(self, worker_id: int, backend: Backend, pid: int = 0) -> None:
        super().__init__()
        self.id = worker_id
        self.pid = pid
        self.state = "none"
        self.exited_after_disconnect = False
        self._backend = backend

    def send(self, message: Any) -> bool:
        """Sends a JSON-serialisable message to the other side. TypeError if
        it cannot be encoded; False if the channel is closed."""
        return self._backend.worker_send(self, message)

    def kill(self, signal: int | str = _signal.SIGTERM) -> None:
        """In the primary: marks the exit as asked for and sends the signal
        (a worker treats SIGTERM as a graceful disconnect). In a worker: tells
        the primary, then exits at once with status 0."""
        self._backend.worker_kill(self, signal_number(signal))

    destroy = kill

    def disconnect(self) -> Worker:
        """Graceful: the worker stops taking connections, finishes the open
        ones (up to graceful_timeout), closes its channel and exits."""
        self._backend.worker_disconnect(self)
        return self

    def is_connected(self) -> bool:
        return self._backend.worker_is_connected(self)

    def is_dead(self) -> bool:
        return self._backend.worker_is_dead(self)

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state}>"
