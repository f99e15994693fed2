"""Helpers for the Node-scenario tests: run a small cluster script in a
subprocess, read its output lines with deadlines, make HTTP requests.

Every wait here is bounded in time; every loop in count.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(python_env: dict[str, str]) -> dict[str, str]:
    """python_env, block-buffered: a print(..., flush=True) is then one
    write, so lines from the primary and its workers never mix mid-line."""
    out = dict(python_env)
    out.pop("PYTHONUNBUFFERED", None)
    out.pop("FASTCLUSTER_POLICY", None)
    return out


def script(tmp_path: Path, body: str, name: str = "scenario.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run(path: Path, env: dict[str, str], timeout: float = 15.0,
        args: tuple[str, ...] = (), prefix: tuple[str, ...] = ()
        ) -> subprocess.CompletedProcess[str]:
    """Runs a script to its end (under prefix, a command such as setpriv, if
    given); kills it (and fails) after timeout."""
    return subprocess.run([*prefix, sys.executable, str(path), *args], env=env,
                          cwd=path.parent, capture_output=True, text=True, timeout=timeout)


def lines(out: str, prefix: str = "") -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(prefix)]


class Running:
    """A script running in the background, read line by line with deadlines."""

    def __init__(self, path: Path, env: dict[str, str], args: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, str(path), *args], env=env,
                                     cwd=path.parent, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdout is not None
        self._fd = self.proc.stdout.fileno()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._fd, selectors.EVENT_READ)
        self._buf = b""
        self._eof = False
        self.seen: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str | None:
        """The next line, or None on timeout or end of output."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if self._eof or left <= 0 or not self._sel.select(left):
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self._eof = True
                if self._buf:
                    self._buf += b"\n"
                continue
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        self.seen.append(line.decode(errors="replace"))
        return self.seen[-1]

    def wait_for(self, prefix: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """The first `count` lines starting with prefix (fails on timeout/EOF)."""
        deadline = time.monotonic() + timeout
        found = [ln for ln in self.seen if ln.startswith(prefix)]
        while len(found) < count:
            left = deadline - time.monotonic()
            line = self.readline(max(0.0, left)) if left > 0 else None
            if line is None:
                raise AssertionError(f"waited for {count} x {prefix!r}; output so far:\n"
                                     + "\n".join(self.seen))
            if line.startswith(prefix):
                found.append(line)
        return found[:count]

    def finish(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        """Reads to the end of output (every process holding it gone) and
        waits for exit; returns (status, all lines)."""
        deadline = time.monotonic() + timeout
        while not self._eof and time.monotonic() < deadline:
            self.readline(deadline - time.monotonic())
        try:
            code = self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("script did not exit; output:\n" + "\n".join(self.seen))
        self.close()
        return code, self.seen

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)

    def close(self) -> None:
        self._sel.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def running(path: Path, env: dict[str, str], args: tuple[str, ...] = (),
            prefix: tuple[str, ...] = ()) -> Iterator[Running]:
    """Running(...) (under prefix, a command such as setpriv, if given), killed at the end."""
    r = Running(path, env, args, prefix)
    try:
        yield r
    finally:
        if r.proc.poll() is None:
            r.kill()
        r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str = "/", timeout: float = 3.0,
             host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with Connection: close; (status, headers, body)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    first, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(first.split()[1]), headers, body


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Waits until none of pids is alive; returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_alive(p)]
        if alive:
            time.sleep(0.02)
    return alive
