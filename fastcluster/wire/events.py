"""A small EventEmitter after Node's: on/once/off/emit.

Theory of operation: listeners are kept per event name in registration
order; emit() calls a snapshot of them, so a listener may add or remove
listeners (itself included) while it runs. A listener that raises is logged
and the others still run: in the primary a user's handler must never take
the supervisor down. SystemExit and KeyboardInterrupt are not caught.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fastcluster")

Listener = Callable[..., Any]


class _Once:
    """Wraps a listener registered with once(): removed before it runs."""

    __slots__ = ("emitter", "event", "fn")

    def __init__(self, emitter: EventEmitter, event: str, fn: Listener) -> None:
        self.emitter = emitter
        self.event = event
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        self.emitter.off(self.event, self)
        return self.fn(*args)


class EventEmitter:
    """on/once/off/emit, as Node's EventEmitter (without its 'error' throw)."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}

    def on(self, event: str, fn: Listener) -> EventEmitter:
        """Calls fn(*args) on every emit(event, *args). Returns self."""
        if not isinstance(event, str):
            raise TypeError(f"event must be a str, not {type(event).__name__}")
        if not callable(fn):
            raise TypeError(f"listener for {event!r} must be callable, got {fn!r}")
        self._listeners.setdefault(event, []).append(fn)
        return self

    add_listener = on

    def once(self, event: str, fn: Listener) -> EventEmitter:
        """Like on(), but fn runs at most once."""
        if not callable(fn):
            raise TypeError(f"listener for {event!r} must be callable, got {fn!r}")
        return self.on(event, _Once(self, event, fn))

    def off(self, event: str, fn: Listener) -> EventEmitter:
        """Removes the last registration of fn (or of once(fn)) for event."""
        fns = self._listeners.get(event)
        if not fns:
            return self
        for i in range(len(fns) - 1, -1, -1):
            f = fns[i]
            if f is fn or (isinstance(f, _Once) and f.fn is fn):
                del fns[i]
                break
        if not fns:
            del self._listeners[event]
        return self

    remove_listener = off

    def remove_all_listeners(self, event: str | None = None) -> EventEmitter:
        if event is None:
            self._listeners.clear()
        else:
            self._listeners.pop(event, None)
        return self

    def listener_count(self, event: str) -> int:
        return len(self._listeners.get(event, ()))

    def emit(self, event: str, *args: Any) -> bool:
        """Calls the listeners of event; True if there were any."""
        fns = self._listeners.get(event)
        if not fns:
            return False
        for fn in list(fns):
            try:
                fn(*args)
            except Exception:
                log.exception("fastcluster: a %r listener raised", event)
        return True
