"""The primary's health endpoint on loopback: /healthz, /readyz before the
workers listen, while they listen and during the SIGTERM drain; the same
facts for `fastcluster status`; slow and garbage health clients do not
stall the primary; the settings' errors."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _helpers import env, free_port, http_get, running, script  # noqa: F401

from fastcluster.wire.settings import Settings

HOST = """
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
import fastcluster as cluster
from fastcluster import _role
from fastcluster.primary import health as _health

PORT, HEALTH, DRAIN = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
GO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go")

def facts(tag):
    print(tag, json.dumps(_health.facts(_role.primary())), flush=True)

if cluster.is_primary:
    cluster.setup_primary(health=HEALTH, drain_delay=DRAIN, graceful_timeout=5.0)
    cluster.on("listening", lambda w, a: facts("listening"))
    cluster.on("disconnect", lambda w: facts("disconnect"))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, flush=True))
    for _ in range(2):
        cluster.fork()
    facts("forked")
    cluster.run()
    print("primary done", flush=True)
else:
    deadline = time.monotonic() + 20
    while not os.path.exists(GO) and time.monotonic() < deadline:
        time.sleep(0.02)  # the test decides when the workers listen
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"app\\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    server = HTTPServer(("127.0.0.1", PORT), H, bind_and_activate=False)
    cluster.listen_server(server).serve_forever()
"""


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    """One request to the health endpoint: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def wait_status(port: int, path: str, want: int, timeout: float = 10.0) -> str:
    """Polls path until it answers `want`; returns the body."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = get(port, path)
        except OSError as e:
            last = e
        else:
            if status == want:
                return body
            last = (status, body)
        time.sleep(0.05)
    raise AssertionError(f"{path} never answered {want}; last: {last!r}")


def facts_of(line: str) -> dict[str, object]:
    return json.loads(line.split(" ", 1)[1])  # type: ignore[no-any-return]


def test_healthz_readyz_and_drain(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, HOST)
    app, health = free_port(), free_port()
    with running(path, env, (str(app), f"127.0.0.1:{health}", "1.5")) as r:
        forked = facts_of(r.wait_for("forked")[0])
        assert forked["ready"] is False and forked["reason"] == "no worker listens"
        assert forked["workers"] == 2 and forked["listening"] == 0
        # alive before any worker listens, but not ready
        assert wait_status(health, "/healthz", 200) == "ok\n"
        assert get(health, "/readyz") == (503, "not ready: no worker listens\n")
        (tmp_path / "go").touch()
        listening = [facts_of(ln) for ln in r.wait_for("listening", 2)]
        assert listening[-1]["ready"] is True and listening[-1]["listening"] == 2
        assert listening[-1]["health"] == f"127.0.0.1:{health}"
        assert get(health, "/readyz") == (200, "ready\n")
        assert get(health, "/readyz?verbose=1") == (200, "ready\n")
        assert get(health, "/readyz", "HEAD") == (200, "")
        assert get(health, "/nope")[0] == 404
        assert get(health, "/healthz", "POST")[0] == 405
        assert http_get(app)[0] == 200

        r.signal(signal.SIGTERM)
        # /readyz fails at once, while the workers go on serving for drain_delay
        wait_status(health, "/readyz", 503, timeout=2.0)
        status, body = get(health, "/readyz")
        drain_seen = time.monotonic()
        assert (status, body) == (503, "not ready: draining\n")
        assert get(health, "/healthz") == (200, "ok\n")
        served = 0
        while time.monotonic() < drain_seen + 0.8:
            assert http_get(app)[0] == 200  # still served while draining
            served += 1
            time.sleep(0.05)
        assert served >= 5
        code, out = r.finish(timeout=15)
    assert code == 0, out
    assert "primary done" in out
    gone = [facts_of(ln) for ln in out if ln.startswith("disconnect")]
    assert gone and all(f["reason"] == "shutting down" and f["ready"] is False for f in gone)
    assert all(f["shutdown"] == "graceful" for f in gone)


def listening_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:port (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # LISTEN
                return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                out.add(target[8:-1])
    return out


def test_workers_do_not_hold_the_health_socket(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, HOST)
    (tmp_path / "go").touch()
    app, health = free_port(), free_port()
    with running(path, env, (str(app), f"127.0.0.1:{health}", "0")) as r:
        r.wait_for("listening", 2)
        inode = listening_inode(health)
        assert inode in socket_inodes(r.pid)  # the primary's
        with open(f"/proc/{r.pid}/task/{r.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        assert len(children) == 2
        for child in children:
            assert inode not in socket_inodes(child), child
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=10)
    assert code == 0, out


def test_drain_delay_zero_shuts_down_at_once(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, HOST)
    (tmp_path / "go").touch()
    app, health = free_port(), free_port()
    with running(path, env, (str(app), f"127.0.0.1:{health}", "0")) as r:
        r.wait_for("listening", 2)
        assert wait_status(health, "/readyz", 200) == "ready\n"
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=10)
    assert code == 0, out
    gone = [facts_of(ln) for ln in out if ln.startswith("disconnect")]
    assert gone and all(f["draining"] is False and f["shutdown"] == "graceful" for f in gone)


def test_slow_and_garbage_health_clients_do_not_stall(tmp_path: Path,
                                                      env: dict[str, str]) -> None:
    path = script(tmp_path, HOST)
    (tmp_path / "go").touch()
    app, health = free_port(), free_port()
    with running(path, env, (str(app), f"127.0.0.1:{health}", "0")) as r, \
            contextlib.ExitStack() as stack:
        r.wait_for("listening", 2)
        wait_status(health, "/readyz", 200)

        def client() -> socket.socket:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", health), timeout=5))
            return s

        idle = [client() for _ in range(40)]  # more than MAX_CONNS, never send a byte
        slow = client()
        slow.sendall(b"GET /rea")  # a request that never ends
        big = client()
        big.sendall(b"A" * 4096)  # past MAX_REQUEST with no end of headers
        junk = client()
        junk.sendall(b"\x00\xff garbage\r\n\r\n")
        # the app and the endpoint answer at once all the same: none of these
        # waits for a bad client's CONN_TIMEOUT (2 s) to pass
        slowest = 0.0
        for _ in range(10):
            t0 = time.monotonic()
            assert http_get(app, timeout=2)[0] == 200
            assert get(health, "/readyz") == (200, "ready\n")
            slowest = max(slowest, time.monotonic() - t0)
        assert slowest < 1.5, slowest
        assert big.recv(4096).startswith(b"HTTP/1.1 431 ")
        assert junk.recv(4096).startswith(b"HTTP/1.1 400 ")
        # the slow and idle clients are closed by the primary (evicted or timed out)
        for s in [slow, *idle]:
            s.settimeout(5)
            assert s.recv(4096) == b""
        assert get(health, "/healthz") == (200, "ok\n")
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=10)
    assert code == 0, out


def test_ready_throughout_a_rolling_restart(tmp_path: Path, env: dict[str, str]) -> None:
    """SIGHUP replaces every worker one by one: /readyz never fails meanwhile."""
    path = script(tmp_path, HOST)
    (tmp_path / "go").touch()
    app, health = free_port(), free_port()
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def poll() -> None:
        for _ in range(2000):  # bounded: count and (below) time
            if stop.is_set():
                return
            try:
                answers.append(get(health, "/readyz"))
            except OSError as e:
                answers.append((0, repr(e)))
            time.sleep(0.01)

    with running(path, env, (str(app), f"127.0.0.1:{health}", "0")) as r:
        r.wait_for("listening", 2)
        wait_status(health, "/readyz", 200)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            time.sleep(0.1)
            r.signal(signal.SIGHUP)
            r.wait_for("listening", 4, timeout=15)  # two replacements listen
            r.wait_for("exit", 2, timeout=15)  # and the two old workers are gone
            time.sleep(0.1)
        finally:
            stop.set()
            poller.join(10)
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=10)
    assert code == 0, out
    assert len(answers) >= 10
    assert set(answers) == {(200, "ready\n")}, [a for a in answers if a[0] != 200][:5]


def test_health_address_in_use_is_a_clear_error(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import sys
        import fastcluster as cluster
        try:
            cluster.setup_primary(health=sys.argv[1])  # binds: fails before any fork
        except OSError as e:
            print("error", e, flush=True)
        print("health", cluster.settings.get("health"), flush=True)  # unchanged
    """)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        with running(path, env, (address,)) as r:
            line = r.wait_for("error")[0]
            code, out = r.finish()
    assert code == 0
    assert "health None" in out
    assert f"health endpoint {address!r}" in line and "in use" in line


@pytest.mark.parametrize(("name", "value", "exc"), [
    ("health", 8081, TypeError),
    ("health", "8081", ValueError),
    ("health", "localhost", ValueError),
    ("health", "127.0.0.1:99999", ValueError),
    ("health", "::1:8081", ValueError),
    ("health", ":", ValueError),
    ("health", "127.0.0.1:80a", ValueError),
    ("drain_delay", -1, ValueError),
    ("drain_delay", math.nan, ValueError),
    ("drain_delay", math.inf, ValueError),
    ("drain_delay", "5", TypeError),
    ("drain_delay", True, TypeError),
])
def test_bad_settings_name_setting_value_allowed(name: str, value: object,
                                                 exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        Settings().merge({name: value})
    text = str(info.value)
    assert repr(name) in text and repr(value) in text and "must be" in text


def test_good_settings() -> None:
    assert Settings().merge({"health": ":8081"}).health == ":8081"  # all IPv4 interfaces
    s = Settings().merge({"health": "[::1]:8081", "drain_delay": 5})
    assert (s.health, s.drain_delay) == ("[::1]:8081", 5.0)
    assert Settings().merge({"health": None, "drain_delay": 0}).as_dict()["health"] is None
    assert (Settings().health, Settings().drain_delay) == (None, 0.0)


def test_cli_health_and_drain_delay(tmp_path: Path, env: dict[str, str]) -> None:
    """`fastcluster run --health --drain-delay` (the deploy/ examples' command),
    and the same facts in `fastcluster status --json`."""
    tests = Path(__file__).resolve().parent
    cli_env = {k: v for k, v in env.items() if not k.startswith("FASTCLUSTER_")}
    cli_env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests)])
    app, health = free_port(), free_port()
    argv = [sys.executable, "-m", "fastcluster", "run", "cli_apps:wsgi_app", "--workers", "2",
            "--bind", f"127.0.0.1:{app}", "--health", f"127.0.0.1:{health}",
            "--drain-delay", "3", "--status-socket", str(tmp_path / "st.sock")]

    def status(*flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "fastcluster", "status", "--socket",
                               str(tmp_path / "st.sock"), *flags], cwd=tests, env=cli_env,
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    with open(tmp_path / "out", "w+") as out:
        proc = subprocess.Popen(argv, cwd=tests, env=cli_env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            assert wait_status(health, "/readyz", 200, timeout=15) == "ready\n"
            assert http_get(app)[0] == 200
            facts = json.loads(status("--json"))["primary"]["health"]
            assert facts["ready"] is True and facts["listening"] == 2
            assert facts["health"] == f"127.0.0.1:{health}" and facts["drain_delay"] == 3.0
            proc.send_signal(signal.SIGTERM)
            assert wait_status(health, "/readyz", 503, timeout=2) == "not ready: draining\n"
            assert http_get(app)[0] == 200  # still served while draining
            facts = json.loads(status("--json"))["primary"]["health"]
            assert (facts["ready"], facts["reason"], facts["draining"]) == \
                (False, "draining", True)
            assert 0 < facts["drain_left"] <= 3.0
            assert "NOT READY: draining" in status()
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        # the health address in use: a clear error, exit 1, before any fork
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            argv[argv.index("--health") + 1] = f"127.0.0.1:{busy.getsockname()[1]}"
            bad = subprocess.run(argv, cwd=tests, env=cli_env, capture_output=True,
                                 text=True, timeout=20)
    assert bad.returncode == 1
    assert "--health: health endpoint '127.0.0.1:" in bad.stderr, bad.stderr
    assert "Address already in use" in bad.stderr
