"""The primary: forks workers, serves their control channels, binds their
listening sockets, reaps them and shuts the cluster down.

Theory of operation (gunicorn's arbiter shape): one object, single-threaded.
run() loops:

    run what was queued to run "soon" (Node's nextTick: the "fork" event,
    a disconnect callback when there are no workers)
    -> handle recorded signals (handle_<name>)
    -> reap (waitpid(pid, WNOHANG) for each worker we forked)
    -> run due timers (graceful kill deadlines, respawns)
    -> stop if no worker is left (and none is about to be respawned)
    -> dispatcher.run(timeout): the C loop serves every connection with the
       GIL released and returns only for what Python must handle: a
       control channel or the signal wakeup pipe is ready (EV_WATCH), a
       worker's data channel hung up (EV_WORKER_GONE), or the timeout.

The supervision policies live beside it, each in its own module, called
from the loop's events: _respawn (replace a worker that died, crash-loop
backoff), _rolling (SIGHUP and recycling: replacement listening first),
_recycle (max_requests, max_rss timer), _ready (when_ready, sd_notify),
_hooks (the hook settings), _heartbeat (hang detection).

Signal handlers only record (signal.set_wakeup_fd wakes the C loop). We
reap each worker pid rather than waitpid(-1): a primary that also runs
subprocesses keeps their exit statuses for them.

Control channels are read and written non-blocking; a write that would
block is queued and the channel watched for EPOLLOUT. A worker that sends
frames we cannot decode is logged; if it keeps on (or breaks the framing)
its channel is closed and it is SIGKILLed. Nothing it sends is executed.

Events, in Node's order: fork, online, listening(w, address),
message(w, msg), disconnect(w), exit(w, code, signal). "disconnect" always
comes before "exit": at reap, whatever the worker wrote before dying is
read first, then its channel closes.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from .._core import (
    EPOLLIN,
    EPOLLOUT,
    EV_WATCH,
    EV_WORKER_GONE,
    POLICY_LEAST,
    POLICY_RR,
    CounterTable,
    Dispatcher,
)
from ..wire import address as _address
from ..wire import boot as _boot
from ..wire.channel import ControlSocket
from ..wire.errors import ClusterError, ProtocolError
from ..wire.events import EventEmitter
from ..wire.frames import Frame, encode, encode_message
from ..wire.handle import Worker, signal_name
from ..wire.listener import Listener, NullTracker, SocketListener
from ..wire.settings import Settings, check_env, defaults
from . import hooks as _hooks
from . import prefork
from . import systemd as _systemd
from .backoff import Backoff
from .health import Health
from .proc import Proc
from .ready import Ready
from .recycle import Recycler
from .registry import Registry
from .respawn import Respawner
from .rolling import Rolling
from .timers import Timers
from .watchdog import Watchdog

log = logging.getLogger("fastcluster")


def _core_policy(policy: str) -> int:
    return POLICY_LEAST if policy == "least" else POLICY_RR


class Primary:
    NSLOTS = 256  # counter table slots: the most workers alive at once
    WAKE_TOKEN = 0  # dispatcher watch token of the signal wakeup pipe (workers: their id)
    MAX_TICK = 1.0  # longest sleep in the C loop (reap even if a SIGCHLD was missed)
    MAX_BAD_FRAMES = 16  # undecodable frames tolerated from one worker
    SEND_HIGH_WATER = 1 << 20  # queued bytes to a worker above which send() says False
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP,
               signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)

    def __init__(self, events: EventEmitter, workers: dict[int, Worker],
                 settings: dict[str, Any], start_child: _boot.StartChild) -> None:
        self._start_child = start_child  # the fork seam: see _child()
        self.events = events  # the cluster's EventEmitter (cluster.on)
        self.workers = workers  # cluster.workers: live workers by id
        self.settings = settings  # cluster.settings
        self.cfg: Settings | None = None  # None until setup_primary() or fork()
        self.pid = os.getpid()
        self.table: CounterTable | None = None  # created at the first fork
        self.dispatcher: Dispatcher | None = None
        self.registry: Registry | None = None
        self._procs: dict[int, Proc] = {}  # by worker id
        self._by_slot: dict[int, Proc] = {}
        self._by_pid: dict[int, Proc] = {}  # not yet reaped
        self._next_id = 1  # worker ids start at 1 and are never reused
        self._soon: collections.deque[Callable[[], object]] = collections.deque()
        self._timers = Timers()
        self._signals: collections.deque[int] = collections.deque()
        self._wake_r = self._wake_w = -1  # signal wakeup pipe
        self._reap_wanted = True
        self._stopping = False  # disconnect() or shutdown: no respawn
        self._shutdown: str | None = None  # None, "graceful" or "fast" (signals)
        self._disconnect_cbs: list[Callable[[], object]] = []
        self._backoff = Backoff()  # crash-loop pacer (settings respawn_delay*)
        self._respawner = Respawner(self)  # respawn (_respawn)
        self._rolling = Rolling(self)  # HUP rolling restart, recycling's path (_rolling)
        self._recycler = Recycler(self)  # max_requests, max_rss (_recycle)
        self._ready = Ready(self)  # when_ready, sd_notify (_ready)
        self._watchdog = Watchdog(self)  # hang detection (setting `timeout`)
        self._running = False
        self._readers: dict[int, Callable[[], object]] = {}  # add_reader(): by token
        self.health = Health(self)  # readiness, drain, /healthz and /readyz (_health)

    # -- settings ------------------------------------------------------------

    def config(self) -> Settings:
        if self.cfg is None:
            self.cfg = defaults()
            self._publish()
        return self.cfg

    def _publish(self) -> None:
        assert self.cfg is not None
        self.settings.clear()
        self.settings.update(self.cfg.as_dict())

    def setup(self, updates: dict[str, Any]) -> None:
        cfg = (self.cfg or defaults()).merge(updates)
        self.health.configure(cfg)  # binds the `health` endpoint (OSError: nothing changed)
        self.cfg = cfg
        self._publish()
        if any(name.startswith("respawn_") for name in updates):
            self._backoff.configure(self.cfg.respawn_delay, self.cfg.respawn_delay_max,
                                    self.cfg.respawn_stable)
        if self._running and self._shutdown is None:
            self._recycler.arm()  # max_requests / max_rss set while running
        if self.dispatcher is not None:
            self.dispatcher.set_policy(_core_policy(self.cfg.policy))
        self.events.emit("setup", self.settings)

    # -- forking -------------------------------------------------------------

    def _ensure_core(self) -> tuple[CounterTable, Dispatcher, Registry]:
        if self.table is None or self.dispatcher is None or self.registry is None:
            cfg = self.config()
            self.table = CounterTable(self.NSLOTS)
            self.dispatcher = Dispatcher(self.table, window=cfg.window,
                                         accept_batch=cfg.accept_batch,
                                         policy=_core_policy(cfg.policy))
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.dispatcher.watch(self._wake_r, self.WAKE_TOKEN, EPOLLIN)
            self.registry = Registry(self._get_dispatcher)
            self.registry.inherited = _systemd.listen_fds()  # socket activation
            atexit.register(self._atexit)
        return self.table, self.dispatcher, self.registry

    def _get_dispatcher(self) -> Dispatcher:
        assert self.dispatcher is not None
        return self.dispatcher

    def _free_slot(self) -> int:
        for slot in range(self.NSLOTS):
            if slot not in self._by_slot:
                return slot
        raise RuntimeError(f"cluster.fork(): {self.NSLOTS} workers are alive already")

    def fork(self, env: Any = None) -> Worker:
        if self._shutdown is not None:
            raise RuntimeError("cluster.fork(): the cluster is shutting down")
        extra = check_env("env", env)
        self._stopping = False
        return self._spawn(extra)

    def _spawn(self, extra: dict[str, str]) -> Worker:
        cfg = self.config()
        spawn = cfg.start_method == "spawn"
        spec = prefork.main_spec(cfg, spawn)
        table, dispatcher, _registry = self._ensure_core()
        if not spawn:
            prefork.preload()  # what every forked worker would import: once, here
        slot = self._free_slot()
        data_p, data_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctl_p, ctl_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            dispatcher.add_worker(slot, data_p.fileno(), data_w.fileno())
        except BaseException:
            for s in (data_p, data_w, ctl_p, ctl_w):
                s.close()
            raise
        data_p.detach()  # the dispatcher's now
        self._watchdog.prepare(slot)  # before the fork: the slot's hang timeout
        worker = Worker(self._next_id, self)
        self._next_id += 1
        proc = Proc(worker, slot, extra)
        env = {**cfg.env, **extra}
        parent = os.getpid()
        _hooks.call(cfg, "pre_fork", worker)
        _boot.flush_stdio()  # or the child would print the primary's buffered output again
        try:
            pid = os.fork()
        except BaseException:
            dispatcher.remove_worker(slot)
            for s in (data_w, ctl_p, ctl_w):
                s.close()
            raise
        if pid == 0:
            code = 1
            try:
                prefork.die_with_parent(parent)
                code = self._child(proc, ctl_p, ctl_w, data_w, spec, env, spawn)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        data_w.close()
        ctl_w.close()
        proc.chan = ControlSocket(ctl_p)
        dispatcher.watch(ctl_p.fileno(), worker.id, EPOLLIN)
        worker.pid = pid
        table.set_pid(slot, pid)
        self._procs[worker.id] = proc
        self._by_slot[slot] = proc
        self._by_pid[pid] = proc
        self.workers[worker.id] = worker
        self._recycler.on_spawn(proc)
        if not self._stopping:
            dispatcher.set_accepting(True)
        self._soon.append(lambda: self.events.emit("fork", worker))
        return worker

    def _child(self, proc: Proc, ctl_p: socket.socket, ctl_w: socket.socket,
               data_w: socket.socket, spec: _boot.MainSpec, env: dict[str, str],
               spawn: bool) -> int:
        """In the forked child: drop the primary's fds, become the worker."""
        cfg = self.config()
        table = self.table
        assert table is not None
        settings = dict(self.settings)
        ctl_p.close()
        self._drop_in_child()
        proc.worker.pid = os.getpid()
        _hooks.call(cfg, "post_fork", proc.worker)
        # The fork seam: from here the child runs the worker's start
        # (worker/boot.py's start_child, given by fastcluster/_role.py).
        return self._start_child(spawn=spawn, worker_id=proc.worker.id, slot=proc.slot,
                                 ctl=ctl_w, data=data_w, table=table, spec=spec, cfg=cfg,
                                 env=env, settings=settings)

    def _drop_in_child(self) -> None:
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        for p in self._procs.values():
            if p.chan is not None:
                p.chan.close()
        if self.registry is not None:
            self.registry.close_all(unlink=False, dispatcher=False)
        if self.dispatcher is not None:
            self.dispatcher.close()
        self.dispatcher = None
        self.registry = None
        self._procs.clear()
        self._by_slot.clear()
        self._by_pid.clear()
        self.workers.clear()
        self._soon.clear()
        self._timers = Timers()
        self._readers.clear()  # their fds are their owners' to close

    # -- the loop ------------------------------------------------------------

    def run(self) -> None:
        if self._running:
            raise RuntimeError("cluster.run() is already running")
        self.health.start()  # the `health` endpoint, if set (OSError if it cannot bind)
        self._running = True
        saved = self._install_signals()
        try:
            self._loop()
        finally:
            self._restore_signals(saved)
            self._running = False
            self.health.close()
        if self._shutdown is not None and self.registry is not None:
            self.registry.close_all()

    def _done(self) -> bool:
        return not self.workers and not self._soon and self._respawner.pending == 0

    def _loop(self) -> None:
        while True:
            self._run_soon()
            self._handle_signals()
            if self._reap_wanted:
                self._reap_wanted = False
                self._reap()
            self._timers.run_due()
            self._run_soon()
            if self._done():
                return
            delay = self._timers.next_delay()
            timeout = self.MAX_TICK if delay is None else min(delay, self.MAX_TICK)
            if self._soon or self._signals:
                timeout = 0.0
            if self.dispatcher is None:
                time.sleep(timeout)
                continue
            events = self.dispatcher.run(timeout)
            if not events:
                self._reap_wanted = True
            for kind, ident, evs in events:
                if kind == EV_WATCH:
                    if ident == self.WAKE_TOKEN:
                        self._drain_wake()
                    elif ident < 0:
                        self._on_reader(ident)
                    else:
                        proc = self._procs.get(ident)
                        if proc is not None:
                            self._on_channel(proc, evs)
                elif kind == EV_WORKER_GONE:
                    proc = self._by_slot.get(ident)
                    if proc is not None and self.registry is not None:
                        self.registry.drop_worker(proc.slot, in_dispatcher=False)

    def _run_soon(self) -> None:
        for _ in range(len(self._soon)):
            fn = self._soon.popleft()
            try:
                fn()
            except Exception:
                log.exception("fastcluster: a callback raised")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    # -- signals -------------------------------------------------------------

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

    def shutdown(self, graceful: bool = True) -> None:
        """Graceful: stop accepting, disconnect every worker, SIGKILL those
        still alive after graceful_timeout. Not graceful: SIGKILL now."""
        self._shutdown = "graceful" if graceful else "fast"
        self._stopping = True
        self._stop_supervising()
        if self.dispatcher is not None:
            self.dispatcher.set_accepting(False)
        for proc in list(self._procs.values()):
            if graceful:
                self.worker_disconnect(proc.worker)
            else:
                proc.worker.exited_after_disconnect = True
                self._kill(proc, signal.SIGKILL)

    # -- reaping -------------------------------------------------------------

    def _reap(self) -> None:
        for pid, proc in list(self._by_pid.items()):
            try:
                wpid, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: status unknown
                self._on_exit(proc, None, None)
                continue
            if wpid == 0:
                continue
            if os.WIFSIGNALED(status):
                self._on_exit(proc, None, signal_name(os.WTERMSIG(status)))
            else:
                self._on_exit(proc, os.waitstatus_to_exitcode(status), None)

    def _on_exit(self, proc: Proc, code: int | None, signame: str | None) -> None:
        w = proc.worker
        proc.dead = True
        self._by_pid.pop(w.pid, None)
        if proc.kill_timer is not None:
            proc.kill_timer.cancel()
        if proc.chan is not None:  # what it wrote before dying comes first
            proc.chan.read(max_reads=64)
            self._frames(proc)
            self._channel_closed(proc)
        if self.dispatcher is not None:
            with contextlib.suppress(OSError):
                self.dispatcher.remove_worker(proc.slot)
        if self.registry is not None:
            self.registry.drop_worker(proc.slot, in_dispatcher=False)
        self._by_slot.pop(proc.slot, None)
        self._procs.pop(w.id, None)
        self.workers.pop(w.id, None)
        w.state = "dead"
        w.exited_after_disconnect = bool(w.exited_after_disconnect)
        w.emit("exit", code, signame)
        self.events.emit("exit", w, code, signame)
        _hooks.call(self.config(), "worker_exit", w, code, signame)
        self._recycler.on_exit(proc)
        if not self._rolling.on_exit(proc):
            self._respawner.on_exit(proc, code, signame)
        if not self.workers:
            self._all_gone()

    def _stop_supervising(self) -> None:
        """Shutdown or disconnect(): no respawn, restart or recycling from now."""
        self._respawner.cancel()
        self._rolling.stop()
        self._recycler.stop()
        self._ready.stopping()

    def _all_gone(self) -> None:
        cbs, self._disconnect_cbs = self._disconnect_cbs, []
        for cb in cbs:
            try:
                cb()
            except Exception:
                log.exception("fastcluster: a disconnect callback raised")

    # -- control channels ----------------------------------------------------

    def _on_channel(self, proc: Proc, evs: int) -> None:
        if evs & EPOLLOUT:
            self._flush(proc)
        if proc.chan is not None and evs & ~EPOLLOUT:
            alive = proc.chan.read()
            self._frames(proc)
            if not alive:
                self._channel_closed(proc)

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
                w.state = "listening"
                w.emit("listening", address)
                self.events.emit("listening", w, address)
                self._rolling.on_listening(proc, frame["address"])
                self._ready.on_listening()
            elif t == "unlisten":
                if self.registry is not None:
                    self.registry.unlisten(proc.slot, int(frame["lid"]))
            elif t == "disconnecting":
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
            reply, fds = registry.listen(proc.slot, wire, min(backlog, 65535), cfg.policy)
        reply["req"] = req
        self._send(proc, encode(reply), fds)

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

    # -- public operations ---------------------------------------------------

    def disconnect(self, callback: Callable[[], object] | None = None) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {callback!r}")
        self._stopping = True
        self._respawner.cancel()
        self._rolling.stop()
        if self.dispatcher is not None:
            self.dispatcher.set_accepting(False)
        if callback is not None:
            self._disconnect_cbs.append(callback)
        if not self.workers:
            self._soon.append(self._all_gone)
        for w in list(self.workers.values()):
            if w.is_connected():
                w.disconnect()

    def listen(self, address: Any, backlog: int | None = None) -> Listener:
        """cluster.listen() in the primary itself: a plain listening socket."""
        wire = _address.to_wire(address)
        family, sockaddr = _address.resolve(wire)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(backlog or self.config().backlog)
        except BaseException:
            sock.close()
            raise
        return SocketListener(sock, NullTracker())

    def _atexit(self) -> None:
        if os.getpid() != self.pid:
            return
        if self.workers and not self._running:
            log.warning("fastcluster: the primary exits with %d worker(s) alive (they die "
                        "with it); call cluster.run() to serve and supervise them",
                        len(self.workers))
        if self.registry is not None:
            self.registry.close_all()

    # -- extra fds and stats (the CLI's status socket) -----------------------

    def add_reader(self, fd: int, callback: Callable[[], object]) -> None:
        """Calls callback from the loop while fd is readable. For control-plane
        fds (a status socket), never for served connections. fd stays the
        caller's: remove_reader() before closing it."""
        _t, dispatcher, _r = self._ensure_core()
        dispatcher.watch(fd, -fd - 1, EPOLLIN)  # workers' tokens are ids >= 1
        self._readers[-fd - 1] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(-fd - 1, None) is not None and self.dispatcher is not None:
            with contextlib.suppress(OSError, ValueError):
                self.dispatcher.unwatch(fd)

    def _on_reader(self, token: int) -> None:
        callback = self._readers.get(token)
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("fastcluster: a reader callback raised")

    def worker_stats(self) -> list[dict[str, Any]]:
        """Per live worker: id, pid, state, slot, uptime (s), exiting, and the
        dispatcher's and shared counters (dispatched, held, unsent, taken,
        closed, requests). Read when asked; nothing is counted in Python."""
        out: list[dict[str, Any]] = []
        now = time.monotonic()
        for proc in self._procs.values():
            w = proc.worker
            d: dict[str, Any] = {"id": w.id, "pid": w.pid, "state": w.state,
                                 "slot": proc.slot, "uptime": now - proc.started,
                                 "exiting": bool(w.exited_after_disconnect)}
            if self.dispatcher is not None and not proc.dead:
                with contextlib.suppress(OSError, ValueError):
                    d.update(self.dispatcher.slot_stats(proc.slot))
            out.append(d)
        return out

    # -- Worker backend ------------------------------------------------------

    def worker_send(self, worker: Worker, message: Any) -> bool:
        data = encode_message(message)
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
