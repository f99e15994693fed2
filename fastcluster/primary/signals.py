"""Signals to the primary (a mixin of primary/loop.py's Primary): the
handlers only record (signal.set_wakeup_fd wakes the C loop); the loop
handles them: INT/TERM graceful stop, QUIT fast stop, HUP (or the
reload_signal) rolling restart, TTIN/TTOU one worker more/fewer, CHLD reap.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..wire.handle import Worker, signal_name
from ..wire.settings import Settings

if TYPE_CHECKING:
    from .._core import Dispatcher
    from .health import Health
    from .proc import Proc
    from .ready import Ready
    from .rolling import Rolling

log = logging.getLogger("fastcluster")


class Signals:
    """Signals to the primary: recorded by the handler, handled from the loop."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP,
               signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)

    # the loop's state this part uses (set in Primary.__init__, primary/loop.py)
    _procs: dict[int, Proc]
    _ready: Ready
    _reap_wanted: bool
    _rolling: Rolling
    _shutdown: str | None
    _signals: collections.deque[int]
    _wake_r: int
    _wake_w: int
    dispatcher: Dispatcher | None
    health: Health

    if TYPE_CHECKING:  # the loop's methods this part calls
        def _spawn(self, extra: dict[str, str]) -> Worker: ...
        def config(self) -> Settings: ...
        def shutdown(self, graceful: bool = True) -> None: ...
        def worker_disconnect(self, worker: Worker) -> None: ...

    # -- signals -------------------------------------------------------------

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def _install_signals(self) -> tuple[int, dict[signal.Signals, Any]] | None:
        if self.dispatcher is None or threading.current_thread() is not threading.main_thread():
            return None
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        sigs: tuple[signal.Signals, ...] = self.SIGNALS
        reload_sig = signal.Signals[self.config().reload_signal]
        if reload_sig not in sigs:  # SIGUSR1/2 are taken only when they reload
            sigs = (*sigs, reload_sig)
        saved = {sig: signal.getsignal(sig) for sig in sigs}
        for sig in sigs:
            signal.signal(sig, self._record_signal)
        return old_fd, saved

    def _restore_signals(self, saved: tuple[int, dict[signal.Signals, Any]] | None) -> None:
        if saved is None:
            return
        old_fd, handlers = saved
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(old_fd)

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # only record: the loop acts

    def _handle_signals(self) -> None:
        reload_name = self.config().reload_signal
        while self._signals:
            signum = self._signals.popleft()
            name = signal_name(signum)
            if name == reload_name:
                self._rolling.hup(name)
            elif name == "SIGHUP":  # reload_signal moved elsewhere: a hangup is not a reload
                log.warning("fastcluster: SIGHUP ignored: rolling restarts are on %s "
                            "(reload_signal)", reload_name)
            else:
                handler = getattr(self, "handle_" + name[3:].lower(), None)
                if handler is not None:
                    handler()

    def handle_chld(self) -> None:
        self._reap_wanted = True

    def handle_int(self) -> None:
        self.shutdown(graceful=self._shutdown is None)  # Ctrl-C twice: fast

    def handle_term(self) -> None:
        if self._shutdown is None:  # a repeated TERM (sent to the group, say) stays graceful
            self._ready.stopping()  # sd_notify STOPPING=1 now, drain_delay or not
            self.health.drain(self.shutdown)  # /readyz fails, drain_delay, then graceful

    def handle_quit(self) -> None:
        self.shutdown(graceful=False)

    def handle_ttin(self) -> None:
        if self._shutdown is None:
            self._spawn({})

    def handle_ttou(self) -> None:
        live = [p for p in self._procs.values() if not p.worker.exited_after_disconnect]
        if len(live) > 1:
            self.worker_disconnect(min(live, key=lambda p: p.worker.id).worker)
