"""WebSockets through `fastcluster run`, with a real client (the websockets
package): a connection upgraded to a WebSocket is counted open until its
socket closes, and a graceful stop, a rolling restart or a max_requests
recycle sends every open WebSocket close code 1012 at once, so the workers
exit by themselves (lifespan shutdown, no SIGKILL) long before
graceful_timeout. Also the --ws* flags.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli, get, totals

from fastcluster.pytest_plugin import ClusterServer, fastcluster_server  # noqa: F401

websockets = pytest.importorskip("websockets", reason="the WebSocket tests need the websockets "
                                 "client (pip install websockets: in the test extra)")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

GRACE = "20"  # --graceful-timeout: the workers must be gone well before it


def ws_connect(server: ClusterServer, path: str = "/ws") -> ClientConnection:
    return connect(f"ws://{server.host}:{server.port}{path}", open_timeout=5,
                   close_timeout=2)


def echo(ws: ClientConnection, text: str = "hi") -> int:
    """Sends text, checks the echo; the pid of the worker that answered."""
    ws.send(text)
    pid, got = str(ws.recv(timeout=5)).split(" ", 1)
    assert got == text
    return int(pid)


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def close_code(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """The close code the server sent (the WebSocket must end within timeout)."""
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=timeout)
    return None if info.value.rcvd is None else info.value.rcvd.code


def events(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(("ws_impl", "http"), [("websockets-sansio", "httptools"),
                                               ("websockets", "h11")])
@pytest.mark.parametrize("policy", ["rr", "least"])
def test_a_closed_websocket_is_no_longer_counted_open(fastcluster_server: Any, policy: str,
                                                      ws_impl: str, http: str) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=1, policy=policy,
                                args=("--ws", ws_impl, "--http", http))
    with ws_connect(server) as ws:
        echo(ws)
        assert totals(server.status(), "open") == 1
        with ws_connect(server) as second:
            echo(second)
            assert totals(server.status(), "open") == 2
        assert wait_until(lambda: totals(server.status(), "open") == 1), server.status()
    assert wait_until(lambda: totals(server.status(), "open") == 0), server.status()
    assert get(server)[0] == 200  # plain HTTP beside it is counted as before
    assert wait_until(lambda: totals(server.status(), "open") == 0), server.status()
    assert server.stop() == 0


@pytest.mark.parametrize("policy", ["rr", "shared"])
def test_sigterm_sends_1012_and_workers_exit_by_themselves(fastcluster_server: Any,
                                                           tmp_path: Path, policy: str) -> None:
    log = tmp_path / "events"
    server = fastcluster_server("cli_apps:asgi_app", workers=2, policy=policy,
                                args=("--graceful-timeout", GRACE),
                                env={"CLI_TEST_EVENTS": str(log)})
    pids = set(server.worker_pids())
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(ws_connect(server)) for _ in range(4)]
        served = {echo(ws) for ws in clients}
        assert served <= pids and (policy != "rr" or served == pids)
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        assert [close_code(ws) for ws in clients] == [1012] * 4
        assert time.monotonic() - t0 < 2  # within the drain tick, not a timeout
        assert server.process.wait(10) == 0
        assert time.monotonic() - t0 < 5, "the workers waited for graceful_timeout"
    text = server.log()
    assert "SIGKILL" not in text and "graceful_timeout" not in text, text
    done = events(log)
    assert sorted(int(p) for e, p in done if e == "shutdown") == sorted(pids)  # lifespan
    assert sum(1 for e, _ in done if e == "ws-disconnect-1012") == 4  # the app was told
    assert server.stop() == 0


@pytest.mark.parametrize("trigger", ["SIGHUP", "max_requests"])
def test_rolling_restart_and_recycling_send_1012_and_old_worker_exits(
        fastcluster_server: Any, tmp_path: Path, trigger: str) -> None:
    log = tmp_path / "events"
    args = ["--graceful-timeout", GRACE]
    if trigger == "max_requests":
        args += ["--max-requests", "3"]
    server = fastcluster_server("cli_apps:asgi_app", workers=1, args=tuple(args),
                                env={"CLI_TEST_EVENTS": str(log)})
    old = server.worker_pids()[0]
    with ws_connect(server) as ws:
        assert echo(ws) == old
        t0 = time.monotonic()
        if trigger == "SIGHUP":
            server.signal(signal.SIGHUP)
        else:  # HTTP requests until another worker answers (its replacement)
            deadline = time.monotonic() + 10
            while get(server)[1].split()[1] == str(old) and time.monotonic() < deadline:
                pass
        assert close_code(ws, timeout=10) == 1012
        assert time.monotonic() - t0 < 5
    assert wait_until(lambda: ["shutdown", str(old)] in events(log), 5), events(log)
    assert wait_until(lambda: old not in server.worker_pids(), 5)
    text = server.log()
    assert "SIGKILL" not in text and "graceful_timeout" not in text, text
    assert f"(pid {old}) exited with status 0 (asked)" in text, text
    with ws_connect(server) as ws:  # the replacement serves WebSockets
        assert echo(ws) != old
    assert server.stop() == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed "
                    "(apt-get install -y openssl)")
def test_websocket_over_tls_is_counted_and_closed_with_1012(fastcluster_server: Any,
                                                            tmp_path: Path) -> None:
    # the TLS transport is the one uvicorn's upgrade hands over (get_protocol)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                                      "--graceful-timeout", GRACE))
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    url = f"wss://{server.host}:{server.port}/ws"
    with connect(url, ssl=ctx, open_timeout=5, close_timeout=2) as ws:
        echo(ws)
        assert totals(server.status(), "open") == 1
    assert wait_until(lambda: totals(server.status(), "open") == 0), server.status()
    with connect(url, ssl=ctx, open_timeout=5, close_timeout=2) as ws:
        echo(ws)
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        assert close_code(ws) == 1012
    assert server.process.wait(10) == 0 and time.monotonic() - t0 < 5
    assert server.stop() == 0


def test_ws_flags_reach_uvicorn_and_bad_ones_are_named(fastcluster_server: Any) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--ws-max-size", "1000", "--ws-ping-interval", "0",
                                      "--ws-per-message-deflate", "false"))
    with ws_connect(server) as ws:
        echo(ws, "x" * 900)
        ws.send("x" * 2000)  # over --ws-max-size: uvicorn closes with 1009 (too big)
        assert close_code(ws) == 1009
    server.stop()
    server = fastcluster_server("cli_apps:asgi_app", workers=1, args=("--ws", "none"))
    with pytest.raises(websockets.exceptions.InvalidStatus):  # no WebSockets: no upgrade
        ws_connect(server)
    assert server.stop() == 0
    bad = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", "--ws", "socketio")
    assert bad.returncode == 1 and "setting 'ws'" in bad.stderr and "wsproto" in bad.stderr
    bad = cli("run", "cli_apps:wsgi_app", "--bind", "127.0.0.1:0", "--ws-max-queue", "4")
    assert bad.returncode == 1 and "--ws-max-queue" in bad.stderr \
        and "WSGI" in bad.stderr, bad.stderr


def test_ws_implementation_not_installed_is_a_clear_error() -> None:
    try:
        import wsproto  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wsproto is installed here; the error is for a missing one")
    bad = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", "--ws", "wsproto")
    assert bad.returncode == 1, bad.stderr
    assert "--ws wsproto: wsproto is not installed" in bad.stderr, bad.stderr
