"""Processes: free ports, /proc readings, starting and stopping a server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
HELLO_BODY = b"Hello from Cluster!\n"


def free_port() -> int:
    """A loopback TCP port nothing listens on now (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cpu:
    """One process's CPU so far: utime/stime in clock ticks (from stat), the
    scheduler's on-CPU nanoseconds (schedstat, user+system, fine-grained) and
    how many times it was put on a CPU (schedstat's timeslices: wake-ups)."""

    utime: int
    stime: int
    run_ns: int
    slices: int = 0

    def __sub__(self, o: Cpu) -> Cpu:
        return Cpu(self.utime - o.utime, self.stime - o.stime, self.run_ns - o.run_ns,
                   self.slices - o.slices)


def cpu(pid: int) -> Cpu | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        run_ns = slices = 0
        with contextlib.suppress(OSError), open(f"/proc/{pid}/schedstat") as f:
            ss = f.read().split()
            run_ns, slices = int(ss[0]), int(ss[2])
    except (OSError, IndexError, ValueError):
        return None
    return Cpu(int(fields[11]), int(fields[12]), run_ns, slices)


def children(pid: int) -> list[int]:
    """Direct children of pid (every thread's children list)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{t}/children") as f:
            out.extend(int(x) for x in f.read().split())
    return sorted(set(out))


HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def workers_of(pid: int) -> list[int]:
    """The children of a server's master that are workers (not helper processes
    such as multiprocessing's resource tracker, which uvicorn --workers starts)."""
    return [c for c in children(pid) if not any(h in comm(c) for h in HELPERS)]


def age(pid: int) -> float:
    """Seconds since pid started (from /proc: starttime vs uptime); -1 if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return -1.0
    return up - start / CLK_TCK


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def http_get(port: int, timeout: float = 1.0) -> bytes:
    """One HTTP/1.1 GET with Connection: close; the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
            if HELLO_BODY in b"".join(chunks):
                break
        return b"".join(chunks)


@dataclass
class Server:
    """A server started as a command line in its own session, stopped as a group."""

    name: str
    argv: Sequence[str]
    env: dict[str, str]
    port: int
    cwd: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    count_dir: Path | None = None
    first_response: bytes = b""
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{self.name}-")
        tmp = Path(self._tmp.name)
        self.count_dir = tmp / "counts"
        self.count_dir.mkdir()
        self.log_path = tmp / "server.log"
        env = dict(self.env, BENCH_COUNT_DIR=str(self.count_dir), PORT=str(self.port))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(list(self.argv), env=env, cwd=self.cwd or str(tmp),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def wait_ready(self, workers: int, counted: bool, timeout: float = 30.0) -> None:
        """Until it answers "Hello from Cluster!" and, for counting servers, every
        worker has announced itself (else until `workers` children exist)."""
        deadline = time.monotonic() + timeout
        answered = False
        while time.monotonic() < deadline:
            if not self.running():
                raise RuntimeError(f"{self.name} exited ({self.proc and self.proc.returncode})"
                                   f":\n{self.log_tail()}")
            if not answered:
                try:
                    self.first_response = http_get(self.port)
                    answered = HELLO_BODY in self.first_response
                except OSError:
                    pass
            if answered:
                n = len(self.worker_files()) if counted else len(workers_of(self.pid))
                if n >= workers:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f} s "
                           f"(answered={answered}):\n{self.log_tail()}")

    def worker_files(self) -> list[Path]:
        if self.count_dir is None:
            return []
        return [p for p in self.count_dir.iterdir() if p.name.startswith("w-")
                and not p.name.endswith(".tmp")]

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the whole group, SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        # stragglers that left the group are still ours if they hold the port
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
            except OSError:
                break
            time.sleep(0.1)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
