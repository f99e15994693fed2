"""What a worker asks of the primary (a mixin of worker_side/runtime.py's
WorkerRuntime): listen requests and their waiters (answered on the channel
thread, or read inline when the asking thread is the channel thread), the
frames it sends, and cluster.worker's backend (send, kill, disconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .._core import SteerPage
from ..wire import address as _address
from ..wire.channel import ControlSocket
from ..wire.frames import Frame, encode, encode_message
from ..wire.handle import Worker
from ..wire.listener import Listener, SocketListener, reuseport_socket
from .intake import Intake
from .listener import IntakeListener

log = logging.getLogger("fastcluster")

REQUEST_TIMEOUT = 30.0  # seconds to wait for the primary's answer to a listen


class Waiter:
    """A listen request waiting for its reply (thread or asyncio side)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.event = threading.Event()
        self.loop = loop
        self.future: asyncio.Future[None] | None = None if loop is None else loop.create_future()
        self.frame: Frame = {}
        self.fds: list[int] = []
        self.error: BaseException | None = None
        self.abandon: Any = None  # called with (frame, fds) if nobody takes the reply

    def resolve(self, frame: Frame, fds: list[int], error: BaseException | None = None) -> None:
        self.frame, self.fds, self.error = frame, fds, error
        self.event.set()
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._settle)
            except RuntimeError:  # the loop is closed
                self._abandon()

    def _settle(self) -> None:
        fut = self.future
        assert fut is not None
        if fut.done():
            self._abandon()
        elif self.error is not None:
            fut.set_exception(self.error)
        else:
            fut.set_result(None)

    def _abandon(self) -> None:
        if self.abandon is not None and self.error is None:
            self.abandon(self.frame, self.fds)
        else:
            for fd in self.fds:
                os.close(fd)



class OwnWorker(Worker):
    """cluster.worker: registering a "message" listener releases the
    messages that arrived before the worker's main registered one."""

    _backend: Outbound

    def on(self, event: str, fn: Any) -> Worker:
        super().on(event, fn)
        if event == "message":
            self._backend.release_early()
        return self


class Outbound:
    """What the worker asks of the primary (a mixin of worker_side/runtime.py's WorkerRuntime)."""

    # the runtime's state this part uses (set in WorkerRuntime.__init__, worker_side/runtime.py)
    _inline: Waiter | None
    _listeners: set[Listener]
    _steer_page: SteerPage | None
    _main_ident: int | None
    _seq: itertools.count[int]
    _thread: threading.Thread | None
    _waiters: dict[int, Waiter]
    ctl: ControlSocket
    exit_now: bool
    intake: Intake
    max_frame: int
    state: str
    worker: Worker

    if TYPE_CHECKING:  # the runtime's methods this part calls
        def conn_opened(self, n: int = 1) -> None: ...
        def conn_closed(self) -> None: ...
        def release_early(self) -> None: ...
        def _begin_disconnect(self, by_primary: bool) -> None: ...
        def _dispatch(self) -> None: ...
        def post(self, word: str) -> None: ...

    # -- sending -------------------------------------------------------------

    def _send(self, frame: Frame, fds: list[int] | None = None) -> None:
        self.ctl.send_blocking(encode(frame, self.max_frame), fds)

    def _send_quiet(self, frame: Frame) -> None:
        with contextlib.suppress(OSError):
            self._send(frame)

    # -- listening -----------------------------------------------------------

    def _new_request(self, frame: Frame, waiter: Waiter) -> None:
        if self.state != "connected":
            raise OSError(errno.ENOTCONN, "the worker is disconnecting; it cannot listen")
        req = next(self._seq)
        frame["req"] = req
        waiter.abandon = self._abandon_reply
        self._waiters[req] = waiter
        try:
            self._send(frame)
        except BaseException:
            self._waiters.pop(req, None)
            raise

    def _abandon_reply(self, frame: Frame, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if frame.get("t") == "listen_ok" and frame.get("mode") == "rr":
            self._send_quiet({"t": "unlisten", "lid": frame.get("lid")})

    def request(self, frame: Frame) -> tuple[Frame, list[int]]:
        waiter = Waiter()
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            return self._request_inline(frame, waiter)
        self._new_request(frame, waiter)
        if not waiter.event.wait(REQUEST_TIMEOUT):
            self._waiters.pop(frame["req"], None)
            raise TimeoutError("the primary did not answer the listen request")
        if waiter.error is not None:
            raise waiter.error
        return waiter.frame, waiter.fds

    def _request_inline(self, frame: Frame, waiter: Waiter) -> tuple[Frame, list[int]]:
        """A request made on the channel thread itself (from a message
        handler): read the channel here until the reply comes; other frames
        wait until the handler returns."""
        self._new_request(frame, waiter)
        self._inline = waiter
        deadline = time.monotonic() + REQUEST_TIMEOUT
        try:
            while not waiter.event.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiters.pop(frame["req"], None)
                    raise TimeoutError("the primary did not answer the listen request")
                r, _w, _x = select.select([self.ctl.sock], [], [], min(left, 1.0))
                if r:
                    alive = self.ctl.read()
                    self._dispatch()
                    if not alive:
                        raise ConnectionResetError(errno.ECONNRESET,
                                                   "the primary closed the control channel")
        finally:
            self._inline = None
            if not self.ctl.eof:
                self.post("check")
        if waiter.error is not None:
            raise waiter.error
        return waiter.frame, waiter.fds

    async def request_async(self, frame: Frame) -> tuple[Frame, list[int]]:
        loop = asyncio.get_running_loop()
        waiter = Waiter(loop)
        self._new_request(frame, waiter)
        assert waiter.future is not None
        try:
            await asyncio.wait_for(waiter.future, REQUEST_TIMEOUT)
        except BaseException:
            self._waiters.pop(frame["req"], None)
            raise
        return waiter.frame, waiter.fds

    def listen_frame(self, address: Any, backlog: int | None) -> Frame:
        if backlog is not None and (not isinstance(backlog, int) or isinstance(backlog, bool)
                                    or backlog < 0):
            raise ValueError(f"backlog must be an int >= 0 or None, got {backlog!r}")
        wire = _address.numeric_wire(_address.to_wire(address))  # no DNS in the primary
        if isinstance(wire, str) and not wire.startswith("\0"):
            wire = os.path.abspath(wire)  # relative to this worker's cwd, as in Node
        self.size_window()  # the worker's main may have lowered RLIMIT_NOFILE
        return {"t": "listen", "address": wire, "backlog": backlog}

    def size_window(self) -> None:
        """Lowers the window to what this worker's free fds can take."""
        budget = self.intake.budget
        if budget is not None:
            with self.intake.lock:
                budget.count()
                window = budget.window(self.intake.window)
            self.limit_window(window)

    def limit_window(self, window: int) -> None:
        """At most window fds in flight to this worker from now (never raised):
        the primary's dispatcher follows. Before a listen, so no batch comes
        larger than that."""
        before = self.intake.window
        now = self.intake.limit_window(window)
        if now < before:
            self.tell_window(now)

    def tell_window(self, window: int) -> None:
        self._send_quiet({"t": "intake", "window": window})

    def make_listener(self, reply: Frame, fds: list[int]) -> Listener:
        """Builds the Listener a listen reply describes (raises its error)."""
        if reply.get("t") != "listen_ok":
            for fd in fds:
                os.close(fd)
            code = reply.get("errno") or errno.EINVAL
            text = str(reply.get("strerror") or os.strerror(code))
            if reply.get("gai"):
                raise socket.gaierror(code, text)
            raise OSError(code, text)
        mode = reply["mode"]
        family = int(reply["family"])
        address = _address.from_wire(reply["address"])
        listener: Listener
        if mode == "rr":
            for fd in fds:
                os.close(fd)
            port = self.intake.open_port(int(reply["lid"]))
            listener = IntakeListener(self.intake, port, family, address, self)
        elif mode == "steer":
            listener = SocketListener(self._steer_socket(reply, fds), self)
        elif mode == "shared":
            if not fds:
                raise OSError(errno.EBADF, "the primary did not pass the listening socket")
            for fd in fds[1:]:
                os.close(fd)
            listener = SocketListener(socket.socket(fileno=fds[0]), self)
            if family == socket.AF_UNIX:
                listener._name = address  # absolute; the primary may have bound it relative
        else:
            for fd in fds:
                os.close(fd)
            listener = SocketListener(reuseport_socket(family, address,
                                                        int(reply.get("backlog") or 511)), self)
        listener._on_close = self._forget_listener
        self._listeners.add(listener)
        return listener

    def _steer_socket(self, reply: Frame, fds: list[int]) -> socket.socket:
        """steer: fds are the slot's listening socket and, for a worker that
        did not map its counters page at the fork (spawn), the pages: it maps
        its own page once and closes the pages' fd at once (it must not reach
        a sibling's figures)."""
        try:
            if not fds or (self._steer_page is None and len(fds) < 2):
                raise OSError(errno.EBADF, "the primary did not pass the slot's socket "
                              "and counters")
            if self._steer_page is None:
                self._steer_page = SteerPage(fds[1], int(reply["slot"]))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds[1:]:
            os.close(fd)
        return socket.socket(fileno=fds[0])

    def listening(self, listener: Listener) -> None:
        """Tells the primary a listener is ready ("listening" event)."""
        self.worker.state = "listening"
        name = listener.getsockname()
        wire = name if isinstance(name, str) else list(name)
        self._send_quiet({"t": "listening", "address": wire})

    def listen(self, address: Any, backlog: int | None = None) -> Listener:
        reply, fds = self.request(self.listen_frame(address, backlog))
        listener = self.make_listener(reply, fds)
        self.listening(listener)
        return listener

    def _forget_listener(self, listener: Listener) -> None:
        self._listeners.discard(listener)
        if isinstance(listener, IntakeListener) and self.state == "connected":
            self._send_quiet({"t": "unlisten", "lid": listener.lid})

    # -- Worker backend (cluster.worker) -------------------------------------

    def worker_send(self, worker: Worker, message: Any) -> bool:
        data = encode_message(message, self.max_frame)
        if self.state == "disconnected" or self.ctl.closed:
            return False
        try:
            self.ctl.send_blocking(data)
        except OSError:
            return False
        return True

    def worker_kill(self, worker: Worker, signum: int) -> None:
        self.worker.exited_after_disconnect = True
        self._send_quiet({"t": "disconnecting"})
        if threading.get_ident() == self._main_ident:
            self.exit_now = True
            raise SystemExit(0)
        self.post("kill")

    def worker_disconnect(self, worker: Worker) -> None:
        if self._thread is not None and threading.get_ident() == self._thread.ident:
            self._begin_disconnect(by_primary=False)
        else:
            self.post("disconnect")

    def worker_is_connected(self, worker: Worker) -> bool:
        return self.state != "disconnected"

    def worker_is_dead(self, worker: Worker) -> bool:
        return False

