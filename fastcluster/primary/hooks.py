"""Lifecycle hooks given as settings (after gunicorn's server hooks).

    cluster.setup_primary(post_fork=lambda worker: random.seed(),
                          worker_exit=lambda worker, code, signal: ...)

Theory of operation: a hook is a plain callable setting, looked up when its
moment comes, so setup_primary() can change it at any time. The primary
never dies of a hook: one that raises is logged with its traceback and the
primary carries on as if it had returned. Where each one runs:

  pre_fork(worker)                  primary, just before the fork (worker.pid is 0)
  post_fork(worker)                 the new worker, right after the fork, before
                                    privileges are dropped and its main runs
  worker_exit(worker, code, signal) primary, after a worker was reaped
  on_reload()                       primary, on SIGHUP, before the rolling restart
  when_ready()                      primary, once, when every worker listens
"""

from __future__ import annotations

import logging
from typing import Any

from ..wire.settings import Settings

log = logging.getLogger("fastcluster")

NAMES = ("pre_fork", "post_fork", "worker_exit", "on_reload", "when_ready")


def call(cfg: Settings, name: str, *args: Any) -> None:
    """Runs hook `name` if set; logs (and swallows) whatever it raises."""
    fn = getattr(cfg, name, None)
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        log.exception("fastcluster: the %s hook %r raised; ignored", name, fn)
