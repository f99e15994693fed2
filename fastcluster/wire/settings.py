"""Validated primary settings (`cluster.setup_primary(**settings)`).

Theory of operation: `Settings` is an immutable, typed view; `merge()`
returns a new one with some fields replaced after checking each value, so
setup_primary() is cumulative and a bad call changes nothing. Every error
names the setting, the value and what is allowed. `as_dict()` is what the
public `cluster.settings` shows.

The policy defaults to the FASTCLUSTER_POLICY environment variable, else
"rr".
"""

from __future__ import annotations

import dataclasses
import grp
import math
import os
import pwd
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .address import allowed_keys, parse_address
from .frames import MAX_FRAME

POLICIES = ("rr", "least", "shared", "reuseport", "steer")
STEER_MODES = ("auto", "ebpf", "cbpf", "plain")  # steer's program: best available, or forced
START_METHODS = ("fork", "spawn")
POLICY_ENV = "FASTCLUSTER_POLICY"


@dataclasses.dataclass(frozen=True)
class Settings:
    target: Callable[[], object] | None = None  # the worker's main; None: re-run __main__
    exec: str | None = None  # a script the worker runs instead of __main__
    args: tuple[str, ...] | None = None  # the worker's sys.argv[1:]; None: the primary's
    start_method: str = "fork"  # "fork" (re-run __main__ in a forked child) or "spawn"
    policy: str = "rr"  # POLICIES
    steer_mode: str = "auto"  # STEER_MODES: eBPF, else classic BPF (primary/steering.py)
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # added to every worker
    cwd: str | None = None  # the worker's working directory
    silent: bool = False  # worker stdout/stderr to /dev/null
    uid: int | None = None  # dropped to in the worker after fork
    gid: int | None = None
    # what the primary may bind for its workers (None: anything they could bind
    # themselves, see primary/bindguard.py); stored as registry keys
    allowed_addresses: tuple[Any, ...] | None = None
    respawn: bool = True  # replace workers that exit without being asked (in run())
    keep_count: bool = False  # respawn also replaces a worker that disconnected on its own
    respawn_delay: float = 0.1  # first delay after a worker died young (crash loop)
    respawn_delay_max: float = 30.0  # the delay doubles per young death up to this
    respawn_stable: float = 10.0  # a worker that lived this long is replaced at once
    respawn_burst: int = 10  # ready deaths replaced at once per respawn_stable; then backoff
    graceful_timeout: float = 30.0  # seconds a disconnecting worker gets before SIGKILL
    timeout: float | None = 30.0  # hang timeout, seconds (0/None: off); see wire/beat.py
    window: int = 128  # fds in flight per worker (C dispatcher)
    accept_batch: int = 64  # accepts per listener per wake-up (C dispatcher)
    stall_ms: int = 50  # rr/least skip a worker sitting on sent fds this long (0: never)
    orphan_timeout: float | None = 30.0  # a dead worker's queued connection waits this
    # long for another worker, then is reset (None: no expiry); see primary/fdroom.py
    backlog: int = 511  # listen() backlog when the worker gives none (Node's default)
    health: str | None = None  # "HOST:PORT" of /healthz and /readyz (primary/health.py); None: off
    drain_delay: float = 0.0  # seconds /readyz fails before a SIGTERM's graceful shutdown
    health_grace: float = 60.0  # /healthz fails once no worker has been alive this long
    rolling_batch: int = 1  # workers replaced at once by a rolling restart (HUP)
    reload_signal: str = "SIGHUP"  # the signal that starts a rolling restart (RELOAD_SIGNALS)
    ready_timeout: float = 30.0  # seconds a replacement gets to listen, else it is killed
    max_requests: int = 0  # recycle a worker after this many requests (0: off)
    max_requests_jitter: int = 0  # + random 0..jitter, so workers do not recycle in step
    max_rss: int = 0  # recycle a worker whose resident memory passes this many bytes (0: off)
    max_frame: int = MAX_FRAME  # bytes of one control frame (message), either way
    frame_timeout: float = 10.0  # seconds a worker may hold a partial frame, else it is killed
    # hooks (gunicorn's): callables or None; one that raises is logged, never fatal
    pre_fork: Callable[..., object] | None = None  # (worker), primary, before the fork
    post_fork: Callable[..., object] | None = None  # (worker), in the worker, after the fork
    worker_exit: Callable[..., object] | None = None  # (worker, code, signal), primary
    on_reload: Callable[..., object] | None = None  # (), primary, on SIGHUP
    when_ready: Callable[..., object] | None = None  # (), primary, once the workers listen

    def as_dict(self) -> dict[str, Any]:
        """What cluster.settings shows: exec and args filled as Node fills
        them (the script the worker re-runs and sys.argv[1:]) when not set."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["env"] = dict(self.env)
        d["args"] = list(sys.argv[1:]) if self.args is None else list(self.args)
        d["exec"] = main_script() if self.exec is None else self.exec
        return d

    def merge(self, updates: Mapping[str, Any]) -> Settings:
        names = {f.name for f in dataclasses.fields(self)}
        checked: dict[str, Any] = {}
        for name, value in updates.items():
            if name not in names:
                raise TypeError(
                    f"setup_primary() got an unknown setting {name!r}; "
                    f"allowed: {', '.join(sorted(names))}"
                )
            checked[name] = _CHECKS[name](name, value)
        return dataclasses.replace(self, **checked)


def main_script() -> str | None:
    """The file a worker re-runs: __main__'s script; for `python -m pkg.mod`,
    the module's file as Python puts it in sys.argv[0] (the worker still runs
    it as a module); None when there is none (interactive, -c)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    if spec is not None and spec.name != "__main__" and sys.argv and sys.argv[0]:
        path = sys.argv[0]
    return os.path.abspath(path) if isinstance(path, str) and path else None


def defaults() -> Settings:
    """The settings before any setup_primary() call (policy from the env)."""
    env_policy = os.environ.get(POLICY_ENV)
    if env_policy is None or env_policy == "":
        return Settings()
    if env_policy not in POLICIES:
        raise ValueError(
            f"environment variable {POLICY_ENV}={env_policy!r} is not a policy; "
            f"allowed: {', '.join(POLICIES)}"
        )
    return Settings(policy=env_policy)


def _bad(name: str, value: Any, allowed: str, exc: type[Exception] = TypeError) -> Exception:
    return exc(f"setting {name!r} must be {allowed}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise _bad(name, value, "a callable or None")
    return value


def _opt_path(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise _bad(name, value, "a non-empty path (str or os.PathLike) or None")
    return value


def _args(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _bad(name, value, "a list of str or None")
    for item in value:
        if not isinstance(item, str):
            raise _bad(name, value, "a list of str (found a non-str item) or None")
    return tuple(value)


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise _bad(name, value, "one of " + ", ".join(map(repr, choices)))
        if value not in choices:
            raise _bad(name, value, "one of " + ", ".join(map(repr, choices)), ValueError)
        return value

    return check


RELOAD_SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2")


def reload_signal_name(text: str) -> str | None:
    """'SIGUSR2', 'usr2' and 'USR2' are the same signal; None if not one of
    RELOAD_SIGNALS (also the parser of the CLI's --reload-on)."""
    sig = text.strip().upper()
    sig = sig if sig.startswith("SIG") else "SIG" + sig
    return sig if sig in RELOAD_SIGNALS else None


def _reload_signal(name: str, value: Any) -> str:
    allowed = "one of " + ", ".join(map(repr, RELOAD_SIGNALS))
    if not isinstance(value, str):
        raise _bad(name, value, allowed)
    sig = reload_signal_name(value)
    if sig is None:
        raise _bad(name, value, allowed, ValueError)
    return sig


def _env(name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(name, value, "a mapping of str to str")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise _bad(name, value, f"a mapping of str to str (bad item {k!r}: {v!r})")
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise _bad(name, value, f"valid environment names and values (bad {k!r})",
                       ValueError)
        out[k] = v
    return out


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, value, "True or False")
    return value


def _user(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            if name == "uid":
                return pwd.getpwnam(value).pw_uid
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise _bad(name, value, "a known user/group name or an id", ValueError) from None
    if not _is_int(value) or value < 0:
        raise _bad(name, value, "an id >= 0, a name, or None")
    return int(value)


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, "a number of seconds > 0")
    if not value > 0 or value != value or value == float("inf"):
        raise _bad(name, value, "a finite number of seconds > 0", ValueError)
    return float(value)


def _seconds_within(name: str, value: Any, allowed: str, low: float, high: float,
                    off: tuple[float, ...] = ()) -> float | None:
    """None, or seconds from low to high (or a value in `off`, meaning off)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, allowed)
    if value not in off and not low <= value <= high:  # also rejects nan
        raise _bad(name, value, allowed, ValueError)
    return float(value)


def _hang_timeout(name: str, value: Any) -> float | None:
    return _seconds_within(name, value, "None or 0 (off), or a number of seconds from 0.5 "
                           "to 86400", 0.5, 86400, off=(0,))


def check_address(name: str, value: Any) -> str | None:
    """The `health` setting: None (off) or "HOST:PORT"."""
    allowed = ('None (off) or "HOST:PORT" with a port from 0 to 65535, '
               'e.g. "127.0.0.1:8081", "[::1]:8081" or ":8081" (every IPv4 interface)')
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"setting {name!r} must be {allowed}, got {value!r}")
    try:
        parse_address(value)
    except ValueError:
        raise ValueError(f"setting {name!r} must be {allowed}, got {value!r}") from None
    return value


def check_delay(name: str, value: Any) -> float:
    """The `drain_delay` setting: seconds >= 0."""
    allowed = "a finite number of seconds >= 0 (0: no drain)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"setting {name!r} must be {allowed}, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"setting {name!r} must be {allowed}, got {value!r}")
    return float(value)


def _orphan_timeout(name: str, value: Any) -> float | None:
    return _seconds_within(name, value, "None (no expiry) or a number of seconds from 0.05 "
                           "to 86400", 0.05, 86400)


def _int_range(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if not _is_int(value):
            raise _bad(name, value, f"an int from {lo} to {hi}")
        if not lo <= value <= hi:
            raise _bad(name, value, f"an int from {lo} to {hi}", ValueError)
        return int(value)

    return check


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "target": _target,
    "exec": _opt_path,
    "args": _args,
    "start_method": _choice(START_METHODS),
    "policy": _choice(POLICIES),
    "steer_mode": _choice(STEER_MODES),
    "env": _env,
    "cwd": _opt_path,
    "silent": _bool,
    "uid": _user,
    "gid": _user,
    "allowed_addresses": allowed_keys,
    "respawn": _bool,
    "keep_count": _bool,
    "graceful_timeout": _positive_float,
    "timeout": _hang_timeout,
    "window": _int_range(1, 65536),
    "accept_batch": _int_range(1, 4096),
    "stall_ms": _int_range(0, 60000),
    "orphan_timeout": _orphan_timeout,
    "health_grace": _positive_float,
    "backlog": _int_range(1, 1 << 20),
    "health": check_address,
    "drain_delay": check_delay,
    "respawn_delay": _positive_float,
    "respawn_delay_max": _positive_float,
    "respawn_stable": _positive_float,
    "respawn_burst": _int_range(0, 1 << 20),
    "rolling_batch": _int_range(1, 64),
    "reload_signal": _reload_signal,
    "ready_timeout": _positive_float,
    "max_requests": _int_range(0, 1 << 62),
    "max_requests_jitter": _int_range(0, 1 << 62),
    "max_rss": _int_range(0, 1 << 62),
    "max_frame": _int_range(4096, 1 << 30),
    "frame_timeout": _positive_float,
    "pre_fork": _target,
    "post_fork": _target,
    "worker_exit": _target,
    "on_reload": _target,
    "when_ready": _target,
}


def check_env(name: str, value: Any) -> dict[str, str]:
    """Validates a fork(env=...) argument the same way as the env setting."""
    return _env(name, value)
