"""Helpers for the fault tests (tests/test_faults*.py): a bounded client load
in threads, one-shot requests that never raise, and /proc readings of
another process (children, fds, CPU time).

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time

# A worker that serves HTTP/1.0 through the cluster and names itself: the
# response body is its pid. Scripts paste it in (it needs PORT in the env).
HTTP_SERVER = """
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import fastcluster as cluster

class PidHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

def serve_http(port):
    server = ThreadingHTTPServer(("127.0.0.1", port), PidHandler, bind_and_activate=False)
    server.daemon_threads = True
    cluster.listen_server(server)
    cluster.worker.send("serving")
    server.serve_forever()
"""


def request(port: int, timeout: float = 5.0) -> tuple[bool, str]:
    """One GET with Connection: close. (True, worker pid) or (False, why)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        return False, type(e).__name__
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200 ") or not body.isdigit():
        return False, "empty" if not data else "bad reply"
    return True, body.decode()


class Load:
    """Client threads doing request() in a loop until stop() (or their
    count/time bound). Tallies: ok, failed (by reason), replies per pid."""

    def __init__(self, port: int, threads: int = 4, max_each: int = 20000,
                 max_seconds: float = 30.0, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.max_each = max_each
        self.deadline = time.monotonic() + max_seconds
        self.ok = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.pids: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    @property
    def attempted(self) -> int:
        with self._lock:
            return self.ok + sum(self.failed.values())

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        for _ in range(self.max_each):
            if self._stop.is_set() or time.monotonic() > self.deadline:
                return
            ok, what = request(self.port, self.timeout)
            with self._lock:
                if ok:
                    self.ok += 1
                    self.pids[what] += 1
                else:
                    self.failed[what] += 1

    def stop(self) -> Load:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self._threads), "client threads hang"
        return self


def children(pid: int) -> list[int]:
    """The live (not zombie) child processes of pid. Every process's parent is
    read from /proc/<pid>/stat: /proc/<pid>/task/*/children is documented as
    unreliable while children come and go (a rolling restart's read once
    missed one of its four new workers)."""
    out: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] not in ("Z", "X"):
            out.append(int(name))
    return sorted(out)


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(cond: object, timeout: float, step: float = 0.02) -> bool:
    """Polls cond() until it is true or timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():  # type: ignore[operator]
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
