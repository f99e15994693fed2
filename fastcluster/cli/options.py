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
import importlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..wire.settings import RELOAD_SIGNALS, STEER_MODES, reload_signal_name
from . import flags as flag_groups
from .parse import ENV_PREFIX, Option, OptionError, show
from .parse import boolean as _bool
from .parse import choice as _choice
from .parse import delay as _delay
from .parse import int_range as _int_range
from .parse import seconds as _seconds
from .parse import text as _text

__all__ = ["BY_NAME", "ENV_PREFIX", "OPTIONS", "Option", "OptionError", "parse_bind",
           "resolve"]

POLICIES = ("rr", "least", "shared", "reuseport", "steer")
WS_CHOICES = ("auto", "none", "websockets", "websockets-sansio", "wsproto")  # uvicorn's --ws
_ASGI_ONLY = "it sets up uvicorn's ASGI server, which does not serve WSGI apps"
_WS_ONLY = "WebSockets are an ASGI protocol: a WSGI app has none"


# -- parsers (text -> value; ValueError says what is allowed) ------------------

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
           "worker processes (default: the number of CPUs)", "N", aliases=("-w",)),
    Option("bind", _bind, [],
           "address to serve: HOST:PORT, [IPv6]:PORT, :PORT or unix:PATH; repeatable, "
           "each is served (default: 127.0.0.1:8000 unless --host/--port/--uds/--fd)",
           "ADDR", aliases=("-b",), multiple=True),
    # steer, not the API's rr (Node's): no hop through the primary and balanced
    # by load (bench/results/2026-12-01-final.md); a Unix or inherited socket
    # is served under least, and without bpf() it takes classic BPF weights
    Option("policy", _choice(*POLICIES), "steer",
           "how connections reach workers: steer (default: one socket per worker, the "
           "kernel picks the least loaded), rr (primary accepts, round robin), least "
           "(fewest open), shared (kernel, one socket), reuseport (one socket per worker)",
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
           "uvicorn's HTTP protocol (auto: httptools when installed, else h11)",
           "auto|httptools|h11"),
    Option("loop", _choice("auto", "asyncio", "uvloop"), "auto",
           "event loop (auto: uvloop when installed)", "auto|asyncio|uvloop"),
    Option("lifespan", _choice("auto", "on", "off"), "auto",
           "ASGI: lifespan events in each worker (auto: if the app supports them)",
           "auto|on|off", interface="asgi", why="lifespan is an ASGI protocol"),
    # -- WebSockets (ASGI), as uvicorn spells them --
    Option("ws", _choice(*WS_CHOICES), "auto",
           "ASGI: WebSocket implementation (auto: websockets when installed, else wsproto; "
           "none: no WebSockets)", "|".join(WS_CHOICES), interface="asgi", why=_WS_ONLY),
    Option("ws_max_size", _int_range(1, 1 << 40), 16 * 1024 * 1024,
           "ASGI: largest WebSocket message accepted, in bytes", "BYTES",
           interface="asgi", why=_WS_ONLY),
    Option("ws_max_queue", _int_range(1, 1 << 20), 32,
           "ASGI: WebSocket messages queued for the app before reading pauses", "N",
           interface="asgi", why=_WS_ONLY),
    Option("ws_ping_interval", _delay, 20.0,
           "ASGI: seconds between WebSocket pings; 0: no pings", "S",
           interface="asgi", why=_WS_ONLY),
    Option("ws_ping_timeout", _delay, 20.0,
           "ASGI: seconds a WebSocket ping waits for its pong before the connection is "
           "closed; 0: wait forever", "S", interface="asgi", why=_WS_ONLY),
    Option("ws_per_message_deflate", _bool, True,
           "ASGI: offer WebSocket per-message compression", "BOOL",
           interface="asgi", why=_WS_ONLY),
    Option("timeout_keep_alive", _int_range(1, 3600), 5,
           "seconds an idle keep-alive connection stays open", "S",
           aliases=("--keep-alive",)),
    Option("root_path", _text, "", "the root_path in each request's scope, SCRIPT_NAME for "
           "WSGI (the app is mounted below this URL prefix by a proxy)", "PATH"),
    Option("forwarded_allow_ips", _text, "",
           "comma-separated IPs (or *) whose X-Forwarded-For/-Proto are trusted "
           "(default, as uvicorn: $FORWARDED_ALLOW_IPS, else 127.0.0.1)", "IPS"),
    Option("ssl_certfile", _text, "", "serve TLS with this certificate (PEM)", "FILE",
           aliases=("--certfile",)),
    Option("ssl_keyfile", _text, "", "the certificate's private key (PEM; default: "
           "in the certificate file)", "FILE", aliases=("--keyfile",)),
    Option("threads", _int_range(1, 1024), 8, "WSGI: request threads per worker", "N",
           interface="wsgi", why="an ASGI app runs on the worker's event loop"),
    Option("client_timeout", _seconds, 30.0,
           "WSGI: seconds a thread reading the request body waits for the client to send "
           "more", "S", interface="wsgi",
           why="the ASGI server's idle limit is --timeout-keep-alive"),
    Option("graceful_timeout", _seconds, 30.0,
           "seconds a stopping worker gets to finish its requests before SIGKILL", "S",
           aliases=("--timeout-graceful-shutdown",)),
    Option("timeout", _hang_timeout, 30.0,
           "seconds a worker's event loop may stop answering its heartbeat before it "
           "is killed (SIGABRT, then SIGKILL) and replaced; 0: off", "S"),
    Option("max_requests", _int_range(0, 1 << 62), 0,
           "recycle a worker (gracefully, through a rolling restart) after this many "
           "requests; 0: never", "N", aliases=("--limit-max-requests",)),
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
           "binds first)", "USER", aliases=("-u",)),
    Option("group", _text, "", "run the workers with this group (name or id)", "GROUP",
           aliases=("-g",)),
    Option("backlog", _int_range(1, 65535), 511, "listen() backlog", "N"),
    Option("respawn", _bool, True, "replace workers that exit unasked", "BOOL"),
    Option("respawn_delay", _seconds, 0.1,
           "seconds before replacing a worker that died young (a crash loop); doubles "
           "with each young death in a row", "S"),
    Option("respawn_delay_max", _seconds, 30.0, "the most that delay grows to", "S"),
    Option("respawn_stable", _seconds, 10.0,
           "a worker that lived this long is replaced at once and ends a crash streak", "S"),
    Option("respawn_burst", _int_range(0, 1 << 20), 10,
           "ready workers replaced at once within --respawn-stable; more deaths than this "
           "(something kills them as they serve) go through the backoff (0: every one)", "N"),
    Option("steer_mode", _choice(*STEER_MODES), "auto",
           "--policy steer's program: auto (eBPF, else classic BPF weights), or forced",
           "|".join(STEER_MODES)),
    Option("stall_ms", _int_range(0, 60000), 50,
           "rr/least skip a worker that sits this many ms on connections it was handed "
           "(stopped, hung); 0: never", "MS"),
    Option("orphan_timeout", _delay, 30.0,
           "seconds a dead worker's queued connection waits for another before it is "
           "reset; 0: no expiry", "S"),
    Option("health_grace", _seconds, 60.0,
           "/healthz fails once no worker has been alive this many seconds", "S"),
    Option("access_log", _bool, False, "log one line per request (--access-log-format)",
           "BOOL"),
    Option("log_level", _choice(*flag_groups.LOG_LEVELS), "info",
           "logging level (trace: debug, and uvicorn's trace lines)", "LEVEL"),
    Option("status_socket", _text, "",
           "Unix socket (mode 0600) where the primary serves `fastcluster status` "
           "(default: fastcluster-<pid>.sock in $XDG_RUNTIME_DIR, else in a 0700 "
           "directory of ours, /tmp/fastcluster-<uid>; 'off': none)",
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
    *flag_groups.MORE,
)
BY_NAME = {opt.name: opt for opt in OPTIONS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds every setting as a flag (values stay text: checked in resolve()).
    A boolean also gets --no-<name>; a `multiple` one may be repeated."""
    parser.add_argument("app", nargs="?", default=None, metavar="MODULE:APP",
                        help=BY_NAME["app"].help)
    group = parser.add_argument_group(
        "settings", f"each also from the environment ({ENV_PREFIX}<NAME>, e.g. "
        f"{ENV_PREFIX}WORKERS) or the config file (<name>, e.g. workers = 4); "
        "flags win, then the environment, then the file. A BOOL flag alone means true; "
        "--no-<flag> means false. A repeatable flag is a TOML list in the file, "
        "comma-separated in the environment")
    for opt in OPTIONS:
        if opt.name == "app":
            continue
        shown = show(opt.default).replace("%", "%%")  # (help strings are %-formats)
        default = "" if opt.default in (None, "", []) else f" [{shown}]"
        env = "" if opt.flag_only else f" (${opt.env})"
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if opt.parse is _bool else {}
        if opt.multiple:
            extra["action"] = "append"
        # usage shows the first: a short alias (-w), else our own name
        names = sorted((*opt.aliases, opt.flag), key=lambda f: (f.startswith("--"), f != opt.flag))
        group.add_argument(*names, dest=opt.name, default=None,
                           metavar=opt.metavar, help=opt.help + default + env, **extra)
        if opt.parse is _bool:
            group.add_argument("--no-" + opt.flag[2:], dest=opt.name, action="store_const",
                               const="false", help=argparse.SUPPRESS)


def _show(value: Any) -> str:
    return show(value)


def _config_text(value: Any, multiple: bool = False) -> str | list[str]:
    """A TOML value as the text a flag would carry (a list of them for a
    `multiple` setting)."""
    if multiple and isinstance(value, list):
        return [str(_config_text(v)) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return [str(value)] if multiple else str(value)
    raise ValueError("a string, number or boolean" + (" (or a list of them)" if multiple
                                                       else ""))


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
    None), the environment and the config file; checked. Raises OptionError.
    out["given"] maps each setting not left at its default to its source."""
    env = os.environ if environ is None else environ
    sources: dict[str, tuple[str, str | list[str]]] = {}  # name -> (source, text(s))
    config_path = flags.get("config") or env.get(BY_NAME["config"].env) or ""
    if config_path:
        for name, value in load_config_file(config_path).items():
            try:
                text = _config_text(value, BY_NAME[name].multiple)
            except ValueError as e:
                raise OptionError(f"setting {name!r} (from {config_path}) must be {e}, "
                                  f"got {value!r}") from None
            sources[name] = (f"config file {config_path}", text)
    for opt in OPTIONS:
        if not opt.flag_only and opt.env in env:
            value = env[opt.env]
            sources[opt.name] = (f"${opt.env}", [v.strip() for v in value.split(opt.sep)
                                                 if v.strip()] if opt.multiple else value)
    for opt in OPTIONS:
        value = flags.get(opt.name)
        if value is not None:
            sources[opt.name] = ("the command line" if opt.name == "app" else opt.flag,
                                 [str(v) for v in value] if opt.multiple else str(value))
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.name not in sources:
            out[opt.name] = list(opt.default) if opt.multiple else opt.default
            continue
        source, text = sources[opt.name]
        for item in text if isinstance(text, list) else [text]:
            try:
                value = opt.parse(item)
            except ValueError as e:
                raise OptionError(f"setting {opt.name!r} (from {source}) must be {e}, "
                                  f"got {item!r}") from None
            if opt.multiple:
                out.setdefault(opt.name, []).append(value)
            else:
                out[opt.name] = value
        out.setdefault(opt.name, [])  # a multiple one given as an empty list
    if out["workers"] is None:
        out["workers"] = max(1, os.cpu_count() or 1)
    out["given"] = {name: source for name, (source, _t) in sources.items()}
    return out


def env_names() -> Sequence[str]:
    return [o.env for o in OPTIONS if not o.flag_only]
