"""Hang detection (issue C): a worker whose serving loop stops beating for
`timeout` seconds is SIGABRTed (then SIGKILLed) and replaced; a side thread
that keeps answering does not make it look alive; healthy and booting
workers are left alone; a bad `timeout` is a clear error.

Times come from the processes themselves (time.monotonic() is
CLOCK_MONOTONIC, one clock for all of them): the worker prints when its
handler starts blocking, the primary when it reaps the worker and when the
replacement listens.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from _helpers import env, free_port, http_get, run, running, script  # noqa: F401

TIMEOUT = 1.0

CLUSTER = """
    import asyncio, os, signal, sys, threading, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    import fastcluster as cluster
    import fastcluster.aio

    PORT = int(os.environ["PORT"])

    def out(*args):
        print(*args, flush=True)

    if cluster.is_primary:
        timeout = os.environ.get("TIMEOUT", "1.0")
        cluster.setup_primary(timeout=None if timeout == "None" else float(timeout),
                              respawn=True, start_method=os.environ.get("START", "fork"))
        cluster.on("listening", lambda w, a: out("listening", w.id, w.pid, time.monotonic()))
        cluster.on("exit", lambda w, code, sig: out("exit", w.id, w.pid, code, sig,
                                                    time.monotonic()))
        cluster.on("message", lambda w, m: out("message", w.pid, m, time.monotonic()))
        for kind in os.environ["KINDS"].split(","):
            cluster.fork({"KIND": kind})
        out("primary up")
        cluster.run()
        out("primary done")
        sys.exit(0)

    KIND = os.environ["KIND"]

    def block():
        out("blocking", os.getpid(), time.monotonic())
        time.sleep(60)

    async def handle(reader, writer):
        line = await reader.readline()
        while (await reader.readline()) not in (b"\\r\\n", b""):
            pass
        if b"/block" in line:
            if KIND == "aio_stubborn":
                signal.signal(signal.SIGABRT, signal.SIG_IGN)  # survives SIGABRT
            block()  # the whole loop stops here
        body = str(os.getpid()).encode()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n"
                     % len(body) + body)
        await writer.drain()
        writer.close()

    async def serve_aio():
        server = await cluster.aio.start_server(handle, ("127.0.0.1", PORT))
        async with server:
            await server.serve_forever()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/block":
                block()
            body = str(os.getpid()).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    def http_server():
        server = HTTPServer(("127.0.0.1", PORT), Handler, bind_and_activate=False)
        return cluster.listen_server(server)

    def chatter():
        while True:  # a side thread that answers all along: must not count
            cluster.worker.send("tick")
            time.sleep(0.1)

    if KIND in ("aio", "aio_stubborn"):
        asyncio.run(serve_aio())
    elif KIND == "aio_chatty":
        threading.Thread(target=chatter, daemon=True).start()
        asyncio.run(serve_aio())
    elif KIND == "http":
        http_server().serve_forever()
    elif KIND == "http_thread":  # serve_forever in a thread, main in cluster.run()
        threading.Thread(target=http_server().serve_forever, daemon=True).start()
        cluster.run()
    elif KIND == "run":  # nothing but cluster.run() on the main thread
        cluster.run()
    elif KIND == "slow_boot":  # longer than the timeout before it serves
        time.sleep(2.5)
        asyncio.run(serve_aio())
"""


def _fields(line: str) -> list[str]:
    return line.split()


def _hang_and_replace(tmp_path: Path, env: dict[str, str], kind: str,
                      start: str = "fork") -> dict[str, float]:
    """One worker of `kind`; a request blocks its serving loop. Returns the
    measured latencies after checking it was aborted and replaced."""
    port = free_port()
    path = script(tmp_path, CLUSTER)
    with running(path, dict(env, PORT=str(port), KINDS=kind, START=start,
                            TIMEOUT=str(TIMEOUT))) as r:
        first = _fields(r.wait_for("listening", timeout=15)[0])
        old_pid = int(first[2])
        status, _, body = http_get(port)
        assert status == 200 and int(body) == old_pid
        blocker = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            t_block = float(_fields(r.wait_for("blocking", timeout=5)[0])[2])
            exit_line = _fields(r.wait_for("exit", timeout=TIMEOUT + 5)[0])
            assert int(exit_line[2]) == old_pid
            assert exit_line[3] == "None" and exit_line[4] in ("SIGABRT", "SIGKILL"), exit_line
            t_exit = float(exit_line[5])
            second = _fields(r.wait_for("listening", count=2, timeout=15)[1])
        finally:
            blocker.close()
        new_pid = int(second[2])
        assert new_pid != old_pid
        status, _, body = http_get(port)
        assert status == 200 and int(body) == new_pid
        r.signal(15)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    assert "Current thread" in "\n".join(out) or "Thread 0x" in "\n".join(out), (
        "faulthandler printed no stack:\n" + "\n".join(out))
    figures = {"detected": t_exit - t_block, "replaced": float(second[3]) - t_block}
    print(f"{kind} ({start}): hang -> exit {figures['detected']:.3f} s, "
          f"hang -> replacement listening {figures['replaced']:.3f} s")
    return figures


@pytest.mark.parametrize("kind,start", [("aio", "fork"), ("http", "fork"), ("aio", "spawn")])
def test_hung_worker_detected_and_replaced(tmp_path: Path, env: dict[str, str], kind: str,
                                           start: str) -> None:
    figures = _hang_and_replace(tmp_path, env, kind, start)
    assert figures["detected"] > TIMEOUT * 0.9  # not before the timeout...
    assert figures["replaced"] < TIMEOUT + 1.0  # ...and replaced within timeout + 1 s


def test_sigkill_when_sigabrt_is_ignored(tmp_path: Path, env: dict[str, str]) -> None:
    """A hung worker that ignores SIGABRT is SIGKILLed ABORT_GRACE later."""
    from fastcluster.primary.watchdog import ABORT_GRACE

    port = free_port()
    path = script(tmp_path, CLUSTER)
    with running(path, dict(env, PORT=str(port), KINDS="aio_stubborn")) as r:
        r.wait_for("listening", timeout=15)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as blocker:
            blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            t_block = float(_fields(r.wait_for("blocking", timeout=5)[0])[2])
            exit_line = _fields(r.wait_for("exit", timeout=TIMEOUT + ABORT_GRACE + 5)[0])
            r.wait_for("listening", count=2, timeout=15)
        r.signal(15)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    assert exit_line[4] == "SIGKILL", exit_line
    assert any("survived SIGABRT; SIGKILL" in ln for ln in out), "\n".join(out)
    took = float(exit_line[5]) - t_block
    assert TIMEOUT + ABORT_GRACE * 0.9 < took < TIMEOUT + ABORT_GRACE + 1.0


def test_side_thread_answering_does_not_count(tmp_path: Path, env: dict[str, str]) -> None:
    """The loop is blocked while a thread keeps sending messages (a reply
    from a thread is what uvicorn takes for life): still detected."""
    port = free_port()
    path = script(tmp_path, CLUSTER)
    with running(path, dict(env, PORT=str(port), KINDS="aio_chatty")) as r:
        r.wait_for("listening", timeout=15)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as blocker:
            blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            t_block = float(_fields(r.wait_for("blocking", timeout=5)[0])[2])
            exit_line = _fields(r.wait_for("exit", timeout=TIMEOUT + 5)[0])
            r.wait_for("listening", count=2, timeout=15)
        r.signal(15)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    assert exit_line[4] in ("SIGABRT", "SIGKILL"), exit_line
    t_exit = float(exit_line[5])
    old_pid = exit_line[2]
    during = [ln for ln in out if ln.startswith(f"message {old_pid} tick")
              and t_block < float(ln.split()[3]) < t_exit]
    assert len(during) >= 3, "the side thread did not keep answering:\n" + "\n".join(out)
    assert t_exit - t_block < TIMEOUT + 1.0


def test_serve_forever_thread_beside_cluster_run(tmp_path: Path, env: dict[str, str]) -> None:
    """The main thread waits in cluster.run() (it beats); the http.server in
    a thread blocks: the oldest beat counts, so the worker is still caught."""
    port = free_port()
    path = script(tmp_path, CLUSTER)
    with running(path, dict(env, PORT=str(port), KINDS="http_thread")) as r:
        r.wait_for("listening", timeout=15)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as blocker:
            blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            t_block = float(_fields(r.wait_for("blocking", timeout=5)[0])[2])
            exit_line = _fields(r.wait_for("exit", timeout=TIMEOUT + 5)[0])
            r.wait_for("listening", count=2, timeout=15)
        r.signal(15)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    assert exit_line[4] in ("SIGABRT", "SIGKILL"), exit_line
    assert float(exit_line[5]) - t_block < TIMEOUT + 1.0


def test_healthy_and_booting_workers_are_left_alone(tmp_path: Path,
                                                    env: dict[str, str]) -> None:
    """Idle asyncio, http.server and cluster.run() workers, and one that
    boots for longer than the timeout: nobody is killed over 4 timeouts."""
    port = free_port()
    path = script(tmp_path, CLUSTER)
    kinds = "aio,http,run,slow_boot"
    with running(path, dict(env, PORT=str(port), KINDS=kinds)) as r:
        r.wait_for("listening", count=3, timeout=15)  # slow_boot listens after 2.5 s
        deadline = time.monotonic() + 4 * TIMEOUT
        while time.monotonic() < deadline:
            r.readline(deadline - time.monotonic())
        pids = set()
        for _ in range(9):
            status, _, body = http_get(port)
            assert status == 200
            pids.add(int(body))
        assert len(pids) == 3  # aio, http and the slow booter all serve
        r.signal(15)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    exits = [ln for ln in out if ln.startswith("exit")]
    assert all(ln.split()[3] == "0" for ln in exits), "\n".join(out)  # only the final TERM
    assert not [ln for ln in out if "hung" in ln], "\n".join(out)


def test_timeout_off_leaves_a_blocked_worker(tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    path = script(tmp_path, CLUSTER)
    with running(path, dict(env, PORT=str(port), KINDS="aio", TIMEOUT="None")) as r:
        r.wait_for("listening", timeout=15)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as blocker:
            blocker.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
            r.wait_for("blocking", timeout=5)
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                r.readline(deadline - time.monotonic())
        assert not [ln for ln in r.seen if ln.startswith("exit")], "\n".join(r.seen)
        r.kill()


def test_bad_timeout_is_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        for value in (-1, 0.1, 10**6, float("nan"), "30", True, [1]):
            try:
                cluster.setup_primary(timeout=value)
            except (TypeError, ValueError) as e:
                print(type(e).__name__, e, flush=True)
            else:
                print("accepted", repr(value), flush=True)
        for value in (0, None, 0.5, 30):
            cluster.setup_primary(timeout=value)
            print("ok", repr(cluster.settings["timeout"]), flush=True)
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    got = proc.stdout.splitlines()
    allowed = "None or 0 (off), or a number of seconds from 0.5 to 86400"
    assert got[:7] == [
        f"ValueError setting 'timeout' must be {allowed}, got -1",
        f"ValueError setting 'timeout' must be {allowed}, got 0.1",
        f"ValueError setting 'timeout' must be {allowed}, got 1000000",
        f"ValueError setting 'timeout' must be {allowed}, got nan",
        f"TypeError setting 'timeout' must be {allowed}, got '30'",
        f"TypeError setting 'timeout' must be {allowed}, got True",
        f"TypeError setting 'timeout' must be {allowed}, got [1]",
    ]
    assert got[7:] == ["ok 0.0", "ok None", "ok 0.5", "ok 30.0"]
