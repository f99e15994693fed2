"""The primary's part of starting a worker, before and just after the fork:
what the worker will run (main_spec, the main script compiled once per
version of the file), what to import once for every forked worker
(preload), and the child's first act (die_with_parent). The worker's part
is fastcluster/worker_side/boot.py; the hand-over is wire/boot.py's StartChild.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import io
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable
from types import CodeType

from ..wire.boot import MainSpec
from ..wire.settings import Settings

log = logging.getLogger("fastcluster")

PR_SET_PDEATHSIG = 1

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover
    _libc = None


def main_spec(cfg: Settings, spawn: bool) -> MainSpec:
    """Decides, in the primary, what the next worker runs."""
    argv0 = sys.argv[0] if sys.argv else ""
    args = list(cfg.args) if cfg.args is not None else list(sys.argv[1:])
    if cfg.exec is not None:
        path = os.path.abspath(cfg.exec)
        return MainSpec("exec", [cfg.exec, *args], path=path,
                        code=None if spawn else compiled(path))
    main = sys.modules.get("__main__")
    mspec = getattr(main, "__spec__", None)
    mfile = getattr(main, "__file__", None)
    module = mspec.name if mspec is not None and mspec.name != "__main__" else ""
    path = os.path.abspath(mfile) if not module and isinstance(mfile, str) else ""
    if cfg.target is not None:
        spec = MainSpec("target", [argv0, *args], target=cfg.target)
        if spawn:
            spec.kind, spec.target = "ref", None
            spec.ref = _target_ref(cfg.target)
            spec.path, spec.module = path, module
        return spec
    if module:
        return MainSpec("module", [argv0, *args], module=module)
    if path:
        return MainSpec("path", [argv0, *args], path=path,
                        code=None if spawn else compiled(path))
    raise RuntimeError(
        "cluster.fork(): __main__ has no script or module to run again (interactive "
        "or -c?); give the worker's main with setup_primary(target=...) or exec=..."
    )


_compiled: dict[str, tuple[tuple[int, int], CodeType]] = {}


def compiled(path: str) -> CodeType | None:
    """The main script compiled in the primary, once per version of the file
    (mtime and size), so that a forked worker runs it without compiling it
    again: a respawn does not pay a compile proportional to the script's
    size. None for what runpy must handle itself (a directory, a zip, a .pyc,
    a file we cannot read or compile: the worker then reports the error)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_mtime_ns, st.st_size)
        hit = _compiled.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        with io.open_code(path) as f:
            source = f.read()
        if source[:2] == b"PK" or source[:4] == importlib.util.MAGIC_NUMBER:
            return None
        code = compile(source, path, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError):
        return None
    _compiled[path] = (key, code)
    return code


def _target_ref(target: Callable[[], object]) -> str:
    module = getattr(target, "__module__", None)
    qual = getattr(target, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qual, str) or "<" in qual:
        raise ValueError(
            f"setting 'target' must be importable by name with start_method='spawn' "
            f"(a module-level function), got {target!r}"
        )
    return f"{module}:{qual}"


_preloaded = False


def preload() -> None:
    """In the primary, before the first fork: import what every forked worker
    would import itself after the fork (pkgutil for runpy, the asyncio
    helpers, and asyncio and ssl with them), once, so that workers share it
    copy-on-write and a respawned worker does not spend milliseconds (in
    copy-on-write faults, mostly) importing it."""
    global _preloaded
    if not _preloaded:
        _preloaded = True
        for name in ("pkgutil", "fastcluster.aio"):
            try:
                importlib.import_module(name)
            except Exception:  # a worker that needs it will say why
                log.debug("fastcluster: could not preload %s", name, exc_info=True)


def die_with_parent(parent_pid: int) -> None:
    """First thing in a forked child: SIGKILL us when the primary dies."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
