"""Messages from the primary to the worker's main, in Node's order (a mixin
of worker_side/runtime.py's WorkerRuntime).

In Node a worker's main registers its "message" handlers before any message
can be delivered (one thread). Here the channel thread may be faster, so a
message that comes while the main runs and no handler is registered yet
waits for the first one, in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..wire.handle import Worker


class Inbox:
    # the runtime's state this part uses (set in WorkerRuntime.__init__)
    _early: list[Any]
    _main_returned: bool
    worker: Worker

    if TYPE_CHECKING:
        def post(self, word: str) -> None: ...

    def _emit_message(self, data: Any) -> None:
        """In Node, a worker's main registers its handlers before any message
        can be delivered (one thread). Here the channel thread may be faster:
        a message that comes while the main runs and no handler is registered
        yet waits for the first one (in order)."""
        if self._early or (self.worker.listener_count("message") == 0
                           and not self._main_returned):
            self._early.append(data)
            if self.worker.listener_count("message"):
                self._replay_early()
            return
        self.worker.emit("message", data)

    def _replay_early(self) -> None:
        while self._early and self.worker.listener_count("message"):
            self.worker.emit("message", self._early.pop(0))

    def release_early(self) -> None:
        if self._early:
            self.post("early")  # replayed where messages are delivered, in order
