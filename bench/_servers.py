"""The servers one run compares, each a command line the harness starts and stops."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import _env


@dataclass
class Ctx:
    """What a run knows about its tools and settings."""

    wrk: str
    node: str | None
    anchors: Path | None
    api_ok: bool
    api_reason: str
    workers: int
    duration: float
    connections: int
    warmup: float
    python: str = sys.executable


@dataclass
class Spec:
    name: str
    label: str
    what: str
    counted: bool  # workers run bench/servers/_hello.py and count themselves
    primary: str  # "accepts": the launched process accepts every connection;
    #               "idle": it exists but the workers accept; "none": no primary
    needs: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    slow_capable: bool = False  # can run the slow-worker scenario
    supervised: bool = False  # respawns workers and may roll them on SIGHUP

    def missing(self, ctx: Ctx, have: dict[str, str | None]) -> str | None:
        """Why this server cannot run here, or None."""
        for need in self.needs:
            if need == "node" and not ctx.node:
                return "node not found"
            if need == "anchors" and ctx.anchors is None:
                return "shared/anchors not found (--anchors)"
            if need == "api" and not ctx.api_ok:
                return ctx.api_reason
            if need in have and not have[need]:
                return f"Python package {need} not installed"
        return None

    def argv(self, ctx: Ctx, port: int, workers: int) -> list[str]:
        a = str(ctx.anchors) if ctx.anchors else ""
        s = _env.SERVERS
        py = ctx.python
        n = str(workers)
        if self.name.startswith("node-"):
            return [ctx.node or "node", f"{a}/node_cluster.js"]
        if self.name == "reuseport-anchor":
            return [py, f"{a}/reuseport_asyncio.py"]
        if self.name == "reuseport":
            return [py, str(s / "reuseport_hello.py")]
        if self.name == "uvicorn":
            return [py, "-m", "uvicorn", "--workers", n, "--host", "127.0.0.1", "--port",
                    str(port), "--no-access-log", "--log-level", "warning", "--app-dir", a,
                    "asgi_app:app"]
        if self.name == "gunicorn-uvicorn":
            return [py, "-m", "gunicorn", "-w", n, "-k", "uvicorn.workers.UvicornWorker",
                    "-b", f"127.0.0.1:{port}", "--pythonpath", a, "--log-level", "warning",
                    "asgi_app:app"]
        if self.name == "gunicorn-sync":
            return [py, "-m", "gunicorn", "-w", n, "-b", f"127.0.0.1:{port}", "--pythonpath",
                    a, "--log-level", "warning", "wsgi_app:app"]
        if self.name == "gunicorn-gthread":
            return [py, "-m", "gunicorn", "-w", n, "-k", "gthread", "--threads",
                    str(WSGI_THREADS), "-b", f"127.0.0.1:{port}", "--pythonpath", a,
                    "--log-level", "warning", "wsgi_app:app"]
        if self.name.startswith("fc-cli"):  # the CLI on the anchors' ASGI or WSGI app
            argv = [py, "-m", "fastcluster", "run", self.env.get("APP", "asgi_app:app"),
                    "--workers", n, "--bind", f"127.0.0.1:{port}", "--app-dir", a,
                    "--status-socket", "off", "--log-level", "warning",
                    "--policy", self.env.get("POLICY", "rr")]
            if self.env.get("APP", "").startswith("wsgi"):
                argv += ["--threads", str(WSGI_THREADS)]
            return argv
        if self.name.startswith("fc-"):
            return [py, str(s / "fastcluster_hello.py")]
        if self.name.startswith("core-"):
            return [py, str(s / "core_hello.py")]
        raise ValueError(self.name)

    def environ(self, workers: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        return _env.py_env({"WORKERS": str(workers), "WEB_CONCURRENCY": str(workers),
                            **self.env, **(extra or {})})


ASYNC = "raw asyncio protocol"
WSGI_THREADS = 8  # threads per WSGI worker, the same for gunicorn gthread and fastcluster run
FC_POLICIES = ("rr", "least", "shared", "reuseport", "steer")
CLI_POLICIES = ("rr", "least", "shared", "steer")
SPECS = [
    Spec("node-rr", "Node cluster SCHED_RR", "node_cluster.js, NODE_CLUSTER_SCHED_POLICY=rr",
         counted=False, primary="accepts", needs=("node", "anchors"),
         env={"NODE_CLUSTER_SCHED_POLICY": "rr"}),
    Spec("node-none", "Node cluster SCHED_NONE",
         "node_cluster.js, NODE_CLUSTER_SCHED_POLICY=none", counted=False, primary="idle",
         needs=("node", "anchors"), env={"NODE_CLUSTER_SCHED_POLICY": "none"}),
    Spec("reuseport", "SO_REUSEPORT (same worker)",
         f"bench/servers/reuseport_hello.py: per-worker SO_REUSEPORT, {ASYNC} + counting",
         counted=True, primary="none", slow_capable=True),
    Spec("reuseport-anchor", "SO_REUSEPORT anchor",
         f"shared/anchors/reuseport_asyncio.py as is ({ASYNC}, no counting)",
         counted=False, primary="none", needs=("anchors",)),
    Spec("uvicorn", "uvicorn --workers", "uvicorn --workers N asgi_app:app",
         counted=False, primary="idle", needs=("anchors", "uvicorn"), supervised=True),
    Spec("gunicorn-uvicorn", "gunicorn + UvicornWorker",
         "gunicorn -k uvicorn.workers.UvicornWorker asgi_app:app", counted=False,
         primary="idle", needs=("anchors", "gunicorn", "uvicorn"), supervised=True),
    Spec("gunicorn-sync", "gunicorn sync", "gunicorn -w N wsgi_app:app", counted=False,
         primary="idle", needs=("anchors", "gunicorn"), supervised=True),
    Spec("gunicorn-gthread", "gunicorn gthread",
         f"gunicorn -w N -k gthread --threads {WSGI_THREADS} wsgi_app:app", counted=False,
         primary="idle", needs=("anchors", "gunicorn"), supervised=True),
    *(Spec(f"fc-{p}", f"fastcluster {p}",
           f"bench/servers/fastcluster_hello.py, policy={p}, public API, {ASYNC}",
           counted=True, primary="accepts" if p in ("rr", "least") else "idle",
           needs=("api",), env={"POLICY": p}, slow_capable=True, supervised=True)
      for p in FC_POLICIES),
    Spec("fc-steer-cbpf", "fastcluster steer (cBPF)",
         f"bench/servers/fastcluster_hello.py, policy=steer, steer_mode=cbpf (classic BPF "
         f"weights), public API, {ASYNC}", counted=True, primary="idle", needs=("api",),
         env={"POLICY": "steer", "STEER_MODE": "cbpf"}, slow_capable=True, supervised=True),
    *(Spec(f"fc-cli-{p}", f"fastcluster run ({p})",
           f"python -m fastcluster run asgi_app:app --policy {p} (uvicorn's protocol)",
           counted=False, primary="accepts" if p in ("rr", "least") else "idle",
           needs=("api", "anchors", "uvicorn"), env={"POLICY": p}, supervised=True)
      for p in CLI_POLICIES),
    Spec("fc-cli-wsgi", "fastcluster run WSGI (steer)",
         f"python -m fastcluster run wsgi_app:app --policy steer --threads {WSGI_THREADS}",
         counted=False, primary="idle", needs=("api", "anchors", "uvicorn", "a2wsgi"),
         env={"POLICY": "steer", "APP": "wsgi_app:app"}, supervised=True),
    *(Spec(f"core-{p}", f"fastcluster core {p}",
           f"bench/servers/core_hello.py: primary on fastcluster._core alone, policy={p}, "
           f"{ASYNC}", counted=True, primary="accepts", env={"POLICY": p}, slow_capable=True)
      for p in ("rr", "least")),
]
BY_NAME = {s.name: s for s in SPECS}

# the baselines ratios are taken against, first one measured wins
NODE_RR = ("node-rr",)
REUSEPORT = ("reuseport", "reuseport-anchor")
