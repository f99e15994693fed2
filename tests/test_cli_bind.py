"""`fastcluster run`'s addresses through the real CLI and real clients:
--bind given twice (each served), --host/--port/--uds, --fd (an inherited
socket), the Unix socket's mode (0666, or --umask), and the flags users type
from habit (-w, -b, no prefix matching).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _helpers import free_port
from test_cli import TESTS, cli, cli_env, get

needs_curl = pytest.mark.skipif(shutil.which("curl") is None,
                                reason="curl is not installed (apt-get install -y curl)")


def curl_unix(path: str, url_path: str = "/") -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "5", "--unix-socket", path,
                          f"http://localhost{url_path}"], capture_output=True, text=True,
                         timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout


def get_tcp(port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


@needs_curl
@pytest.mark.parametrize(("policy", "app"), [("rr", "asgi_app"), ("shared", "asgi_app"),
                                             ("reuseport", "asgi_app"), ("rr", "wsgi_app")])
def test_bind_given_twice_serves_each_address_and_unix_socket_is_0666(
        fastcluster_server: Any, tmp_path: Path, policy: str, app: str) -> None:
    sock_path = str(tmp_path / "app.sock")
    port = free_port()
    # the plugin binds 127.0.0.1:0 too: three addresses
    server = fastcluster_server(f"cli_apps:{app}", workers=2, policy=policy,
                                args=("--bind", f"unix:{sock_path}",
                                      "-b", f"127.0.0.1:{port}"))
    addresses = server.status()["primary"]["addresses"]
    assert sock_path in addresses and ["127.0.0.1", port] in addresses, addresses
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o666  # uvicorn's mode
    assert get(server, "/first")[0] == 200
    pids = set(server.worker_pids())
    for serve in (lambda: get_tcp(port, "/second")[1], lambda: curl_unix(sock_path, "/third")):
        served = {serve().split()[1] for _ in range(6)}
        assert served <= {str(p) for p in pids}
        if policy == "rr":  # every worker serves every address
            assert served == {str(p) for p in pids}
    assert server.stop() == 0
    assert not os.path.exists(sock_path)  # ours: removed when the primary stops


@needs_curl
def test_umask_sets_the_unix_socket_mode_and_uds_host_port_are_aliases(
        fastcluster_server: Any, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "uds.sock")
    port = free_port()
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--uds", sock_path, "--umask", "007",
                                      "--host", "127.0.0.1", "--port", str(port)))
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o770  # gunicorn's 0777 & ~umask
    assert curl_unix(sock_path, "/u").split()[2] == "/u"
    assert get_tcp(port, "/p")[1].split()[2] == "/p"
    assert server.stop() == 0


def test_same_address_twice_is_an_error(tmp_path: Path) -> None:
    port = free_port()
    proc = cli("run", "cli_apps:asgi_app", "-b", f"127.0.0.1:{port}", "--host",
               "127.0.0.1", "--port", str(port))
    assert proc.returncode == 1 and "is given twice" in proc.stderr, proc.stderr


def _run_with_fd(fd: int, app: str, status: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fastcluster", "run", app, "--fd", str(fd),
                             "-w", "2", "--status-socket", status], cwd=TESTS,
                            env=cli_env(), pass_fds=[fd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_served(port: int, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = get_tcp(port, "/up")
            assert status == 200
            return body
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@needs_curl
def test_bind_list_from_the_environment_and_the_config_file(tmp_path: Path) -> None:
    ports = [free_port(), free_port(), free_port()]
    config = tmp_path / "fc.toml"
    config.write_text(f'bind = ["127.0.0.1:{ports[0]}", "127.0.0.1:{ports[1]}"]\n')
    for env, served in (({"FASTCLUSTER_CONFIG": str(config)}, ports[:2]),  # a TOML list
                        ({"FASTCLUSTER_CONFIG": str(config),  # the environment's wins
                          "FASTCLUSTER_BIND": f"127.0.0.1:{ports[2]}, unix:{tmp_path}/e.sock"},
                         ports[2:])):
        proc = subprocess.Popen([sys.executable, "-m", "fastcluster", "run",
                                 "cli_apps:asgi_app", "-w", "1", "--status-socket",
                                 str(tmp_path / "s.sock")], cwd=TESTS, env=cli_env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            for port in served:
                assert "/up" in _wait_served(port)
            if len(served) == 1:
                assert curl_unix(f"{tmp_path}/e.sock", "/e").split()[2] == "/e"
                with pytest.raises(OSError):
                    get_tcp(ports[0])  # the file's list was replaced, not added to
        finally:
            out = _stop(proc)
        assert proc.returncode == 0, out


def _stop(proc: subprocess.Popen[str]) -> str:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=5)
    return out


@pytest.mark.parametrize("app", ["cli_apps:asgi_app", "cli_apps:wsgi_app"])
def test_fd_serves_an_inherited_listening_socket(tmp_path: Path, app: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    proc = _run_with_fd(listener.fileno(), app, str(tmp_path / "s.sock"))
    listener.close()  # the server's copy is the only one now
    try:
        deadline = time.monotonic() + 15
        pids = set()
        while time.monotonic() < deadline and len(pids) < 2:
            try:
                status, body = get_tcp(port, "/fd")
            except OSError:
                time.sleep(0.1)
                continue
            assert status == 200 and body.split()[2] == "/fd"
            pids.add(body.split()[1])
        assert len(pids) == 2, "both workers serve the inherited socket"
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out


def test_fd_that_is_not_a_listening_socket_is_a_clear_error(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "fastcluster", "run",
                               "cli_apps:asgi_app", "--fd", str(r), "--status-socket", "off"],
                              cwd=TESTS, env=cli_env(), pass_fds=[r], capture_output=True,
                              text=True, timeout=20)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 1 and f"--fd {r}: not an open socket" in proc.stderr
    with socket.socket() as unbound:
        proc = subprocess.run([sys.executable, "-m", "fastcluster", "run",
                               "cli_apps:asgi_app", "--fd", str(unbound.fileno()),
                               "--status-socket", "off"], cwd=TESTS, env=cli_env(),
                              pass_fds=[unbound.fileno()], capture_output=True, text=True,
                              timeout=20)
    assert proc.returncode == 1 and "not a listening stream socket" in proc.stderr
    assert cli("run", "cli_apps:asgi_app", "--fd", "1").returncode == 1


def test_no_prefix_matching_and_gunicorn_short_flags() -> None:
    proc = cli("run", "cli_apps:asgi_app", "--reload-o", "SIGUSR2")  # not --reload-on
    assert proc.returncode == 2 and "unrecognized arguments: --reload-o" in proc.stderr
    proc = cli("run", "cli_apps:asgi_app", "--work", "2")
    assert proc.returncode == 2 and "unrecognized arguments: --work" in proc.stderr
    out = cli("run", "--help").stdout
    for flag in ("-w N, --workers N", "-b ADDR, --bind ADDR", "--timeout-graceful-shutdown",
                 "--limit-max-requests", "--host HOST", "--port PORT", "--uds PATH", "--fd N"):
        assert flag in out, flag


def test_w_and_limit_max_requests_and_timeout_graceful_shutdown(fastcluster_server: Any
                                                                 ) -> None:
    server = fastcluster_server("cli_apps:wsgi_app", workers=None,
                                args=("-w", "1", "--limit-max-requests", "3",
                                      "--timeout-graceful-shutdown", "0.5"))
    assert len(server.worker_pids()) == 1  # -w
    first = server.worker_pids()[0]
    for i in range(4):
        assert get(server, f"/{i}")[0] == 200
    deadline = time.monotonic() + 15  # --limit-max-requests: recycled after 3
    while time.monotonic() < deadline and server.worker_pids() in ([first], []):
        time.sleep(0.1)
    server.wait_ready(workers=1)
    assert server.worker_pids() != [first]
    # --timeout-graceful-shutdown: a stop with a 1.5 s request open kills after 0.5 s
    slow = http.client.HTTPConnection(server.host, server.port, timeout=5)
    slow.request("GET", "/slow")
    time.sleep(0.2)
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 1.4
    assert "killed by SIGKILL" in server.log()
    slow.close()
