"""pytest plugin: run your ASGI/WSGI app clustered, on a free loopback port.

    def test_hello(fastcluster_server):
        server = fastcluster_server("myproject.asgi:app", workers=2, policy="least")
        conn = http.client.HTTPConnection(server.host, server.port)
        ...

Registered through the `pytest11` entry point, so installing
fastcluster-server makes the `fastcluster_server` fixture available (or add
`-p fastcluster.pytest_plugin`). The fixture is a factory: each call starts
`python -m fastcluster run` in its own session on 127.0.0.1 port 0, waits
until every worker listens (asked through the primary's status socket),
and returns a ClusterServer with its address, its status and its log. At
the end of the test every server is stopped (SIGTERM, then SIGKILL to its
process group after `stop_timeout`) and the test fails if any of its
processes is still alive.

An app is a "module:attribute" string or the object itself, if it is
importable by name (a module-level app or factory).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest

__all__ = ["ClusterServer", "fastcluster_server", "start_server"]

START_TIMEOUT = 30.0  # seconds for every worker to listen
STOP_TIMEOUT = 15.0  # seconds for a graceful stop before SIGKILL


def _ref(app: Any) -> str:
    if isinstance(app, str):
        return app
    module = getattr(app, "__module__", None)
    qual = getattr(app, "__qualname__", None) or getattr(app, "__name__", None)
    if module and qual and "<" not in qual and module != "__main__":
        return f"{module}:{qual}"
    for name, mod in list(sys.modules.items()):  # an instance bound at module level
        if name == "__main__" or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is app:
                return f"{name}:{attr}"
    raise TypeError(f"fastcluster_server: app must be 'module:attribute' or an object "
                    f"importable by name (module level), got {app!r}")


class ClusterServer:
    """A `fastcluster run` process serving on loopback."""

    def __init__(self, proc: subprocess.Popen[bytes], status_socket: str, log_path: str,
                 workers: int | None) -> None:
        self.process = proc
        self.status_socket = status_socket
        self.log_path = log_path
        self.workers = workers
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._seen_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """What `fastcluster status --json` prints."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.status_socket)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        doc: dict[str, Any] = json.loads(data)
        self._seen_pids.update(int(w["pid"]) for w in doc["workers"])
        return doc

    def worker_pids(self) -> list[int]:
        return [int(w["pid"]) for w in self.status()["workers"]]

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)

    def wait_ready(self, timeout: float = START_TIMEOUT, workers: int | None = None) -> None:
        """Waits until `workers` workers (default: all the settings ask for) listen."""
        want = self.workers if workers is None else workers
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastcluster run exited with status "
                                   f"{self.process.returncode}; its log:\n{self.log()}")
            try:
                doc = self.status()
            except (OSError, ValueError) as e:
                last = e
            else:
                last = doc
                ws = doc["workers"]
                addrs = doc["primary"]["addresses"]
                n = doc["primary"].get("workers_wanted") if want is None else want
                if len(ws) == n and addrs and all(w["state"] == "listening" for w in ws):
                    host, port = addrs[0][0], addrs[0][1]
                    self.address = (host if host not in ("0.0.0.0", "") else "127.0.0.1",
                                    int(port))
                    return
            time.sleep(0.05)
        raise TimeoutError(f"fastcluster run: {want or 'all'} workers not listening after "
                           f"{timeout} s (last status: {last!r}); its log:\n{self.log()}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM (graceful); SIGKILL to the process group after timeout.
        Returns the exit status; raises if a worker outlives the primary."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.status()  # remember the pids of the workers to check below
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        left = _alive(self._seen_pids, 5.0)
        if left:
            raise AssertionError(f"fastcluster_server: workers {left} outlived the primary")
        return self.process.returncode


def _alive(pids: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = sorted(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        if alive:
            time.sleep(0.02)
    return alive


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def start_server(app: Any, *, workers: int | None = 2, policy: str | None = "rr",
                 args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 cwd: str | None = None, workdir: str | None = None,
                 timeout: float = START_TIMEOUT, wait: bool = True) -> ClusterServer:
    """Starts `python -m fastcluster run app` on 127.0.0.1 port 0 and waits
    until its workers listen. workers/policy None: not given as flags (the
    environment or a config file in args decides). workdir holds the status
    socket and log."""
    ref = _ref(app)
    workdir = workdir or tempfile.mkdtemp(prefix="fastcluster-")
    status_socket = os.path.join(workdir, "status.sock")
    log_path = os.path.join(workdir, "server.log")
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p])
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "fastcluster", "run", ref, "--bind", "127.0.0.1:0",
           "--status-socket", status_socket]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if policy is not None:
        cmd += ["--policy", policy]
    cmd += list(args)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=full_env, cwd=cwd, start_new_session=True)
    server = ClusterServer(proc, status_socket, log_path, workers)
    if wait:
        try:
            server.wait_ready(timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                server.stop(timeout=2.0)
            raise
    return server


@pytest.fixture
def fastcluster_server(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[Callable[..., ClusterServer]]:
    """A factory: fastcluster_server(app, workers=2, policy="rr", args=(), env=None)
    -> ClusterServer (address, url, status(), log(), signal(), stop())."""
    started: list[ClusterServer] = []

    def start(app: Any, **kwargs: Any) -> ClusterServer:
        kwargs.setdefault("workdir", str(tmp_path_factory.mktemp("fastcluster")))
        server = start_server(app, **kwargs)
        started.append(server)
        return server

    yield start
    problems = []
    for server in started:
        try:
            server.stop()
        except AssertionError as e:
            problems.append(str(e))
    if problems:
        pytest.fail("; ".join(problems))
