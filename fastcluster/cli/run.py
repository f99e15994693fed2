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
import logging
import os
import socket
import ssl
import sys
from typing import Any

import fastcluster as cluster

from .. import _role, asgi, wsgi
from ..primary.rundir import default_socket_path
from ..primary.status import MetricsServer, Snapshot, StatusServer
from .app import BOOT_ERROR, AppError, add_app_dir, check_in_child, import_app, interface_of
from .options import parse_bind

log = logging.getLogger("fastcluster")

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(message)s"


@dataclasses.dataclass
class WorkerPlan:
    app_ref: str
    app: Any  # the preloaded app, or None: the worker imports it
    factory: bool
    interface: str  # "asgi" or "wsgi"
    address: Any
    settings: dict[str, Any]
    ssl: ssl.SSLContext | None = None  # made in the primary (a clear error there)


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
        code = _serve(plan, app)
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


def _serve(plan: WorkerPlan, app: Any) -> int:
    s = plan.settings
    if plan.interface == "asgi":
        return asgi.serve(app, plan.address, http=s["http"], loop=s["loop"],
                          lifespan=s["lifespan"], access_log=s["access_log"],
                          timeout_keep_alive=s["timeout_keep_alive"], backlog=s["backlog"],
                          ssl=plan.ssl, root_path=s["root_path"],
                          startup_timeout=s["ready_timeout"],
                          forwarded_allow_ips=s["forwarded_allow_ips"] or None)
    return wsgi.serve(app, plan.address, threads=s["threads"],
                      client_timeout=s["client_timeout"], access_log=s["access_log"],
                      backlog=s["backlog"])


def configure_logging(level: str, access_log: bool) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level.upper())
    # uvicorn's own info lines (one per worker and lifespan step) say less than ours
    logging.getLogger("uvicorn.error").setLevel("DEBUG" if level == "debug" else "WARNING")
    access = "INFO" if access_log else "WARNING"
    logging.getLogger("uvicorn.access").setLevel(access)
    logging.getLogger("fastcluster.access").setLevel(access)


def _fail(message: str) -> int:
    print(f"fastcluster run: {message}", file=sys.stderr, flush=True)
    return 1


def _check_bind(address: Any) -> str | None:
    """Binds the TCP address once (and lets go), or checks a Unix socket's
    directory, for a clear error before forking."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        return None  # (socket activation: systemd bound it, the primary adopts it)
    if isinstance(address, str):
        parent = os.path.dirname(os.path.abspath(address))
        if not address.startswith("\0") and not os.path.isdir(parent):
            return f"cannot listen on unix:{address} (--bind): no directory {parent}"
        return None
    try:
        infos = socket.getaddrinfo(address[0], address[1], socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, _t, _p, _c, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(sockaddr)
    except OSError as e:
        return f"cannot listen on {address[0]}:{address[1]} (--bind): {e.strerror or e}"
    return None


def _tls_context(settings: dict[str, Any], interface: str) -> ssl.SSLContext | None:
    certfile, keyfile = settings["ssl_certfile"], settings["ssl_keyfile"]
    if not certfile:
        if keyfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        return None
    if interface != "asgi":
        raise ValueError("TLS (--ssl-certfile) is served for ASGI apps only; put a TLS "
                         "proxy in front of a WSGI app")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(certfile, keyfile or None)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl-certfile {certfile!r}"
                         + (f" / --ssl-keyfile {keyfile!r}" if keyfile else "")
                         + f": cannot load the certificate and key: {e}") from None
    return ctx


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


def run(settings: dict[str, Any]) -> int:
    """`fastcluster run` with resolved settings; the exit status."""
    global _plan
    configure_logging(settings["log_level"], settings["access_log"])
    add_app_dir(settings["app_dir"])
    ref = settings["app"]
    address = parse_bind(settings["bind"])
    app = None
    try:
        if settings["preload"]:
            app = import_app(ref, settings["factory"])
            interface = interface_of(app, settings["interface"])
        else:
            interface = check_in_child(ref, settings["factory"], settings["interface"])
        if interface == "asgi":
            asgi.require_uvicorn(settings["http"], settings["loop"])
    except (AppError, asgi.MissingDependency) as e:
        return _fail(str(e))
    problem = _check_bind(address)
    if problem is not None:
        return _fail(problem)
    try:
        tls = _tls_context(settings, interface)
    except (OSError, ssl.SSLError, ValueError) as e:
        return _fail(str(e))
    _plan = WorkerPlan(ref, app, settings["factory"], interface, address, settings, tls)
    try:
        cluster.setup_primary(target=worker_main, policy=settings["policy"],
                              allowed_addresses=[address],  # workers listen on --bind only
                              respawn=settings["respawn"],
                              keep_count=True,  # a worker SIGTERMed from outside is replaced
                              respawn_delay=settings["respawn_delay"],
                              respawn_delay_max=settings["respawn_delay_max"],
                              respawn_stable=settings["respawn_stable"],
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
    lifecycle = _Lifecycle()
    snapshot = Snapshot({"app": ref, "interface": interface, "bind": settings["bind"],
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
    log.info("fastcluster: primary pid %d: %s (%s) on %s, %d workers, policy %s%s%s",
             os.getpid(), ref, interface.upper(), _show(address), settings["workers"],
             settings["policy"],
             f", status {path}" if path != "off" else "",
             f", metrics http://{settings['metrics']}/metrics" if settings["metrics"] else "")
    try:
        for _ in range(settings["workers"]):
            cluster.fork()
        cluster.run()
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.close()
    if lifecycle.boot_failed:
        return 1
    if getattr(_role.primary(), "_shutdown", None) is None:  # no signal asked us to stop
        log.error("fastcluster: primary pid %d: every worker left and none was replaced "
                  "(--respawn false?); stopping with status 1", os.getpid())
        return 1
    log.info("fastcluster: primary pid %d stopped", os.getpid())
    return 0
