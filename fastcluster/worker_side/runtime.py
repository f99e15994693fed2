"""The worker runtime: control channel, messages, listeners, graceful disconnect.

Theory of operation: one daemon thread, the channel thread, owns the control
channel for the worker's whole life. It reads frames, answers listen
requests' waiters and runs the disconnect state machine; every state change
happens on it (other threads and the SIGTERM handler post a word to it
through a pipe). User events ("message", "disconnect") are delivered:

  - on the asyncio loop, when the aio helpers are in use in this worker
    (call_soon_threadsafe): the loop that serves connections also runs the
    handlers, so a reply to a message proves that loop is alive;
  - else on the channel thread itself: with blocking servers (socketserver,
    http.server) the main thread is busy in serve_forever(), and handlers
    run beside it, as a ThreadingHTTPServer's requests do.

Graceful disconnect (the primary's w.disconnect(), SIGTERM, or
cluster.worker.disconnect()): stop the intake (take what the data channel
holds, close it: the primary passes anything later to other workers; a
shared/reuseport socket is closed in place), let listeners hand out what
they still hold, wait until no connection is open or graceful_timeout
passes, close the control channel (the primary emits "disconnect"), then end
the main thread: SystemExit(0) raised by our SIGTERM handler, sent to the
main thread with pthread_kill (it also wakes a select() in serve_forever).
If the main thread does not exit within EXIT_GRACE, the process _exits(0).

The worker ignores SIGINT: Ctrl-C reaches the whole process group and the
primary orchestrates the shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from .._core import SteerPage
from ..wire.channel import ControlSocket
from ..wire.errors import ProtocolError
from ..wire.frames import MAX_FRAME, Frame
from ..wire.handle import Worker
from ..wire.listener import Listener
from . import heart as _heartbeat
from .fdbudget import FdBudget
from .inbox import Inbox
from .intake import Intake
from .outbound import Outbound, OwnWorker, Waiter

log = logging.getLogger("fastcluster")

TICK = 0.05  # seconds between drain checks while disconnecting
EXIT_GRACE = 5.0  # seconds the main thread gets to exit after the channel closed
# Seconds an asyncio main gets to return by itself once its servers ended (a
# kick landing in asyncio.run()'s teardown fails the worker), then it is kicked.
AIO_RETURN_GRACE = 2.0


class WorkerRuntime(Inbox, Outbound):
    """The backend of cluster.worker, and the Tracker of open connections."""

    def __init__(self, worker_id: int, ctl: socket.socket, intake: Intake,
                 graceful_timeout: float, max_frame: int = MAX_FRAME, window: int = 128) -> None:
        self.worker: Worker = OwnWorker(worker_id, self, os.getpid())
        self.max_frame = max_frame  # the primary's setting: a bigger frame gets us killed
        self.ctl = ControlSocket(ctl, accept_fds=True, max_frame=max_frame)
        self.intake = intake
        self.graceful_timeout = graceful_timeout
        self.state = "connected"  # -> "disconnecting" -> "disconnected"
        self.loop: asyncio.AbstractEventLoop | None = None
        self._listeners: set[Listener] = set()
        self._servers: set[Any] = set()  # aio.Server objects
        self._waiters: dict[int, Waiter] = {}
        self._seq = itertools.count(1)
        self._open = 0  # connections handed out and not yet closed
        self._count_lock = threading.RLock()
        self._todo: collections.deque[str] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._main_done = threading.Event()
        self._main_returned = False
        self._in_serve = False  # the main thread waits in serve(): no need to interrupt it
        self._main_ident = threading.main_thread().ident
        self._deadline = 0.0
        self._inline: Waiter | None = None
        self._deferred: list[tuple[Frame, list[int]]] = []
        self.exit_now = False  # the SIGTERM handler raises SystemExit(0)
        self._early: list[Any] = []  # messages that came before any "message" listener
        self._ep = select.epoll()  # the channel thread's: ctl, wake pipe, routed data channel
        self._ep.register(self.ctl.fileno(), select.EPOLLIN)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._data_fd: int | None = None
        self._steer_page: SteerPage | None = None  # steer: this worker's counters page
        intake.router = self
        intake.on_failure = lambda: self.post("intake failed")
        intake.on_limit, intake.on_window = (lambda why: self.post("fd limit")), self.tell_window
        intake.budget, intake.window = FdBudget(), window  # fdbudget.py

    # -- life cycle (called by boot.py) -----------------------------------------

    def start(self) -> None:
        self._send({"t": "online", "pid": os.getpid()})
        self.worker.state = "online"
        self.size_window()
        os.register_at_fork(after_in_child=self._forked_away)
        self._thread = threading.Thread(target=self._run, name="fastcluster-channel",
                                        daemon=True)
        self._thread.start()

    def after_main(self) -> int:
        """The worker's main returned: serve the channel while something
        keeps the worker alive (message handlers, listeners), as Node does."""
        self._main_returned = True
        if self.state == "connected" and not self._has_handles():
            self.post("finish")
        while not self._finished.wait(0.5):
            pass
        return 0

    def serve(self) -> None:
        """cluster.run() in a worker: serve the channel until disconnected,
        then return (the main thread is not interrupted)."""
        if threading.get_ident() != self._main_ident:
            self._finished.wait()
            return
        self._in_serve = True
        try:
            _heartbeat.wait_serving(self._finished)  # beats: hang detection
        finally:
            self._in_serve = False

    def main_done(self) -> None:
        self._main_returned = True
        self._main_done.set()

    def on_sigterm(self) -> None:
        """From the SIGTERM handler (main thread): only posts."""
        self.post("disconnect")

    def post(self, word: str) -> None:
        """Asks the channel thread to act (any thread, or a signal handler)."""
        self._todo.append(word)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _has_handles(self) -> bool:
        return (self.worker.listener_count("message") > 0 or bool(self._servers)
                or any(not lst.closed for lst in self._listeners))

    def _forked_away(self) -> None:
        """In a child the worker's own code forked: drop our channels there,
        so the primary still sees them close when this worker exits."""
        self.state = "disconnected"
        self._finished.set()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ep.close()
        self.ctl.close()
        self.intake.forget()

    # -- the channel thread --------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("fastcluster: the worker's channel thread failed")
            self._finish(kick=True)
        if self.exit_now and not self._main_done.wait(EXIT_GRACE):
            log.warning("fastcluster: worker %d did not exit after disconnect; exiting",
                        self.worker.id)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)

    def route(self, fd: int | None) -> None:
        """Router for the Intake: watch the data channel here (any thread)."""
        old, self._data_fd = self._data_fd, fd
        if old is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(old)
        if fd is not None:
            self._ep.register(fd, select.EPOLLIN)

    def _loop(self) -> None:
        ctl_fd = self.ctl.fileno()
        while not self._finished.is_set():
            timeout = TICK if self.state == "disconnecting" else -1
            for fd, _ev in self._ep.poll(timeout):
                if fd == self._data_fd:
                    self.intake.pull()
                elif fd == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                elif fd == ctl_fd and not self.ctl.closed:
                    alive = self.ctl.read()
                    self._dispatch()
                    if not alive:
                        self._primary_gone()
            self._run_deferred()
            while self._todo:
                self._act(self._todo.popleft())
            if self.state == "disconnecting":
                self._check_drained()

    def _act(self, word: str) -> None:
        if word == "disconnect":
            self._begin_disconnect(by_primary=False)
        elif word == "finish":
            if self.state == "connected" and not self._has_handles():
                self._finish(kick=False)
        elif word == "kill":
            self._finish(kick=True)
        elif word == "intake failed":
            # Out of fds, say: no more connections can reach this worker. It
            # finishes those it has and exits unasked (no "disconnecting"), so
            # a primary with `respawn` replaces it.
            log.error("fastcluster: worker %d exits once its open connections finish",
                      self.worker.id)
            self._begin_disconnect(by_primary=True)
        elif word == "fd limit":
            # channel handed back; the primary replaces us now; finish what we hold
            log.error("fastcluster: worker %d is at its fd limit: it leaves, with %d "
                      "connection(s) open; a replacement starts now", self.worker.id,
                      self.pending())
            self._send_quiet({"t": "leaving", "reason": "fd limit"})
            self._begin_disconnect(by_primary=True)
        elif word == "early":
            self._deliver(self._replay_early)
        # "check": the drain check follows in the loop

    def _dispatch(self) -> None:
        while True:
            try:
                for frame in self.ctl.frames():
                    nfds = frame.get("nfds", 0)
                    fds = self.ctl.take_fds(nfds if isinstance(nfds, int) else 0)
                    self._on_frame(frame, fds)
                return
            except ProtocolError as e:
                log.error("fastcluster: bad frame from the primary: %s", e)
                if e.fatal:
                    self._primary_gone()
                    return

    def _on_frame(self, frame: Frame, fds: list[int]) -> None:
        t = frame["t"]
        if t in ("listen_ok", "listen_err"):
            waiter = self._waiters.pop(frame.get("req", -1), None)
            if waiter is not None:
                waiter.resolve(frame, fds)
            else:
                self._abandon_reply(frame, fds)
            return
        for fd in fds:
            os.close(fd)
        if self._inline is not None:
            self._deferred.append((frame, []))
        elif t == "msg":
            self._deliver(self._emit_message, frame.get("d"))
        elif t == "disconnect":
            self._begin_disconnect(by_primary=True)

    def _run_deferred(self) -> None:
        while self._deferred and self._inline is None:
            frame, fds = self._deferred.pop(0)
            self._on_frame(frame, fds)

    def _deliver(self, fn: Any, *args: Any) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
                return
            except RuntimeError:
                pass
        fn(*args)

    def _primary_gone(self) -> None:
        if not self._finished.is_set():
            self._finish(kick=True)

    # -- graceful disconnect -------------------------------------------------

    def _begin_disconnect(self, by_primary: bool) -> None:
        if self.state != "connected":
            return
        self.state = "disconnecting"
        self.worker.exited_after_disconnect = True
        if not by_primary:
            self._send_quiet({"t": "disconnecting"})
        self._deadline = time.monotonic() + self.graceful_timeout
        self.intake.stop()
        for lst in list(self._listeners):
            lst._stop()
        for server in list(self._servers):
            self._deliver(server._stop_intake)
        self._check_drained()

    def pending(self) -> int:
        with self._count_lock:
            n = self._open
        return n + sum(lst._pending() for lst in list(self._listeners))

    def _check_drained(self) -> None:
        n = self.pending()
        if n <= 0:
            self._finish(kick=True)
        elif time.monotonic() >= self._deadline:
            log.warning("fastcluster: worker %d: graceful_timeout with %d connection(s) "
                        "open; exiting", self.worker.id, n)
            self._finish(kick=True)

    def _finish(self, kick: bool) -> None:
        if self._finished.is_set():
            return
        self.state = "disconnected"
        self.worker.state = "disconnected"
        # Taken now: the loop may run server._finish (which removes the server
        # from self._servers) before this thread looks again, and an asyncio
        # main would then be kicked at once, in the middle of its own return.
        had_servers = bool(self._servers)
        for server in list(self._servers):
            self._deliver(server._finish)
        with self.ctl.lock:
            self.ctl.close()
        for waiter in list(self._waiters.values()):
            waiter.resolve({}, [], ConnectionResetError(
                errno.ECONNRESET, "the control channel to the primary is closed"))
        self._waiters.clear()
        self._deliver(self.worker.emit, "disconnect")
        self._finished.set()
        if kick and not self._main_returned and not self._in_serve:
            if had_servers:  # an asyncio main: its servers end; let it return
                self._main_done.wait(AIO_RETURN_GRACE)
            if not self._main_returned and not self._in_serve:
                self._kick_main()

    def _kick_main(self) -> None:
        self.exit_now = True
        try:
            if self._main_ident is not None:
                signal.pthread_kill(self._main_ident, signal.SIGTERM)
        except (ProcessLookupError, OSError):
            pass

    # -- asyncio -------------------------------------------------------------

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is None or self.loop.is_closed():
            self.loop = loop

    def add_server(self, server: Any) -> None:
        self._servers.add(server)

    def remove_server(self, server: Any) -> None:
        self._servers.discard(server)

    # -- Tracker -------------------------------------------------------------

    def conn_opened(self, n: int = 1) -> None:
        with self._count_lock:
            self._open += n
        if self._steer_page is not None:
            self._steer_page.add_accepted(n)

    def conn_closed(self) -> None:
        if self._steer_page is not None:
            self._steer_page.add_done(1)  # the steer program reads it: fewest open wins
        with self._count_lock:
            self._open -= 1
            n = self._open
        if n <= 0 and self.state == "disconnecting":
            self.post("check")
