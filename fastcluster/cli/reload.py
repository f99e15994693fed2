"""`fastcluster run --reload`: a changed source file replaces the workers.

Theory of operation: a thread of the primary watches the --reload-dir
directories with watchfiles (the watcher uvicorn's --reload uses). When a
file that matches --reload-include and no --reload-exclude changes, it sends
the primary its own reload signal (--reload-on, SIGHUP by default), so the
change goes through the rolling restart: each new worker imports the
changed code and listens before an old one is retired, and no request is
dropped (unlike uvicorn's reload, which stops its one server first). The
thread only records and signals; the primary's loop does the rest, as for a
SIGHUP from outside. A worker forked meanwhile gets no copy of the thread.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
from pathlib import Path, PurePath
from typing import Any

log = logging.getLogger("fastcluster")

DEBOUNCE_MS = 300  # changes closer than this are one reload (an editor's save is several)
INSTALL_HINT = "pip install 'fastcluster-server[cli]'"


class ReloadError(ValueError):
    """--reload cannot run; the message says why."""


class _Filter:
    """uvicorn's FileFilter: a path reloads if its name (or the path) matches
    an include glob and no exclude glob, outside the dirs watchfiles ignores."""

    def __init__(self, include: list[str], exclude: list[str], default: Any) -> None:
        self.include, self.exclude, self.default = include, exclude, default

    def __call__(self, change: Any, path: str) -> bool:
        if not self.default(change, path):
            return False
        p = PurePath(path)
        if any(p.match(pattern) for pattern in self.exclude):
            return False
        return any(p.match(pattern) for pattern in self.include)


class Reloader:
    def __init__(self, dirs: list[str], include: list[str], exclude: list[str],
                 signal_name: str) -> None:
        try:
            self._watchfiles: Any = importlib.import_module("watchfiles")
        except ImportError:
            raise ReloadError(f"--reload needs watchfiles; install it with: {INSTALL_HINT}"
                              ) from None
        self.dirs = [str(Path(d).resolve()) for d in (dirs or ["."])]
        for d in self.dirs:
            if not os.path.isdir(d):
                raise ReloadError(f"--reload-dir {d!r}: not a directory")
        self._filter = _Filter(include, exclude, self._watchfiles.DefaultFilter())
        self._signal = signal.Signals[signal_name]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastcluster-reload",
                                        daemon=True)

    def start(self) -> None:
        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # ours says which file
        self._thread.start()

    def _run(self) -> None:
        try:
            for changes in self._watchfiles.watch(*self.dirs, watch_filter=self._filter,
                                                  stop_event=self._stop,
                                                  debounce=DEBOUNCE_MS, step=50,
                                                  raise_interrupt=False):
                names = sorted({os.path.relpath(path) for _change, path in changes})
                log.info("fastcluster: %s changed: replacing the workers (%s)",
                         ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""),
                         self._signal.name)
                os.kill(os.getpid(), self._signal)
        except Exception:  # the watcher's trouble is logged; serving goes on
            log.exception("fastcluster: --reload: watching files failed; reloading is off")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
