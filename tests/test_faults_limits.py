"""Resource exhaustion (issue E): RLIMIT_NOFILE lowered in the primary and
in a worker, through the public API. Service degrades (connections shed or
served elsewhere, a respawn put off), never spins (CPU time from /proc over
a quiet window), and recovers; nothing crashes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from _faults import HTTP_SERVER, children, cpu_seconds, request, wait_until
from _helpers import env, free_port, running, script  # noqa: F401

PRIMARY_LOW = HTTP_SERVER + """
import resource, signal

if cluster.is_primary:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    tight = []

    def tighten(*args):
        # no room at all: the lowest free fd number becomes the limit
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd, hard))
        tight.append(fd)
        os.write(1, b"tight\\n")

    def relax(*args):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        tight.clear()
        os.write(1, b"relaxed\\n")

    def on_exit(w, code, sig):
        print("exit", w.pid, code, sig, flush=True)
        if tight:  # a dead worker's channels freed fds: take that room away too
            tighten()

    signal.signal(signal.SIGUSR1, tighten)
    signal.signal(signal.SIGUSR2, relax)
    cluster.setup_primary(respawn=True)
    cluster.on("message", lambda w, m: print(m, w.pid, flush=True))
    cluster.on("exit", on_exit)
    for _ in range(2):
        cluster.fork()
    cluster.run()
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_primary_out_of_fds_sheds_backs_off_and_recovers(tmp_path: Path,
                                                          env: dict[str, str]) -> None:
    path = script(tmp_path, PRIMARY_LOW)
    port = free_port()
    results: list[tuple[bool, str]] = []

    def one() -> None:
        results.append(request(port, timeout=20))

    with running(path, dict(env, PORT=str(port))) as r:
        first = [int(ln.split()[1]) for ln in r.wait_for("serving", 2)]
        assert request(port)[0]
        r.signal(signal.SIGUSR1)
        r.wait_for("tight")
        burst = [threading.Thread(target=one) for _ in range(50)]
        for t in burst:
            t.start()
        time.sleep(0.3)
        cpu0 = cpu_seconds(r.pid)
        time.sleep(1.0)
        exhausted_cpu = cpu_seconds(r.pid) - cpu0
        shed_while_tight = len(results)
        os.kill(first[0], signal.SIGKILL)  # its replacement cannot be made without fds
        r.wait_for(f"exit {first[0]} None SIGKILL")
        r.wait_for("tight", 2)
        r.wait_for("fastcluster: respawn failed", timeout=10)
        r.signal(signal.SIGUSR2)
        r.wait_for("relaxed")
        for t in burst:
            t.join(30)
        # the replacement comes once fds are back; then both serve
        assert wait_until(lambda: len(children(r.pid)) == 2, 10), children(r.pid)
        r.wait_for("serving", 3, timeout=10)
        after = [request(port) for _ in range(50)]
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    served = sum(ok for ok, _ in results)
    shed = [why for ok, why in results if not ok]
    # every connection was served or shed (closed at once: an answer, not a hang)
    assert len(results) == 50
    assert set(shed) <= {"empty", "ConnectionResetError"}, shed
    assert 1 <= shed_while_tight <= len(shed) <= 25, (served, shed)
    assert exhausted_cpu < 0.05, exhausted_cpu  # backs off, never spins
    assert all(ok for ok, _ in after), after
    assert len({pid for _, pid in after}) == 2 and str(first[0]) not in {p for _, p in after}
    assert sorted(ln.split()[2:] for ln in out if ln.startswith("exit ")) == [
        ["0", "None"], ["0", "None"], ["None", "SIGKILL"]]
    assert "respawn failed" in "\n".join(out)
    print(f"primary EMFILE: 50 connections while out of fds, {len(shed)} shed, "
          f"{served} served once fds were back; 50 after, "
          f"{sum(not ok for ok, _ in after)} failed; primary CPU while exhausted "
          f"{exhausted_cpu:.3f} s over 1 s")


WORKER_LOW = HTTP_SERVER + """
import resource

if cluster.is_primary:
    cluster.setup_primary(respawn=True, graceful_timeout=20)
    cluster.on("message", lambda w, m: print(m, w.pid, w.id, flush=True))
    cluster.on("fork", lambda w: print("fork", w.id, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.pid, code, sig, flush=True))
    cluster.fork({"ROLE": "low"})
    cluster.fork({"ROLE": "normal"})
    cluster.run()
else:
    if os.environ["ROLE"] == "low":
        used = len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + int(os.environ["ROOM"]), hard))
    serve_http(int(os.environ["PORT"]))
"""


def _ask(sock: socket.socket) -> tuple[bool, str]:
    """One GET on an open connection: (True, pid) or (False, why)."""
    try:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        return False, type(e).__name__
    body = data.partition(b"\r\n\r\n")[2]
    return (True, body.decode()) if body.isdigit() else (False, "empty")


@pytest.mark.parametrize("room", [12, 60])
def test_worker_at_its_fd_limit_loses_nothing_and_is_replaced_at_once(
        tmp_path: Path, env: dict[str, str], room: int) -> None:
    # A worker whose main leaves it `room` free fds. It sizes its window to
    # them (the primary sends it no batch it cannot hold; with 60, a window
    # of 44 halved as the fds run out), and when what its channel holds no
    # longer fits it hands that back and leaves: its replacement is forked
    # at once, not when its idle connections end. Before: a batch cut short
    # (EMSGSIZE) lost its connections, and the worker lingered with no
    # replacement until graceful_timeout.
    path = script(tmp_path, WORKER_LOW)
    port = free_port()
    idle: list[socket.socket] = []
    try:
        with running(path, dict(env, PORT=str(port), ROOM=str(room))) as r:
            first = {int(ln.split()[2]): int(ln.split()[1]) for ln in r.wait_for("serving", 2)}
            low_pid, normal_pid = first[1], first[2]
            t0 = time.monotonic()
            # connections that never send: threads hold them, their fds stay open
            for _ in range(room * 5 + 90):  # paced, so that round robin reaches the low one
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                if any(ln.startswith("fork 3") for ln in r.seen) and len(idle) >= 40:
                    break
                r.readline(0.01)
            r.wait_for("fork 3", timeout=5)  # the low worker's replacement, idle still open
            replaced_in = time.monotonic() - t0
            time.sleep(0.5)
            cpu0 = cpu_seconds(r.pid)
            time.sleep(1.0)
            quiet_cpu = cpu_seconds(r.pid) - cpu0
            answers = [_ask(s) for s in idle]  # every one of them reached a worker
            for s in idle:
                s.close()
            idle.clear()
            r.wait_for(f"exit {low_pid} ", timeout=10)  # it finished what it held
            after = [request(port) for _ in range(20)]
            r.signal(signal.SIGTERM)
            code, out = r.finish(timeout=25)
    finally:
        for s in idle:
            s.close()
    text = "\n".join(out)
    assert code == 0, out
    lost = [why for ok, why in answers if not ok]
    assert not lost, (lost, text)
    served_low = sum(1 for ok, pid in answers if ok and pid == str(low_pid))
    assert 1 <= served_low <= room, served_low
    assert replaced_in < 5
    assert quiet_cpu < 0.05, quiet_cpu
    assert all(ok for ok, _ in after), after
    assert str(low_pid) not in {pid for _, pid in after}
    assert str(normal_pid) in {pid for _, pid in after}
    assert "worker out of fds" in text and "taking no more connections" in text
    assert "at its fd limit: it leaves" in text and "replacing it now" in text
    assert "EMSGSIZE" not in text and "did not fit" not in text
    print(f"worker at its fd limit ({room} free): {len(answers)} idle connections, "
          f"{len(lost)} lost, the low worker "
          f"served {served_low} and was replaced in {replaced_in:.2f} s; primary CPU over "
          f"1 s {quiet_cpu:.3f} s")


TINY_RSS = HTTP_SERVER + """
import time

if cluster.is_primary:
    cluster.setup_primary(max_rss=1 << 20)  # 1 MiB: every fresh worker is over it
    cluster.on("fork", lambda w: print("fork", w.id, flush=True))
    for _ in range(2):
        cluster.fork()
    cluster.run()
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_max_rss_below_a_fresh_worker_warns_and_backs_off(tmp_path: Path,
                                                          env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, TINY_RSS), dict(env, PORT=str(port))) as r:
        r.wait_for("fork 2", timeout=10)
        time.sleep(6.0)
        ok, _by = request(port)
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=20)
    forks = [ln for ln in out if ln.startswith("fork ")]
    assert ok
    assert len(forks) <= 6, f"{len(forks)} forks in 6 s:\n" + "\n".join(out)
    logged = "\n".join(out)
    assert "already over max_rss" in logged, logged
    assert "is below the primary's own" in logged, logged
    print(f"max_rss 1 MiB: {len(forks)} forks in 6 s")
