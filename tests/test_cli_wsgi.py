"""WSGI through `fastcluster run` on a real HTTP/1.1 stack (uvicorn's
protocols with a2wsgi), each defect of the wsgiref server it replaced tested
with real clients: curl, and raw sockets where the bytes on the wire matter
(pipelining, Expect: 100-continue, HEAD).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from typing import Any, BinaryIO

import pytest

from fastcluster.pytest_plugin import ClusterServer, fastcluster_server  # noqa: F401

APP = "cli_apps:wsgi_probe"
needs_curl = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed (apt-get install -y curl)")


def raw(server: ClusterServer) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=5)


def read_response(f: BinaryIO, head: bool = False) -> tuple[str, dict[str, str], bytes]:
    """One response off a connection: status line, headers (lower-case), body."""
    status = f.readline().decode().rstrip("\r\n")
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b"" if head else f.read(int(headers.get("content-length", "0")))
    return status, headers, body


def probe(server: ClusterServer, path: str = "/echo", headers: str = "") -> dict[str, Any]:
    with raw(server) as s, s.makefile("rb") as f:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
                  .encode())
        status, _, body = read_response(f)
    assert status == "HTTP/1.1 200 OK", status
    doc: dict[str, Any] = json.loads(body)
    return doc


@needs_curl
def test_chunked_request_body_reaches_the_app(fastcluster_server: Any) -> None:
    server = fastcluster_server(APP, workers=1)
    data = "chunk " * 2000  # 12 kB
    out = subprocess.run(["curl", "-sS", "--max-time", "5", "-H", "Transfer-Encoding: chunked",
                          "-H", "Expect:", "--data-binary", data, f"{server.url}/up"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["body"] == data  # wsgiref gave the app 0 bytes
    # werkzeug (Flask) reads a body without Content-Length only when the
    # server says it ends by itself (PEP 3333's extension; gunicorn sets it)
    assert doc["input_terminated"] is True
    assert server.stop() == 0


def test_expect_100_continue_is_answered_before_the_body(fastcluster_server: Any) -> None:
    server = fastcluster_server(APP, workers=1)
    with raw(server) as s, s.makefile("rb") as f:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        s.settimeout(1.0)  # curl waits 1 s for it, then sends anyway
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert f.readline() == b"\r\n"
        s.settimeout(5)
        s.sendall(b"hello")
        status, _, body = read_response(f)
    assert status == "HTTP/1.1 200 OK" and json.loads(body)["body"] == "hello"
    if shutil.which("curl"):  # curl's own upload (it sends Expect for > 1 kB) is not held up
        t0 = time.monotonic()
        out = subprocess.run(["curl", "-sS", "--max-time", "5", "--data-binary", "x" * 5000,
                              f"{server.url}/up"], capture_output=True, text=True, timeout=10)
        assert out.returncode == 0 and len(json.loads(out.stdout)["body"]) == 5000
        assert time.monotonic() - t0 < 0.9, "curl waited out its 1 s Expect timeout"
    assert server.stop() == 0


def test_head_has_no_body_and_keep_alive_pipelining_work(fastcluster_server: Any) -> None:
    server = fastcluster_server(APP, workers=1)
    with raw(server) as s, s.makefile("rb") as f:
        # three requests in one write: HEAD, GET, GET; answered in order on
        # one HTTP/1.1 connection, the HEAD without its body
        s.sendall(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(f, head=True)
        assert status == "HTTP/1.1 200 OK" and int(headers["content-length"]) > 0
        for path in ("/b", "/c"):  # no HEAD body in front of these
            status, headers, body = read_response(f)
            assert status == "HTTP/1.1 200 OK", status
            assert json.loads(body)["path_info"] == path
            assert json.loads(body)["protocol"] == "HTTP/1.1"
            assert headers.get("connection", "keep-alive") != "close"
        s.sendall(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n")  # still open: keep-alive
        assert json.loads(read_response(f)[2])["path_info"] == "/d"
    assert server.stop() == 0


def test_the_workers_environment_is_not_in_the_request_environ(fastcluster_server: Any
                                                               ) -> None:
    server = fastcluster_server(APP, workers=1, env={"CLI_TEST_SECRET": "s3cret-1234"})
    doc = probe(server)
    assert doc["secret_seen"] is False  # wsgiref copied all of os.environ in
    assert server.stop() == 0


def test_a_hop_by_hop_header_from_the_app_is_dropped_and_logged_once(
        fastcluster_server: Any) -> None:
    server = fastcluster_server(APP, workers=1)
    for _ in range(3):
        with raw(server) as s, s.makefile("rb") as f:
            s.sendall(b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, headers, body = read_response(f)
        assert status == "HTTP/1.1 200 OK", status  # wsgiref: 500
        assert headers["x-app"] == "probe" and json.loads(body)["path_info"] == "/hop"
        assert "upgrade" not in headers and headers.get("keep-alive") != "timeout=99"
    log = server.log()
    assert log.count("hop-by-hop header 'Keep-Alive: timeout=99'") == 1, log
    assert log.count("hop-by-hop header 'Upgrade: h2c'") == 1, log
    assert server.stop() == 0


def test_root_path_sets_script_name(fastcluster_server: Any) -> None:
    server = fastcluster_server(APP, workers=1, args=("--root-path", "/api"))
    doc = probe(server, "/users/7")  # the proxy stripped /api (uvicorn's model)
    assert (doc["script_name"], doc["path_info"]) == ("/api", "/users/7")
    assert server.stop() == 0


@pytest.mark.parametrize(("allow", "scheme", "remote"), [
    ("127.0.0.1", "https", "203.0.113.9"), ("192.0.2.1", "http", "127.0.0.1")])
def test_x_forwarded_proto_reaches_url_scheme_from_trusted_proxies(
        fastcluster_server: Any, allow: str, scheme: str, remote: str) -> None:
    server = fastcluster_server(APP, workers=1, args=("--forwarded-allow-ips", allow))
    doc = probe(server, headers="X-Forwarded-Proto: https\r\n"
                                "X-Forwarded-For: 203.0.113.9\r\n")
    assert (doc["scheme"], doc["remote_addr"]) == (scheme, remote)
    assert server.stop() == 0


def test_a_client_that_stops_sending_its_body_frees_the_thread(fastcluster_server: Any
                                                               ) -> None:
    server = fastcluster_server(APP, workers=1, args=("--threads", "1",
                                                      "--client-timeout", "1"))
    with raw(server) as s, s.makefile("rb") as f:
        t0 = time.monotonic()
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf!")
        status, _, _ = read_response(f)  # the app's read gave up: a 500, not a held thread
        assert status == "HTTP/1.1 500 Internal Server Error", status
        assert 0.9 < time.monotonic() - t0 < 4
    assert probe(server)["path_info"] == "/echo"  # the one thread serves again
    assert "no more of the request body for 1.0 s (--client-timeout)" in server.log()
    assert server.stop() == 0
