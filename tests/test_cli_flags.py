"""`fastcluster run`'s uvicorn/gunicorn flags through the real CLI, real
sockets and clients: response headers, proxy headers, request limits,
--limit-concurrency, files (--env-file, --pid), a flag given for the other
interface. Logging is in test_cli_logging.py, --reload in test_cli_reload.py.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli, get

from fastcluster.pytest_plugin import ClusterServer


def raw(server: ClusterServer, request: bytes) -> bytes:
    """Sends request on a fresh connection; everything until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def head_of(server: ClusterServer, path: str = "/", headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_header_server_header_and_date_header(fastcluster_server: Any) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=1)
    _, headers = head_of(server)
    assert headers["server"] == "uvicorn" and "date" in headers  # uvicorn's defaults
    assert server.stop() == 0
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--header", "X-Frame-Options: DENY", "--header",
                                      "X-Team:core", "--no-server-header", "--no-date-header"))
    status, headers = head_of(server)
    assert status == 200
    assert headers["x-frame-options"] == "DENY" and headers["x-team"] == "core"
    assert "server" not in headers and "date" not in headers
    assert server.stop() == 0
    bad = cli("run", "cli_apps:asgi_app", "--header", "no colon")
    assert bad.returncode == 1 and "setting 'header' (from --header) must be 'NAME:VALUE'" \
        in bad.stderr


def test_proxy_headers_and_no_proxy_headers(fastcluster_server: Any) -> None:
    fmt = "%(h)s %({x-forwarded-for}i)s"
    for flag, client in (("--proxy-headers", "10.9.8.7"), ("--no-proxy-headers", "127.0.0.1")):
        server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                    args=(flag, "--forwarded-allow-ips", "127.0.0.1",
                                          "--access-log-format", fmt))  # implies --access-log
        assert head_of(server, headers={"X-Forwarded-For": "10.9.8.7"})[0] == 200
        assert server.stop() == 0
        assert f"{client} 10.9.8.7" in server.log(), (flag, server.log())


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_request_line_and_header_limits_answer_400_and_431(fastcluster_server: Any,
                                                           http: str) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--http", http, "--limit-request-line", "100",
                                      "--limit-request-fields", "5",
                                      "--limit-request-field-size", "60"))
    ok = raw(server, b"GET /" + b"a" * 70 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 ")
    long_line = raw(server, b"GET /" + b"a" * 100 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert long_line.startswith(b"HTTP/1.1 400 Bad Request\r\n"), long_line
    assert b"--limit-request-line" in long_line
    many = b"".join(b"X-%d: v\r\n" % i for i in range(6))
    assert raw(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    big = raw(server, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 60 + b"\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 431 ") and b"--limit-request-field-size" in big
    # the worker goes on serving
    assert get(server, "/after")[0] == 200
    assert server.stop() == 0
    bad = cli("run", "cli_apps:asgi_app", "--limit-request-line", "9000")
    assert bad.returncode == 1 and "must be an int from 0 to 8190" in bad.stderr


def test_limit_concurrency_answers_503_beyond_it_per_worker(fastcluster_server: Any) -> None:
    # uvicorn's rule: 503 once the worker has N connections (this one counted)
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--limit-concurrency", "2"))
    busy = http.client.HTTPConnection(server.host, server.port, timeout=5)
    busy.request("GET", "/slow", headers={"Connection": "close"})  # 0.5 s
    time.sleep(0.15)
    status, _ = head_of(server, "/extra")
    assert status == 503
    assert busy.getresponse().status == 200
    busy.close()
    time.sleep(0.1)
    assert head_of(server, "/again")[0] == 200
    assert server.stop() == 0


def test_env_file_and_pid_file(fastcluster_server: Any, tmp_path: Path) -> None:
    events = tmp_path / "events.log"
    env_file = tmp_path / "app.env"
    env_file.write_text(f"# the app's settings\nCLI_TEST_EVENTS={events}\n")
    pid_file = tmp_path / "run" / "fc.pid"
    pid_file.parent.mkdir()
    server = fastcluster_server("cli_apps:asgi_app", workers=2,
                                args=("--env-file", str(env_file), "--pid", str(pid_file)))
    assert pid_file.read_text().strip() == str(server.pid)
    assert server.stop() == 0
    assert not pid_file.exists()
    assert events.read_text().count("startup") == 2  # the workers saw the .env's variable
    bad = cli("run", "cli_apps:asgi_app", "--env-file", str(tmp_path / "none.env"))
    assert bad.returncode == 1 and "none.env': no such file" in bad.stderr
    bad = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", "--status-socket", "off",
              "--pid", str(tmp_path / "no" / "dir.pid"))
    assert bad.returncode == 1 and "--pid" in bad.stderr and "cannot write it" in bad.stderr


@pytest.mark.parametrize(("app", "args", "message"), [
    ("cli_apps:wsgi_app", ("--lifespan", "on"),
     "--lifespan (from --lifespan) does not apply to a WSGI app: lifespan is an ASGI"),
    ("cli_apps:wsgi_app", ("--ws-max-size", "1024"), "--ws-max-size (from --ws-max-size) "
     "does not apply to a WSGI app: WebSockets are an ASGI protocol"),
    ("cli_apps:wsgi_app", ("--ws", "none"), "--ws (from --ws) does not apply to a WSGI"),
    ("cli_apps:asgi_app", ("--threads", "4"), "--threads (from --threads) does not apply to "
     "an ASGI app: an ASGI app runs on the worker's event loop"),
    ("cli_apps:asgi_app", ("--reload", "--preload"), "--reload replaces the workers"),
])
def test_a_flag_for_the_other_interface_is_an_error(app: str, args: tuple[str, ...],
                                                    message: str) -> None:
    proc = cli("run", app, "--bind", "127.0.0.1:0", *args)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "forked" not in proc.stderr


def test_a_flag_for_the_other_interface_from_the_environment_names_it() -> None:
    from test_cli import cli_env

    proc = cli("run", "cli_apps:wsgi_app", env=cli_env(FASTCLUSTER_WS_PING_INTERVAL="5"))
    assert proc.returncode == 1
    assert ("--ws-ping-interval (from $FASTCLUSTER_WS_PING_INTERVAL) does not apply to a "
            "WSGI app") in proc.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed "
                    "(apt-get install -y openssl)")
def test_tls_key_password_client_certificates_and_ciphers(fastcluster_server: Any,
                                                          tmp_path: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    ca, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", str(ca_key), "-out", str(ca))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"  # key encrypted with "s3cret"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-passout", "pass:s3cret", "-keyout", str(key), "-out", str(cert))
    client, client_key, csr = tmp_path / "c.pem", tmp_path / "c.key", tmp_path / "c.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client", "-keyout",
            str(client_key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-out", str(client))
    base = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    bad = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", *base,
              "--ssl-keyfile-password", "wrong")
    assert bad.returncode == 1 and "cannot load the certificate and key" in bad.stderr
    bad = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", *base,
              "--ssl-keyfile-password", "s3cret", "--ssl-ciphers", "NO-SUCH-CIPHER")
    assert bad.returncode == 1 and "--ssl-ciphers 'NO-SUCH-CIPHER'" in bad.stderr
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=(*base, "--ssl-keyfile-password", "s3cret",
                                      "--ssl-ca-certs", str(ca), "--ssl-cert-reqs", "2",
                                      "--ssl-ciphers", "ECDHE+AESGCM"))

    def fetch(with_cert: bool) -> int:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        if with_cert:
            ctx.load_cert_chain(str(client), str(client_key))
        conn = http.client.HTTPSConnection(server.host, server.port, timeout=5, context=ctx)
        try:
            conn.request("GET", "/mtls")
            return conn.getresponse().status
        finally:
            conn.close()

    assert fetch(with_cert=True) == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        fetch(with_cert=False)  # --ssl-cert-reqs 2: no client certificate, no handshake
    assert server.stop() == 0



def test_headers_from_the_environment_one_per_line_and_from_the_config_file(
        fastcluster_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "fc.toml"
    config.write_text('header = ["X-From: file", "X-Also: file"]\n')
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                env={"FASTCLUSTER_CONFIG": str(config)})
    _, headers = head_of(server)
    assert headers["x-from"] == "file" and headers["x-also"] == "file"  # a TOML list
    assert server.stop() == 0
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                env={"FASTCLUSTER_CONFIG": str(config),
                                     "FASTCLUSTER_HEADER": "X-One: 1\nX-Two: a, b"})
    _, headers = head_of(server)
    assert headers["x-one"] == "1" and headers["x-two"] == "a, b"  # one per line
    assert "x-from" not in headers  # the environment beats the file
    assert server.stop() == 0


def test_gunicorn_spellings_are_the_same_settings(fastcluster_server: Any,
                                                  tmp_path: Path) -> None:
    """--keep-alive, -p and --log-file mean here what they mean to gunicorn."""
    pid_file, log_file = tmp_path / "fc.pid", tmp_path / "server.log"
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--keep-alive", "1", "-p", str(pid_file),
                                      "--log-file", str(log_file), "--log-level", "info"))
    assert pid_file.read_text().strip() == str(server.pid)
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        s.settimeout(5)
        while s.recv(65536):  # the idle connection is closed after the keep-alive 1 s
            pass
        idle = time.monotonic() - t0
    assert 0.5 < idle < 3, idle  # (the default would be 5 s)
    assert server.stop() == 0
    assert "listening on" in log_file.read_text()


@pytest.mark.parametrize(("args", "reason"), [
    (("-k", "uvicorn.workers.UvicornWorker"), "drop the flag"),
    (("--worker-class=gthread",), "drop the flag"),
    (("--daemon",), "systemd"),
    (("--chdir", "/tmp"), "--app-dir DIR"),
    (("--worker-connections", "100"), "--limit-concurrency N"),
    (("--statsd-host", "localhost:8125"), "--metrics ADDR"),
])
def test_a_gunicorn_or_uvicorn_flag_we_do_not_take_says_why(args: tuple[str, ...],
                                                             reason: str) -> None:
    proc = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", *args)
    flag = args[0].split("=")[0]
    assert proc.returncode == 2, proc.stderr
    assert f"error: {flag} is not a flag of fastcluster run: " in proc.stderr, proc.stderr
    assert reason in proc.stderr and "forked" not in proc.stderr, proc.stderr
