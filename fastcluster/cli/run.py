"""`fastcluster run module:app`: the primary's side, and each worker's main.

Theory of operation: the primary checks everything that would otherwise
fail in every worker (the app imports and is ASGI or WSGI, uvicorn is
installed for ASGI, the address can be bound) and exits 1 with one clear
message if not, before forking anything. Then it sets the cluster up with
`worker_main` as the workers' target, logs one line per lifecycle event,
serves its status socket (and metrics, if asked) from its own loop, forks
the workers and supervises them until a signal stops it (INT/TERM graceful,
QUIT fast, HUP rolling restart: the supervisor's).

A worker that cannot start serving (its app fails to import or its lifespan
startup fails, or it cannot listen) exits with BOOT_ERROR. If that happens
before any worker was ever listening, the app cannot run at all: the
primary stops the cluster and exits 1 instead of respawning forever. Later
(a rolling restart onto broken code, say) the supervisor's respawn and
backoff decide.

The plan for the workers is a module global set before forking: the forked
worker reads it (start method "fork").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import ssl
import sys
from typing import Any

import fastcluster as cluster

from .. import _role, asgi, wsgi
from ..primary.rundir import default_socket_path
from ..primary.status import MetricsServer, Snapshot, StatusServer
from . import access, logs
from .app import BOOT_ERROR, AppError, add_app_dir, check_in_child, import_app, interface_of
from .bind import BindError, Bindings, open_bindings
from .options import BY_NAME, parse_bind
from .reload import Reloader, ReloadError
from .tls import tls_context

log = logging.getLogger("fastcluster")

WS_SETTINGS = ("ws", "ws_max_size", "ws_max_queue", "ws_ping_interval", "ws_ping_timeout",
               "ws_per_message_deflate")

@dataclasses.dataclass
class WorkerPlan:
    app_ref: str
    app: Any  # the preloaded app, or None: the worker imports it
    factory: bool
    interface: str  # "asgi" or "wsgi"
    address: Any  # the list of addresses, each served
    settings: dict[str, Any]
    ssl: ssl.SSLContext | None = None  # made in the primary (a clear error there)
    http: Any = "auto"  # uvicorn's protocol: its name, or a class (the request limits)


_plan: WorkerPlan | None = None


def worker_main() -> None:
    """The target of every worker `fastcluster run` forks."""
    plan = _plan
    if plan is None:
        raise RuntimeError("fastcluster run: the worker has no plan (start method 'fork' only)")
    app = plan.app
    if app is None:
        try:
            app = import_app(plan.app_ref, plan.factory)
        except AppError as e:
            log.error("fastcluster: worker pid %d: %s", os.getpid(), e)
            raise SystemExit(BOOT_ERROR) from None
    try:
        code = _serve_in_worker(plan, app)
    except Exception:
        rt = _role.runtime
        if rt is not None and rt.worker.state == "listening":
            raise  # a crash while serving: the supervisor's respawn and backoff
        # before serving (a lazy import the worker's --user cannot read, say): the
        # same for every worker, so a boot error, not a crash loop
        log.exception("fastcluster: worker pid %d could not start serving", os.getpid())
        raise SystemExit(BOOT_ERROR) from None
    if code:
        raise SystemExit(code)


def _serve_in_worker(plan: WorkerPlan, app: Any) -> int:
    s = plan.settings
    logged = logs.access_on(s)
    # both interfaces run on uvicorn's HTTP/1.1 protocols (WSGI through a2wsgi)
    http = {"http": plan.http, "loop": s["loop"], "timeout_keep_alive": s["timeout_keep_alive"],
            "ssl": plan.ssl, "root_path": s["root_path"],
            "forwarded_allow_ips": s["forwarded_allow_ips"] or None,
            "limit_concurrency": s["limit_concurrency"] or None,
            "headers": list(s["header"]), "server_header": s["server_header"],
            "date_header": s["date_header"], "proxy_headers": s["proxy_headers"]}
    if plan.interface == "asgi":
        if logged:
            app = access.AsgiAccessLog(app, s["access_log_format"])
        return asgi.serve(app, plan.address, lifespan=s["lifespan"], access_log=False,
                          backlog=s["backlog"], startup_timeout=s["ready_timeout"], **http,
                          **_ws_options(s))
    if logged:
        app = access.wsgi_access_log(app, s["access_log_format"])
    return wsgi.serve(app, plan.address, threads=s["threads"],
                      client_timeout=s["client_timeout"], access_log=False,
                      backlog=s["backlog"], **http)


def _ws_options(s: dict[str, Any]) -> dict[str, Any]:
    """The --ws* settings as uvicorn.Config takes them (a ping setting of 0: None, off)."""
    out = {name: s[name] for name in WS_SETTINGS}
    for name in ("ws_ping_interval", "ws_ping_timeout"):
        out[name] = out[name] or None
    return out


def _fail(message: str) -> int:
    print(f"fastcluster run: {message}", file=sys.stderr, flush=True)
    return 1


def _id_or_name(text: str) -> int | str | None:
    if not text:
        return None
    return int(text) if text.isdigit() else text


def _show(address: Any) -> str:
    if isinstance(address, str):
        return f"unix:{address}"
    if isinstance(address, (list, tuple)):
        host = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
        return f"http://{host}:{address[1]}"
    return str(address)


class _Lifecycle:
    """One log line per lifecycle event; notices a worker that cannot boot."""

    def __init__(self) -> None:
        self.ever_listening = False
        self.boot_failed = False
        for event in ("fork", "online", "listening", "disconnect", "exit"):
            cluster.on(event, getattr(self, "on_" + event))

    def on_fork(self, w: Any) -> None:
        log.info("fastcluster: worker %d (pid %d) forked", w.id, w.pid)

    def on_online(self, w: Any) -> None:
        log.info("fastcluster: worker %d (pid %d) online", w.id, w.pid)

    def on_listening(self, w: Any, address: Any) -> None:
        self.ever_listening = True
        log.info("fastcluster: worker %d (pid %d) listening on %s", w.id, w.pid, _show(address))

    def on_disconnect(self, w: Any) -> None:
        log.info("fastcluster: worker %d (pid %d) disconnected", w.id, w.pid)

    def on_exit(self, w: Any, code: Any, signame: Any) -> None:
        how = f"killed by {signame}" if signame else f"exited with status {code}"
        asked = " (asked)" if w.exited_after_disconnect else ""
        level = logging.INFO if (code == 0 and not signame) or asked else logging.WARNING
        log.log(level, "fastcluster: worker %d (pid %d) %s%s", w.id, w.pid, how, asked)
        if code == BOOT_ERROR and not self.ever_listening and not self.boot_failed:
            self.boot_failed = True
            log.error("fastcluster: worker %d (pid %d) could not start serving (see above); "
                      "stopping instead of respawning", w.id, w.pid)
            cluster.disconnect()


def _not_for(settings: dict[str, Any], interface: str) -> str | None:
    """A problem with a setting given for an app it does not apply to."""
    for name, source in settings["given"].items():
        opt = BY_NAME.get(name)
        if opt is not None and opt.interface and opt.interface != interface:
            article = "an" if interface == "asgi" else "a"
            return (f"{opt.flag} (from {source}) does not apply to {article} "
                    f"{interface.upper()} app: {opt.why}")
    return None


def _protocol(settings: dict[str, Any]) -> Any:
    """uvicorn's http protocol: the name, or the class enforcing the limits."""
    limits = (settings["limit_request_line"], settings["limit_request_fields"],
              settings["limit_request_field_size"])
    if not any(limits):
        return settings["http"]
    http = settings["http"]
    if http == "auto":  # uvicorn's choice
        http = "httptools" if importlib.util.find_spec("httptools") is not None else "h11"
    from .limits import limited_protocol

    return limited_protocol(http, *limits)


def _load_env_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--env-file {path!r}: no such file")
    try:
        dotenv: Any = importlib.import_module("dotenv")
    except ImportError:
        raise ValueError("--env-file needs python-dotenv; install it with: "
                         "pip install 'fastcluster-server[cli]'") from None
    dotenv.load_dotenv(path)  # (as uvicorn: the environment already set wins)


class _PidFile:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            raise ValueError(f"--pid {path!r}: cannot write it: {e.strerror or e}") from None

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            with open(self.path) as f:
                if f.read().strip() != str(os.getpid()):
                    return  # another primary's now
            os.unlink(self.path)


def _prepare(settings: dict[str, Any]) -> tuple[str, Any, Any, Any]:
    """Everything checked before any fork: (interface, app or None, uvicorn's
    protocol, TLS context). Raises AppError, MissingDependency or ValueError."""
    if settings["env_file"]:
        _load_env_file(settings["env_file"])
    add_app_dir(settings["app_dir"])
    ref = settings["app"]
    app = None
    if settings["reload"] and settings["preload"]:
        raise ValueError("--reload replaces the workers with freshly imported code, and "
                         "--preload imports the app once in the primary (the workers "
                         "would keep the old code): use one of them")
    if settings["preload"]:
        app = import_app(ref, settings["factory"])
        interface = interface_of(app, settings["interface"])
    else:
        interface = check_in_child(ref, settings["factory"], settings["interface"])
    problem = _not_for(settings, interface)
    if problem is not None:
        raise ValueError(problem)
    if interface == "wsgi":
        wsgi.require_a2wsgi()
    asgi.require_uvicorn(settings["http"], settings["loop"],
                         settings["ws"] if interface == "asgi" else "none")
    http = _protocol(settings)
    access.check_format(settings["access_log_format"])
    return interface, app, http, tls_context(settings)


def run(settings: dict[str, Any]) -> int:
    """`fastcluster run` with resolved settings; the exit status."""
    try:
        logs.configure(settings)
    except logs.LoggingError as e:
        return _fail(str(e))
    try:
        interface, app, http, tls = _prepare(settings)
    except ValueError as e:
        if not str(e).startswith("a %-format"):
            return _fail(str(e))
        return _fail(f"setting 'access_log_format' must be {e}, got "
                     f"{settings['access_log_format']!r}")
    except (AppError, asgi.MissingDependency, OSError, ssl.SSLError) as e:
        return _fail(str(e))
    try:
        bindings = open_bindings(settings)
    except BindError as e:
        return _fail(str(e))
    try:
        return _serve(settings, interface, app, http, tls, bindings)
    finally:
        bindings.close()


def _serve(settings: dict[str, Any], interface: str, app: Any, http: Any, tls: Any,
           bindings: Bindings) -> int:
    global _plan
    ref = settings["app"]
    addresses = bindings.addresses
    _plan = WorkerPlan(ref, app, settings["factory"], interface, addresses, settings,
                       tls, http)
    reloader = None
    if settings["reload"]:
        try:
            reloader = Reloader(settings["reload_dir"], settings["reload_include"],
                                settings["reload_exclude"], settings["reload_on"])
        except ReloadError as e:
            return _fail(str(e))
    try:
        cluster.setup_primary(target=worker_main, policy=settings["policy"],
                              allowed_addresses=list(addresses),  # workers listen on --bind only
                              respawn=settings["respawn"],
                              keep_count=True,  # a worker SIGTERMed from outside is replaced
                              respawn_delay=settings["respawn_delay"],
                              respawn_delay_max=settings["respawn_delay_max"],
                              respawn_stable=settings["respawn_stable"],
                              respawn_burst=settings["respawn_burst"],
                              steer_mode=settings["steer_mode"], stall_ms=settings["stall_ms"],
                              orphan_timeout=settings["orphan_timeout"] or None,
                              health_grace=settings["health_grace"],
                              graceful_timeout=settings["graceful_timeout"],
                              backlog=settings["backlog"], health=settings["health"] or None,
                              drain_delay=settings["drain_delay"],
                              timeout=settings["timeout"] or None,
                              max_requests=settings["max_requests"],
                              max_requests_jitter=settings["max_requests_jitter"],
                              max_rss=settings["max_rss"],
                              rolling_batch=settings["rolling_batch"],
                              reload_signal=settings["reload_on"],
                              ready_timeout=settings["ready_timeout"],
                              uid=_id_or_name(settings["user"]),
                              gid=_id_or_name(settings["group"]))
    except OSError as e:  # the health endpoint's address
        return _fail(f"--health: {e.strerror or e}")
    except (TypeError, ValueError) as e:  # an unknown --user/--group, say
        return _fail(str(e))
    primary = _role.primary()
    while bindings.sockets:  # the Unix sockets bound with their mode, --fd's
        primary.adopt(bindings.sockets.pop(0))
    lifecycle = _Lifecycle()
    snapshot = Snapshot({"app": ref, "interface": interface,
                         "bind": " ".join(_show(a) for a in addresses),
                         "workers_wanted": settings["workers"]}, _role.primary())
    snapshot.expect_initial(settings["workers"])
    servers: list[Any] = []
    try:
        path = settings["status_socket"] or default_socket_path()
        if path != "off":
            servers.append(StatusServer(path, snapshot))
        if settings["metrics"]:
            metrics_addr = parse_bind(settings["metrics"])
            assert isinstance(metrics_addr, tuple)
            servers.append(MetricsServer(metrics_addr, snapshot))
    except OSError as e:
        for server in servers:
            server.close()
        what = "--metrics" if servers else "--status-socket"
        return _fail(f"{what}: {e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    try:
        pid_file = _PidFile(settings["pid"]) if settings["pid"] else None
    except ValueError as e:
        for server in servers:
            server.close()
        return _fail(str(e))
    log.info("fastcluster: primary pid %d: %s (%s) on %s, %d workers, policy %s%s%s",
             os.getpid(), ref, interface.upper(), ", ".join(map(_show, addresses)),
             settings["workers"], settings["policy"],
             f", status {path}" if path != "off" else "",
             f", metrics http://{settings['metrics']}/metrics" if settings["metrics"] else "")
    try:
        for _ in range(settings["workers"]):
            cluster.fork()
        if reloader is not None:
            reloader.start()
            log.info("fastcluster: --reload: watching %s", ", ".join(reloader.dirs))
        cluster.run()
    finally:
        if reloader is not None:
            reloader.stop()
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()
        if pid_file is not None:
            pid_file.remove()
    if lifecycle.boot_failed:
        return 1
    if getattr(_role.primary(), "_shutdown", None) is None:  # no signal asked us to stop
        log.error("fastcluster: primary pid %d: every worker left and none was replaced "
                  "(--respawn false?); stopping with status 1", os.getpid())
        return 1
    log.info("fastcluster: primary pid %d stopped", os.getpid())
    return 0
