"""Starting a worker process, the worker's side: the fork child's path from
the hand-over on (start_child) and the spawn entry point. The primary's side
(main_spec, preload, die_with_parent) is fastcluster/primary/prefork.py.

Theory of operation: in the primary, fork() allocates the worker's slot and
channels and forks. The child first asks the kernel to SIGKILL it when the
primary dies (PR_SET_PDEATHSIG), then checks the primary did not die before
that (getppid), so a SIGKILLed primary leaves no orphans. Then:

  fork   the child drops the primary's fds, switches fastcluster's module
         globals to the worker role and runs the worker's main in-process:
         `target()`, or the `exec` script, or __main__ again from the top
         (a script as runpy.run_path would run it, but compiled once in the
         primary, per version of the file; run_module for `python -m`), so
         that `if cluster.is_primary: ... else: ...` works unchanged and
         imports done before the fork stay shared copy-on-write.
  spawn  the child execs a fresh interpreter that runs spawn_main(); the
         worker's fds and what to run travel in FASTCLUSTER_WORKER
         ("id:slot:ctlfd:datafd:tablefd:nslots") and FASTCLUSTER_BOOT
         (JSON), both removed from os.environ at once so the worker's own
         children do not inherit them.

A forked child calls gc.freeze() first: every object it inherited moves to
the permanent generation, so the worker's collections never walk (and so
never copy-on-write fault) the primary's heap. The primary imports
fastcluster.aio (with asyncio and ssl) and pkgutil (runpy's) before its
first fork, once, rather than each new worker after its fork: a respawn
does not pay for them.

Either way run_worker() runs the main and maps its end to an exit status:
return -> serve the channel while handles remain, then 0; SystemExit(n) ->
n; an uncaught exception -> traceback, 1. The caller always ends in
os._exit() in a finally. atexit handlers registered by the worker run; the
primary's (inherited by fork) are dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import importlib
import importlib.util
import json
import logging
import os
import pwd
import runpy
import signal
import socket
import subprocess
import sys
import traceback
import types
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, NoReturn

from .._core import CounterTable, SteerPage, WorkerChannel
from ..wire.boot import BOOT_ENV, WORKER_ENV, MainSpec, flush_stdio
from ..wire.settings import Settings
from . import current
from . import heart as _heart
from .intake import Intake
from .runtime import WorkerRuntime

log = logging.getLogger("fastcluster")

EXEC_FAILED = 127
PR_SET_PDEATHSIG = 1


def _exec_main(code: CodeType, path: str) -> None:
    """runpy.run_path(path, run_name="__main__") for a script compiled already:
    the same module globals, a fresh __main__ in sys.modules and argv[0]
    set to the script while it runs."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=path, __cached__=None, __doc__=None, __loader__=None,
                           __package__="", __spec__=None)
    saved_main, saved_argv0 = sys.modules.get("__main__"), sys.argv[0] if sys.argv else None
    sys.modules["__main__"] = module
    if sys.argv:
        sys.argv[0] = path
    try:
        exec(code, module.__dict__)
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        if saved_argv0 is not None:
            sys.argv[0] = saved_argv0


# -- process preparation ------------------------------------------------------

def prepare_process(cwd: str | None, uid: int | None, gid: int | None, silent: bool) -> None:
    if silent:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    if cwd is not None:
        os.chdir(cwd)
    drop_privileges(uid, gid)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """In the worker, after the fork (the primary bound the ports already):
    supplementary groups, then the gid, then the uid: once the uid is
    dropped the others can no longer be changed. With a uid and no gid, the
    user's own group (from the password database) and its groups."""
    if uid is None and gid is None:
        return
    parent = os.getppid()  # the primary: alive, or its death signal would have killed us
    user = None
    if uid is not None:
        with contextlib.suppress(KeyError):
            user = pwd.getpwuid(uid)
    if gid is None and user is not None:
        gid = user.pw_gid
    try:
        if os.geteuid() == 0:
            groups = [] if gid is None else [gid]
            if user is not None and gid is not None:
                with contextlib.suppress(OSError):
                    groups = os.getgrouplist(user.pw_name, gid)
            os.setgroups(groups)
        if gid is not None:
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as e:
        raise PermissionError(
            e.errno, f"settings uid={uid!r} gid={gid!r}: the worker cannot switch to them "
            f"({e.strerror}; the primary runs as uid {os.geteuid()}: only root can)") from None
    _die_with_parent_again(parent)


def _die_with_parent_again(parent: int) -> None:
    """The kernel clears PR_SET_PDEATHSIG on any change of credentials: set it
    again after the switch, and check the primary did not die in between."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    rt = current.runtime
    if rt is None:
        raise SystemExit(0)
    if rt.exit_now:
        if not rt._main_done.is_set():
            raise SystemExit(0)
        return
    rt.on_sigterm()


def _worker_signals() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # pragma: no cover (not the main thread)
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the primary orchestrates Ctrl-C
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):  # for the primary
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


# -- running the main ---------------------------------------------------------

def _resolve_ref(spec: MainSpec) -> Callable[[], object]:
    module, _, qual = spec.ref.partition(":")
    obj: Any
    if module == "__main__":
        # the target lives in the primary's main script: load it under another
        # name (its worker branch must be under `if __name__ == "__main__"`)
        if spec.module:
            obj = runpy.run_module(spec.module, run_name="__fc_main__")
        else:
            obj = runpy.run_path(spec.path, run_name="__fc_main__")
        first, _, rest = qual.partition(".")
        obj = obj[first]
        qual = rest
    else:
        obj = importlib.import_module(module)
    for part in filter(None, qual.split(".")):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"target {spec.ref!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _run_main(spec: MainSpec) -> None:
    if spec.argv:
        sys.argv[:] = spec.argv
    if spec.kind == "target":
        assert spec.target is not None
        spec.target()
    elif spec.kind == "ref":
        _resolve_ref(spec)()
    elif spec.kind in ("exec", "path"):
        if spec.kind == "exec":
            sys.path[0:1] = [os.path.dirname(spec.path)]
        if spec.code is not None:
            _exec_main(spec.code, spec.path)
        else:
            runpy.run_path(spec.path, run_name="__main__")
    else:
        runpy.run_module(spec.module, run_name="__main__", alter_sys=True)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    with contextlib.suppress(Exception):
        print(e.code, file=sys.stderr)
    return 1


def run_worker(runtime: WorkerRuntime, spec: MainSpec, settings: dict[str, Any]) -> int:
    """Runs a worker's main in this (worker) process; returns its exit status."""
    _worker_signals()
    current.become(runtime, settings)  # the facade switches role (fastcluster/_role.py)
    _heart.install(runtime.intake.channel, runtime.worker.pid)  # hang detection's half
    code = 1
    try:
        runtime.start()
        try:
            _run_main(spec)
            code = runtime.after_main()
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            runtime.main_done()
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:
        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    flush_stdio()
    return code


def start_forked(*, worker_id: int, slot: int, ctl: socket.socket, data: socket.socket,
                 table: CounterTable, spec: MainSpec, cfg: Settings, env: dict[str, str],
                 settings: dict[str, Any], steer_page: SteerPage | None = None) -> int:
    """The fork child's main (after the primary's fds are closed). steer_page:
    this worker's steer counters, mapped before the primary's fds went."""
    gc.freeze()  # what the primary made stays shared: the worker's GC never walks it
    atexit._clear()  # the primary's handlers are not the worker's
    os.environ.pop(WORKER_ENV, None)
    os.environ.pop(BOOT_ENV, None)
    os.environ.update(env)
    prepare_process(cfg.cwd, cfg.uid, cfg.gid, cfg.silent)
    channel = WorkerChannel(data.detach(), table, slot)
    runtime = WorkerRuntime(worker_id, ctl, Intake(channel), cfg.graceful_timeout,
                            cfg.max_frame, cfg.window)
    runtime._steer_page = steer_page
    return run_worker(runtime, spec, settings)


def start_child(*, spawn: bool, worker_id: int, slot: int, ctl: socket.socket,
                data: socket.socket, table: CounterTable, table_fd: int, spec: MainSpec,
                cfg: Settings, env: dict[str, str], settings: dict[str, Any],
                steer_page: SteerPage | None = None) -> int:
    """THE FORK SEAM, the worker's side (wire/boot.py's StartChild): the
    primary's forked child (primary/loop.py, Primary._child) calls this, as
    given to it by fastcluster/_role.py, and from here on the process is
    the worker."""
    if spawn:
        exec_spawned(worker_id=worker_id, slot=slot, ctl_fd=ctl.fileno(),
                     data_fd=data.fileno(), table_fd=table_fd, nslots=table.nslots,
                     spec=spec, cfg=cfg, env=env)
    return start_forked(worker_id=worker_id, slot=slot, ctl=ctl, data=data, table=table,
                        spec=spec, cfg=cfg, env=env, settings=settings, steer_page=steer_page)


def _interpreter_flags() -> list[str]:
    flags: Callable[[], list[str]] | None = getattr(subprocess, "_args_from_interpreter_flags",
                                                    None)
    return flags() if flags is not None else []


def exec_spawned(*, worker_id: int, slot: int, ctl_fd: int, data_fd: int, table_fd: int,
                 nslots: int, spec: MainSpec, cfg: Settings, env: dict[str, str]) -> NoReturn:
    """The fork child's path with start_method='spawn': exec a fresh interpreter."""
    for fd in (ctl_fd, data_fd, table_fd):
        os.set_inheritable(fd, True)
    full_env = dict(os.environ)
    full_env.update(env)
    full_env[WORKER_ENV] = f"{worker_id}:{slot}:{ctl_fd}:{data_fd}:{table_fd}:{nslots}"
    full_env[BOOT_ENV] = json.dumps({"spec": spec.to_json(), "sys_path": sys.path,
                                     "graceful_timeout": cfg.graceful_timeout,
                                     "max_frame": cfg.max_frame, "window": cfg.window})
    prepare_process(cfg.cwd, cfg.uid, cfg.gid, cfg.silent)
    # the directory that holds the fastcluster package (this is fastcluster/worker_side/boot.py)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (f"import sys; sys.path.insert(0, {here!r}); "
            "from fastcluster.worker_side.boot import spawn_main; spawn_main()")
    argv = [sys.executable, *_interpreter_flags(), "-c", code]
    os.execve(sys.executable, argv, full_env)


def spawn_main() -> NoReturn:
    """Entry point of a spawned worker's interpreter."""
    code = 1
    try:
        marker = os.environ.pop(WORKER_ENV)
        boot = json.loads(os.environ.pop(BOOT_ENV))
        worker_id, slot, ctl_fd, data_fd, table_fd, nslots = map(int, marker.split(":"))
        for fd in (ctl_fd, data_fd, table_fd):
            os.set_inheritable(fd, False)
        sys.path[:] = boot["sys_path"]
        table = CounterTable(nslots, table_fd, slot)  # our own slot's page, nothing else
        os.close(table_fd)  # the mapping stays
        channel = WorkerChannel(data_fd, table, slot)
        runtime = WorkerRuntime(worker_id, socket.socket(fileno=ctl_fd), Intake(channel),
                                float(boot["graceful_timeout"]), int(boot["max_frame"]),
                                int(boot["window"]))
        code = run_worker(runtime, MainSpec.from_json(boot["spec"]), {})
    except BaseException:
        traceback.print_exc()
    finally:
        flush_stdio()
        os._exit(code)
