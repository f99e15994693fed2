"""The settings of `fastcluster run`: one table, three sources, one name.

Theory of operation: every setting has one name, spelled three ways: a flag
(`--graceful-timeout`), an environment variable (`FASTCLUSTER_GRACEFUL_TIMEOUT`)
and a key of the optional TOML config file (`graceful_timeout`, at the top
level or under a `[fastcluster]` table). Flags win over the environment,
which wins over the file, which wins over the default. Every value is
parsed and checked by the same function whatever its source, and an error
names the setting, where the value came from, the value and what is
allowed. `--help` is generated from the table, so it lists them all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..wire.settings import RELOAD_SIGNALS, reload_signal_name

ENV_PREFIX = "FASTCLUSTER_"
POLICIES = ("rr", "least", "shared", "reuseport", "steer")


class OptionError(ValueError):
    """A bad setting: the message names it, its source, the value, what is allowed."""


@dataclasses.dataclass(frozen=True)
class Option:
    name: str  # the config key; flag and env var derive from it
    parse: Callable[[str], Any]  # text -> value; raises ValueError(what is allowed)
    default: Any
    help: str
    metavar: str | None = None
    flag_only: bool = False  # no env var / config key (e.g. --config itself)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


# -- parsers (text -> value; ValueError says what is allowed) ------------------

def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ValueError(f"an int from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"an int from {lo} to {hi}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number of seconds > 0") from None
    if not 0 < value < float("inf"):
        raise ValueError("a finite number of seconds > 0")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("a number of seconds >= 0") from None
    if not 0 <= value < float("inf"):
        raise ValueError("a finite number of seconds >= 0")
    return value


def _hang_timeout(text: str) -> float:
    allowed = "0 (off) or a number of seconds from 0.5 to 86400"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(allowed) from None
    if value != 0 and not 0.5 <= value <= 86400:
        raise ValueError(allowed)
    return value


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size(text: str) -> int:
    allowed = "a size in bytes, or with a K, M or G suffix (e.g. 512M)"
    t = text.strip().upper().removesuffix("B")
    unit = t[-1:] if t[-1:] in ("K", "M", "G") else ""
    number = t[:-1] if unit else t
    if not number.isdigit():
        raise ValueError(allowed)
    return int(number) * _UNITS[unit]


def _signal_name(text: str) -> str:
    sig = reload_signal_name(text)
    if sig is None:
        raise ValueError("one of " + ", ".join(RELOAD_SIGNALS))
    return sig


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return text

    return parse


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false (1/0, yes/no, on/off)")


def _text(text: str) -> str:
    return text


def _app(text: str) -> str:
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr or not all(p.isidentifier()
                                                    for p in (*module.split("."),
                                                              *attr.split("."))):
        raise ValueError("'module:attribute', e.g. 'myproject.asgi:app'")
    return text


def parse_bind(text: str) -> tuple[str, int] | str:
    """'HOST:PORT', '[IPv6]:PORT', ':PORT' (all IPv4 interfaces) or 'unix:PATH'."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("'unix:PATH' with a non-empty path")
        return path
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("'HOST:PORT' (port 0 to 65535), '[IPv6]:PORT' or 'unix:PATH'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("'[IPv6]:PORT' for an IPv6 address (brackets around it)")
    return (host or "0.0.0.0", int(port))


def _bind(text: str) -> str:
    parse_bind(text)
    return text


def _metrics(text: str) -> str:
    if text in ("", "off"):
        return ""
    addr = parse_bind(text)
    if isinstance(addr, str):
        raise ValueError("'HOST:PORT' (TCP), or 'off'")
    return text


OPTIONS: tuple[Option, ...] = (
    Option("app", _app, None, "the application, 'module:attribute' (ASGI or WSGI)",
           "MODULE:APP"),
    Option("workers", _int_range(1, 256), None,
           "worker processes (default: the number of CPUs)", "N"),
    Option("bind", _bind, "127.0.0.1:8000",
           "address to serve: HOST:PORT, [IPv6]:PORT, :PORT or unix:PATH", "ADDR"),
    Option("policy", _choice(*POLICIES), "rr",
           "how connections reach workers: rr (primary accepts, round robin), least "
           "(fewest open), shared (kernel, one socket), reuseport (one socket per worker), "
           "steer (one socket per worker, the kernel picks the least loaded)",
           "|".join(POLICIES)),
    Option("interface", _choice("auto", "asgi", "wsgi"), "auto",
           "the app's interface (auto: an async callable is ASGI, else WSGI)",
           "auto|asgi|wsgi"),
    Option("factory", _bool, False,
           "the app is a factory: call it (no arguments) in each worker", "BOOL"),
    Option("preload", _bool, False,
           "import the app once in the primary before forking (shared memory, faster "
           "worker start; a rolling restart then keeps the old code)", "BOOL"),
    Option("app_dir", _text, ".", "directory put first on sys.path to import the app",
           "DIR"),
    Option("http", _choice("auto", "httptools", "h11"), "auto",
           "ASGI: uvicorn's HTTP protocol (auto: httptools when installed, else h11)",
           "auto|httptools|h11"),
    Option("loop", _choice("auto", "asyncio", "uvloop"), "auto",
           "ASGI: event loop (auto: uvloop when installed)", "auto|asyncio|uvloop"),
    Option("lifespan", _choice("auto", "on", "off"), "auto",
           "ASGI: lifespan events in each worker (auto: if the app supports them)",
           "auto|on|off"),
    Option("timeout_keep_alive", _int_range(1, 3600), 5,
           "ASGI: seconds an idle keep-alive connection stays open", "S"),
    Option("root_path", _text, "", "ASGI: the root_path in each request's scope (the "
           "app is mounted below this URL prefix by a proxy)", "PATH"),
    Option("forwarded_allow_ips", _text, "",
           "ASGI: comma-separated IPs (or *) whose X-Forwarded-For/-Proto are trusted "
           "(default, as uvicorn: $FORWARDED_ALLOW_IPS, else 127.0.0.1)", "IPS"),
    Option("ssl_certfile", _text, "", "ASGI: serve TLS with this certificate (PEM)", "FILE"),
    Option("ssl_keyfile", _text, "", "ASGI: the certificate's private key (PEM; default: "
           "in the certificate file)", "FILE"),
    Option("threads", _int_range(1, 1024), 8, "WSGI: request threads per worker", "N"),
    Option("client_timeout", _seconds, 30.0,
           "WSGI: seconds a thread waits for a client to send its request", "S"),
    Option("graceful_timeout", _seconds, 30.0,
           "seconds a stopping worker gets to finish its requests before SIGKILL", "S"),
    Option("timeout", _hang_timeout, 30.0,
           "seconds a worker's event loop may stop answering its heartbeat before it "
           "is killed (SIGABRT, then SIGKILL) and replaced; 0: off", "S"),
    Option("max_requests", _int_range(0, 1 << 62), 0,
           "recycle a worker (gracefully, through a rolling restart) after this many "
           "requests; 0: never", "N"),
    Option("max_requests_jitter", _int_range(0, 1 << 62), 0,
           "add a random 0..N to each worker's max_requests, so they do not recycle "
           "together", "N"),
    Option("max_rss", _size, 0,
           "recycle a worker whose resident memory passes this size (e.g. 512M); 0: never",
           "SIZE"),
    Option("rolling_batch", _int_range(1, 64), 1,
           "workers replaced at once by a rolling restart (SIGHUP)", "N"),
    Option("reload_on", _signal_name, "SIGHUP",
           "the signal that starts a rolling restart: SIGHUP, SIGUSR1 or SIGUSR2 (with "
           "another one, a SIGHUP is logged and ignored)", "SIGNAL"),
    Option("ready_timeout", _seconds, 30.0,
           "seconds a replacement worker gets to listen before it is given up", "S"),
    Option("user", _text, "", "run the workers as this user (name or id; the primary "
           "binds first)", "USER"),
    Option("group", _text, "", "run the workers with this group (name or id)", "GROUP"),
    Option("backlog", _int_range(1, 65535), 511, "listen() backlog", "N"),
    Option("respawn", _bool, True, "replace workers that exit unasked", "BOOL"),
    Option("access_log", _bool, False, "log one line per request", "BOOL"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info",
           "logging level", "LEVEL"),
    Option("status_socket", _text, "",
           "Unix socket (mode 0600) where the primary serves `fastcluster status` "
           "(default: $XDG_RUNTIME_DIR or /tmp, fastcluster-<pid>.sock; 'off': none)",
           "PATH"),
    Option("metrics", _metrics, "",
           "serve Prometheus metrics at http://HOST:PORT/metrics from the primary "
           "(default: off)", "HOST:PORT"),
    Option("health", _metrics, "",
           "serve /healthz and /readyz at http://HOST:PORT from the primary, for load "
           "balancers and probes (default: off)", "HOST:PORT"),
    Option("drain_delay", _delay, 0.0,
           "on SIGTERM, seconds /readyz fails while workers go on serving, before the "
           "graceful shutdown (Kubernetes: 5-15)", "S"),
    Option("config", _text, "", "TOML file with any of these settings (same names)",
           "FILE"),
)
BY_NAME = {opt.name: opt for opt in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every setting as a flag (values stay text: checked in resolve())."""
    parser.add_argument("app", nargs="?", default=None, metavar="MODULE:APP",
                        help=BY_NAME["app"].help)
    group = parser.add_argument_group(
        "settings", f"each also from the environment ({ENV_PREFIX}<NAME>, e.g. "
        f"{ENV_PREFIX}WORKERS) or the config file (<name>, e.g. workers = 4); "
        "flags win, then the environment, then the file")
    for opt in OPTIONS:
        if opt.name == "app":
            continue
        default = "" if opt.default in (None, "") else f" [{_show(opt.default)}]"
        env = "" if opt.flag_only else f" (${opt.env})"
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if opt.parse is _bool else {}
        group.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                           help=opt.help + default + env, **extra)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _config_text(value: Any) -> str:
    """A TOML value as the text a flag would carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise ValueError("a string, number or boolean")


def _toml() -> Any:
    for name in ("tomllib", "tomli"):  # tomli: Python 3.10
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    raise OptionError("setting 'config': reading TOML needs Python 3.11 or `pip install tomli`")


def load_config_file(path: str) -> dict[str, Any]:
    tomllib = _toml()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise OptionError(f"setting 'config': cannot read {path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionError(f"setting 'config': {path!r} is not valid TOML: {e}") from None
    table = data.get("fastcluster", data)
    if not isinstance(table, dict):
        raise OptionError(f"setting 'config': [fastcluster] in {path!r} must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in BY_NAME or name == "config":
            if key == "fastcluster":
                continue
            raise OptionError(
                f"config file {path!r}: unknown setting {key!r}; allowed: "
                + ", ".join(o.name for o in OPTIONS if o.name != "config"))
        out[name] = value
    return out


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
            ) -> dict[str, Any]:
    """The settings from flags (argparse namespace as a dict, text values or
    None), the environment and the config file; checked. Raises OptionError."""
    env = os.environ if environ is None else environ
    sources: dict[str, tuple[str, str]] = {}  # name -> (source, text)
    config_path = flags.get("config") or env.get(BY_NAME["config"].env) or ""
    if config_path:
        for name, value in load_config_file(config_path).items():
            try:
                text = _config_text(value)
            except ValueError as e:
                raise OptionError(f"setting {name!r} (from {config_path}) must be {e}, "
                                  f"got {value!r}") from None
            sources[name] = (f"config file {config_path}", text)
    for opt in OPTIONS:
        if not opt.flag_only and opt.env in env:
            sources[opt.name] = (f"${opt.env}", env[opt.env])
    for opt in OPTIONS:
        value = flags.get(opt.name)
        if value is not None:
            sources[opt.name] = ("the command line" if opt.name == "app" else opt.flag,
                                 str(value))
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.name not in sources:
            out[opt.name] = opt.default
            continue
        source, text = sources[opt.name]
        try:
            out[opt.name] = opt.parse(text)
        except ValueError as e:
            raise OptionError(f"setting {opt.name!r} (from {source}) must be {e}, "
                              f"got {text!r}") from None
    if out["workers"] is None:
        out["workers"] = max(1, os.cpu_count() or 1)
    return out


def env_names() -> Sequence[str]:
    return [o.env for o in OPTIONS if not o.flag_only]
