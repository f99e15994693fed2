"""The primary: forks workers, serves their control channels, binds their
listening sockets, reaps them and shuts the cluster down.

Theory of operation (gunicorn's arbiter shape): one object, single-threaded.
run() loops:

    run what was queued "soon" (Node's nextTick: the "fork" event, ...)
    -> handle recorded signals (handle_<name>)
    -> reap (waitpid(pid, WNOHANG) for each worker we forked)
    -> run due timers (graceful kill deadlines, respawns)
    -> stop if no worker is left (and none is about to be respawned)
    -> dispatcher.run(timeout): the C loop serves every connection with the
       GIL released and returns only for what Python must handle: a
       control channel or the signal wakeup pipe is ready (EV_WATCH), a
       worker's data channel hung up (EV_WORKER_GONE), or the timeout.

The supervision policies live beside it, one module each, called from the
loop's events: respawn.py (crash-loop backoff), rolling.py (SIGHUP and
recycling: replacement listening first), recycle.py (max_requests, max_rss),
ready.py (when_ready, sd_notify), hooks.py, watchdog.py (hangs), health.py.

The class keeps the loop, fork and reap; mixins beside it do the rest:
channels.py (control channels), signals.py, operations.py (settings, the
public operations). We reap each worker pid, not waitpid(-1): a primary
that also runs subprocesses keeps their exit statuses for them. A fault of
ours on one event is logged and the loop goes on.

Events, in Node's order: fork, online, listening(w, address), message(w,
msg), disconnect(w), exit(w, code, signal). "disconnect" comes before "exit":
at reap, what the worker wrote before dying is read, then its channel closes.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from .._core import EPOLLIN, EV_WATCH, EV_WORKER_GONE, CounterTable, Dispatcher
from ..wire import boot
from ..wire.channel import ControlSocket
from ..wire.events import EventEmitter
from ..wire.handle import Worker, signal_name
from ..wire.settings import Settings, check_env
from . import hooks as _hooks
from . import prefork
from . import systemd as _systemd
from .backoff import Backoff
from .channels import Channels
from .fdroom import FdRoom
from .health import Health
from .operations import Operations, core_policy
from .proc import Proc
from .ready import Ready
from .recycle import Recycler
from .registry import Registry
from .respawn import Respawner
from .rolling import Rolling
from .signals import Signals
from .slotfds import SlotFds, open_slot
from .timers import Timers
from .watchdog import Watchdog

log = logging.getLogger("fastcluster")


class Primary(Operations, Signals, Channels):
    NSLOTS = 256  # counter table slots: the most workers alive at once
    WAKE_TOKEN = 0  # dispatcher watch token of the signal wakeup pipe (workers: their id)
    MAX_TICK = 1.0  # longest sleep in the C loop (reap even if a SIGCHLD was missed)

    def __init__(self, events: EventEmitter, workers: dict[int, Worker],
                 settings: dict[str, Any], start_child: boot.StartChild) -> None:
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
        self.health = Health(self)  # readiness, drain, /healthz and /readyz (health.py)
        self.fdroom = FdRoom(self)  # RLIMIT_NOFILE, the bound on orphans (fdroom.py)

    # -- forking -------------------------------------------------------------

    def _ensure_core(self) -> tuple[CounterTable, Dispatcher, Registry]:
        if self.table is None or self.dispatcher is None or self.registry is None:
            cfg = self.config()
            self.fdroom.start()  # the soft RLIMIT_NOFILE up to the hard one, first
            self.table = CounterTable(self.NSLOTS)
            self.dispatcher = Dispatcher(self.table, window=cfg.window,
                                         accept_batch=cfg.accept_batch,
                                         policy=core_policy(cfg.policy))
            self.dispatcher.set_stall_ms(cfg.stall_ms)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.dispatcher.watch(self._wake_r, self.WAKE_TOKEN, EPOLLIN)
            self.registry = Registry(self._get_dispatcher, self.NSLOTS, cfg.steer_mode)
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
        self.config()
        self._emit_setup()  # Node's fork() calls setupPrimary(), which emits "setup"
        return self._spawn(extra)

    def _spawn(self, extra: dict[str, str]) -> Worker:
        cfg = self.config()
        spawn = cfg.start_method == "spawn"
        spec = prefork.main_spec(cfg, spawn)
        table, dispatcher, registry = self._ensure_core()
        if not spawn:
            prefork.preload()  # what every forked worker would import: once, here
        slot = self._free_slot()
        fds = open_slot(table, dispatcher, slot)  # its page, its channels (slotfds.py)
        self._watchdog.prepare(slot)  # before the fork: the slot's hang timeout
        registry.steering.starting(slot, cfg, forked=not spawn)  # steer: its pages, its queue
        worker = Worker(self._next_id, self)
        self._next_id += 1
        proc = Proc(worker, slot, extra)
        env = {**cfg.env, **extra}
        parent = os.getpid()
        _hooks.call(cfg, "pre_fork", worker)
        boot.flush_stdio()  # or the child would print the primary's buffered output again
        try:
            pid = os.fork()
        except BaseException:
            dispatcher.remove_worker(slot)
            fds.close()
            raise
        if pid == 0:
            code = 1
            try:
                prefork.die_with_parent(parent)
                code = self._child(proc, fds, spec, env, spawn)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                os._exit(code)
        os.close(fds.table_fd)  # the worker has it; we keep the mapping
        fds.data_w.close()
        fds.ctl_w.close()
        proc.chan = ControlSocket(fds.ctl_p, max_frame=cfg.max_frame)
        dispatcher.watch(fds.ctl_p.fileno(), worker.id, EPOLLIN)
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

    def _child(self, proc: Proc, fds: SlotFds, spec: boot.MainSpec, env: dict[str, str],
               spawn: bool) -> int:
        """In the forked child: drop the primary's fds, become the worker."""
        cfg = self.config()
        table = self.table
        assert table is not None
        settings = dict(self.settings)
        fds.ctl_p.close()
        table_fd = fds.table_fd
        page = self.registry.steering.child_page(proc.slot) if self.registry else None
        self._drop_in_child()
        # before any user code (post_fork is the first): only our own slot's
        # page stays mapped, and no fd of the table is left to map the rest
        # (a spawned worker maps table_fd, its slot's page, after the exec)
        table.confine(proc.slot)
        if not spawn:
            os.close(table_fd)
            table_fd = -1
        proc.worker.pid = os.getpid()
        _hooks.call(cfg, "post_fork", proc.worker)
        # The fork seam: from here the child runs the worker's start
        # (worker_side/boot.py's start_child, given by fastcluster/_role.py).
        return self._start_child(spawn=spawn, worker_id=proc.worker.id, slot=proc.slot,
                                 ctl=fds.ctl_w, data=fds.data_w, table=table,
                                 table_fd=table_fd, spec=spec, cfg=cfg, env=env,
                                 settings=settings, steer_page=page)

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
        self.fdroom.arm()  # bounds orphans by the fds left, every FdRoom.INTERVAL
        saved = self._install_signals()
        try:
            self._loop()
        finally:
            self._restore_signals(saved)
            self._running = False
            self.fdroom.stop()
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
                try:
                    self._on_event(kind, ident, evs)
                except Exception:  # a fault of ours on one event must not end the loop
                    log.exception("fastcluster: handling an event raised; the primary goes on")

    def _on_event(self, kind: int, ident: int, evs: int) -> None:
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
            code: int | None = None
            signame: str | None = None
            with contextlib.suppress(ChildProcessError):  # reaped elsewhere: status unknown
                wpid, status = os.waitpid(pid, os.WNOHANG)
                if wpid == 0:
                    continue
                if os.WIFSIGNALED(status):
                    signame = signal_name(os.WTERMSIG(status))
                else:
                    code = os.waitstatus_to_exitcode(status)
            try:
                self._on_exit(proc, code, signame)
            except Exception:  # a fault of ours: the loop and the other exits go on
                log.exception("fastcluster: handling worker %d's exit raised", proc.worker.id)

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
            self.registry.drop_worker(proc.slot, in_dispatcher=False,
                                      retire=not self._respawner.replaces(proc))
        self._by_slot.pop(proc.slot, None)
        self._procs.pop(w.id, None)
        self.workers.pop(w.id, None)
        w.state = "dead"
        w.exited_after_disconnect = bool(w.exited_after_disconnect)
        w.emit("exit", code, signame)
        self.events.emit("exit", w, code, signame)
        _hooks.call(self.config(), "worker_exit", w, code, signame)
        self._recycler.on_exit(proc)
        if not (self._rolling.on_exit(proc) or self._respawner.on_exit(proc, code, signame)
                or proc.replaced):
            self._release_idle()  # nothing will listen where it did
        if not self.workers:
            self._all_gone()

    def _stop_supervising(self) -> None:
        """Shutdown or disconnect(): no respawn, restart or recycling from now."""
        self._respawner.cancel()
        self._rolling.stop()
        self._recycler.stop()
        self._ready.stopping()

    def _all_gone(self) -> None:
        self.health.no_worker()  # /healthz fails if none is back within health_grace
        self._soon.extend(self._disconnect_cbs)  # disconnect(callback)s, next (logged if raising)
        self._disconnect_cbs = []
