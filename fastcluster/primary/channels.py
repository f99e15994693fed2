"""The primary's end of the workers' control channels (a mixin of
primary/loop.py's Primary), and the backend of the Worker handle.

Control channels are read and written non-blocking; a write that would
block is queued and the channel watched for EPOLLOUT. A worker that sends
frames we cannot decode is logged; if it keeps on (or breaks the framing)
its channel is closed and it is SIGKILLed. Nothing it sends is executed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import EPOLLIN, EPOLLOUT
from ..wire import address as _address
from ..wire.errors import ClusterError, ProtocolError
from ..wire.frames import Frame, encode, encode_message
from ..wire.handle import Worker
from ..wire.settings import Settings
from .bindguard import BindGuard

if TYPE_CHECKING:
    from .._core import CounterTable, Dispatcher
    from ..wire.events import EventEmitter
    from .proc import Proc
    from .ready import Ready
    from .registry import Registry
    from .respawn import Respawner
    from .rolling import Rolling
    from .timers import Timers

log = logging.getLogger("fastcluster")


class Channels:
    """The primary's end of each worker's control channel, and the Worker handle's backend."""

    MAX_BAD_FRAMES = 16  # undecodable frames tolerated from one worker
    _guard: tuple[Any, BindGuard] | None = None  # for the settings it was made of
    SEND_HIGH_WATER = 1 << 20  # queued bytes to a worker above which send() says False

    # the loop's state this part uses (set in Primary.__init__, primary/loop.py)
    _procs: dict[int, Proc]
    _ready: Ready
    _respawner: Respawner
    _rolling: Rolling
    _soon: collections.deque[Callable[[], object]]
    _timers: Timers
    dispatcher: Dispatcher | None
    events: EventEmitter
    registry: Registry | None

    if TYPE_CHECKING:  # the loop's methods this part calls
        def _ensure_core(self) -> tuple[CounterTable, Dispatcher, Registry]: ...
        def config(self) -> Settings: ...
        def _release_idle(self) -> None: ...

    # -- control channels ----------------------------------------------------

    def _on_channel(self, proc: Proc, evs: int) -> None:
        try:
            self._serve_channel(proc, evs)
        except Exception as e:  # a fault of ours: left readable, the channel would spin us
            log.exception("fastcluster: serving worker %d's channel raised", proc.worker.id)
            self._bad_frame(proc, f"the primary failed on its channel: {e!r}", fatal=True)

    def _serve_channel(self, proc: Proc, evs: int) -> None:
        if evs & EPOLLOUT:
            self._flush(proc)
        if proc.chan is not None and evs & ~EPOLLOUT:
            alive = proc.chan.read()
            self._frames(proc)
            if not alive:
                self._channel_closed(proc)
            else:
                self._watch_partial(proc)

    def _watch_partial(self, proc: Proc) -> None:
        """A frame begun and not finished is bounded in size (max_frame) and
        in time: frame_timeout after it began, a worker that did not finish
        it is killed as for garbage (it holds our memory, or is wedged)."""
        chan = proc.chan
        if chan is None or proc.partial_timer is not None or not chan.decoder.buffered:
            return
        proc.partial_mark = chan.decoder.completed
        timeout = self.config().frame_timeout

        def check() -> None:
            proc.partial_timer = None
            c = proc.chan
            if c is None or proc.dead or not c.decoder.buffered:
                return
            if c.decoder.completed != proc.partial_mark:  # progress: a newer frame
                self._watch_partial(proc)
                return
            self._bad_frame(proc, f"a partial frame ({c.decoder.buffered} bytes) was not "
                            f"finished within frame_timeout ({timeout:g} s)", fatal=True)

        proc.partial_timer = self._timers.call_later(timeout, check)

    def _frames(self, proc: Proc) -> None:
        while proc.chan is not None:
            try:
                for frame in proc.chan.frames():
                    self._on_frame(proc, frame)
                    if proc.chan is None:
                        return
                return
            except ProtocolError as e:
                if not self._bad_frame(proc, str(e), fatal=e.fatal):
                    return
            except Exception as e:  # a fault of ours a worker's frame reached
                log.exception("fastcluster: handling a frame of worker %d raised",
                              proc.worker.id)
                if not self._bad_frame(proc, f"a frame the primary failed on: {e!r}",
                                       fatal=False):
                    return

    def _bad_frame(self, proc: Proc, reason: str, fatal: bool) -> bool:
        """Logs a bad frame; True if the channel stays open."""
        w = proc.worker
        proc.bad_frames += 1
        err = ProtocolError(reason, fatal=fatal)
        w.emit("error", err)
        if fatal or proc.bad_frames > self.MAX_BAD_FRAMES:
            log.error("fastcluster: worker %d (pid %d) broke the control protocol (%s); "
                      "killing it", w.id, w.pid, reason)
            if not proc.dead:  # killed before it can see its channel close and exit 0
                self._kill(proc, signal.SIGKILL)
            self._channel_closed(proc)
            return False
        log.warning("fastcluster: worker %d (pid %d) sent a bad control frame (%s); "
                    "ignored", w.id, w.pid, reason)
        return True

    def _on_frame(self, proc: Proc, frame: Frame) -> None:
        w = proc.worker
        t = frame["t"]
        try:
            if t == "msg":
                data = frame["d"]
                w.emit("message", data)
                self.events.emit("message", w, data)
            elif t == "online":
                if w.state == "none":
                    w.state = "online"
                    w.emit("online")
                    self.events.emit("online", w)
                    self._rolling.on_online(proc)
            elif t == "listen":
                self._on_listen(proc, frame)
            elif t == "listening":
                address = _address.from_wire(frame["address"])
                if _address.key_text(frame["address"]) not in proc.given:
                    # a rolling restart waits for each address the old worker
                    # listens on: a made-up one would make every SIGHUP fail
                    raise ValueError(f"it claims to listen on {frame['address']!r}, an "
                                     "address the primary did not give it")
                w.state = "listening"
                self._respawner.on_listening(proc)
                w.emit("listening", address)
                self.events.emit("listening", w, address)
                self._rolling.on_listening(proc, frame["address"])
                self._ready.on_listening()
            elif t == "unlisten":
                if self.registry is not None:
                    self.registry.unlisten(proc.slot, int(frame["lid"]))
                    self._release_idle()
            elif t == "intake":  # the worker can take only so many fds at once
                window = frame["window"]
                if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                    raise ValueError(f"window must be an int >= 1, got {window!r}")
                if self.dispatcher is not None and not proc.dead:
                    # ESRCH: its data channel is gone (handed back at its fd
                    # limit) while this frame was on the way; nothing to size
                    with contextlib.suppress(ProcessLookupError):
                        self.dispatcher.set_window(proc.slot, window)
            elif t == "leaving":  # at its fd limit: its channel is handed back
                self._on_leaving(proc, str(frame.get("reason", "")))
            elif t == "disconnecting":
                proc.left = proc.left or not w.exited_after_disconnect  # nobody asked
                w.exited_after_disconnect = True
                if self.registry is not None:
                    self.registry.drop_worker(proc.slot)
                self._arm_kill_timer(proc)
            else:
                log.debug("fastcluster: worker %d sent an unknown frame type %r", w.id, t)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            self._bad_frame(proc, f"bad {t!r} frame: {e!r}", fatal=False)

    def _on_listen(self, proc: Proc, frame: Frame) -> None:
        req = frame["req"]
        if not isinstance(req, int):
            raise TypeError("listen request without an int 'req'")
        cfg = self.config()
        backlog = frame.get("backlog")
        if not isinstance(backlog, int) or isinstance(backlog, bool) or backlog <= 0:
            backlog = cfg.backlog
        fds: list[int] = []
        try:
            wire = _address.to_wire(frame.get("address"))
        except (TypeError, ValueError) as e:
            reply: dict[str, Any] = {"t": "listen_err", "errno": errno.EINVAL,
                                     "strerror": str(e)}
        else:
            _t, _d, registry = self._ensure_core()
            reply, fds = registry.listen(proc.slot, wire, min(backlog, 65535), cfg.policy,
                                         self._bind_guard())
            if reply["t"] == "listen_ok":
                proc.listens_ok += 1
        reply["req"] = req
        if reply.get("t") == "listen_ok":
            proc.given.add(_address.key_text(reply["address"]))
        self._send(proc, encode(reply), fds)

    def _bind_guard(self) -> BindGuard:
        cfg = self.config()
        key = (cfg.allowed_addresses, cfg.uid, cfg.gid)
        if self._guard is None or self._guard[0] != key:
            self._guard = (key, BindGuard(*key))
        return self._guard[1]

    def _on_leaving(self, proc: Proc, reason: str) -> None:
        """A worker leaves by itself (out of fds): replace it now, not when
        it has finished its connections and exited."""
        w = proc.worker
        if proc.dead or proc.replaced or w.exited_after_disconnect:
            return
        log.error("fastcluster: worker %d (pid %d) leaves (%s); replacing it now", w.id, w.pid,
                  reason[:64] or "no reason given")
        if self.registry is not None:
            self.registry.drop_worker(proc.slot)
        proc.replaced = self._respawner.on_exit(proc, None, None, how=reason[:64] or "left")
        self._arm_kill_timer(proc)

    def _send(self, proc: Proc, data: bytes, fds: list[int] | None = None) -> bool:
        chan = proc.chan
        if chan is None or chan.closed:
            return False
        chan.queue(data, fds)
        try:
            done = chan.flush()
        except OSError:
            self._soon.append(lambda: self._channel_closed(proc))
            return False
        if not done and not proc.watching_out and self.dispatcher is not None:
            self.dispatcher.watch(chan.fileno(), proc.worker.id, EPOLLIN | EPOLLOUT)
            proc.watching_out = True
        return True

    def _flush(self, proc: Proc) -> None:
        chan = proc.chan
        if chan is None:
            return
        try:
            done = chan.flush()
        except OSError:
            self._channel_closed(proc)
            return
        if done and proc.watching_out and self.dispatcher is not None:
            self.dispatcher.watch(chan.fileno(), proc.worker.id, EPOLLIN)
            proc.watching_out = False

    def _channel_closed(self, proc: Proc) -> None:
        chan = proc.chan
        if chan is None:
            return
        proc.chan = None
        if proc.partial_timer is not None:
            proc.partial_timer.cancel()
            proc.partial_timer = None
        if self.dispatcher is not None:
            with contextlib.suppress(OSError, ValueError):
                self.dispatcher.unwatch(chan.fileno())
        chan.close()
        if not proc.dead and self.registry is not None:
            self.registry.drop_worker(proc.slot)  # no new connections for it
        w = proc.worker
        w.state = "disconnected"
        w.exited_after_disconnect = bool(w.exited_after_disconnect)
        w.emit("disconnect")
        self.events.emit("disconnect", w)

    def _kill(self, proc: Proc, signum: int) -> None:
        if proc.dead:
            return
        if signum in (signal.SIGABRT, signal.SIGKILL) and self.registry is not None:
            self.registry.steering.bias_out(proc.slot)  # hung or killed: steer away at once
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.worker.pid, signum)

    def _arm_kill_timer(self, proc: Proc) -> None:
        if proc.kill_timer is not None or proc.dead:
            return

        def expired() -> None:
            if not proc.dead:
                log.warning("fastcluster: worker %d (pid %d) still alive after "
                            "graceful_timeout; SIGKILL", proc.worker.id, proc.worker.pid)
                self._kill(proc, signal.SIGKILL)

        proc.kill_timer = self._timers.call_later(self.config().graceful_timeout, expired)


    # -- Worker backend ------------------------------------------------------

    def worker_send(self, worker: Worker, message: Any) -> bool:
        data = encode_message(message, self.config().max_frame)
        proc = self._procs.get(worker.id)
        if proc is None or not self._send(proc, data):
            # Node: false, and an "error" event on the worker, from the loop
            gone = "dead" if proc is None or proc.dead else "disconnected"
            err = ClusterError(f"worker {worker.id} (pid {worker.pid}) is {gone}: its "
                               "channel is closed, the message was not sent")
            self._soon.append(lambda: worker.emit("error", err))
            return False
        return proc.chan is not None and proc.chan.out_bytes < self.SEND_HIGH_WATER

    def worker_kill(self, worker: Worker, signum: int) -> None:
        proc = self._procs.get(worker.id)
        if proc is None or proc.dead:
            return
        worker.exited_after_disconnect = True
        self._kill(proc, signum)
        if signum != signal.SIGKILL:
            self._arm_kill_timer(proc)

    def worker_disconnect(self, worker: Worker) -> None:
        proc = self._procs.get(worker.id)
        if proc is None or proc.dead:
            return
        worker.exited_after_disconnect = True
        if proc.chan is not None:
            self._send(proc, encode({"t": "disconnect"}))
        if self.registry is not None:
            self.registry.drop_worker(proc.slot)
        self._arm_kill_timer(proc)

    def worker_is_connected(self, worker: Worker) -> bool:
        proc = self._procs.get(worker.id)
        return proc is not None and proc.chan is not None

    def worker_is_dead(self, worker: Worker) -> bool:
        proc = self._procs.get(worker.id)
        return proc is None or proc.dead
