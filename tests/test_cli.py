"""`fastcluster run` / `fastcluster status` through real processes, sockets and
signals: ASGI and WSGI apps under every policy, lifespan, status and metrics,
settings from flags/env/config, a rolling restart under load, bad apps.

Servers are started with the pytest plugin's fixture (fastcluster_server),
which also checks that no process outlives a test.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cli_apps
import pytest
from _helpers import ROOT, free_port

from fastcluster.pytest_plugin import ClusterServer, fastcluster_server  # noqa: F401

POLICIES = ["rr", "least", "shared", "reuseport", "steer"]
TESTS = str(Path(__file__).resolve().parent)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCLUSTER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), TESTS])
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastcluster", *args], cwd=TESTS,
                          env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def get(server: ClusterServer, path: str = "/", close: bool = True) -> tuple[int, str]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close"} if close else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def totals(doc: dict[str, Any], key: str) -> int:
    return sum(int(w[key] or 0) for w in doc["workers"])


@pytest.mark.parametrize("policy", POLICIES)
def test_serves_asgi_and_wsgi_apps_with_every_policy(fastcluster_server: Any,
                                                     policy: str) -> None:
    for app, kind in (("cli_apps:asgi_app", "asgi"), ("cli_apps:wsgi_app", "wsgi")):
        server = fastcluster_server(app, workers=2, policy=policy)
        pids = set(server.worker_pids())
        served = set()
        for i in range(12):
            status, body = get(server, f"/p{i}")
            assert status == 200
            word, pid, path = body.split()
            assert (word, path) == (kind, f"/p{i}")
            served.add(int(pid))
        assert served <= pids
        if policy in ("rr", "least"):  # the primary alternates between idle workers
            assert served == pids
        if kind == "asgi":  # keep-alive: several requests on one connection
            conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
            try:
                for i in range(5):
                    conn.request("GET", f"/k{i}")
                    resp = conn.getresponse()
                    assert resp.status == 200 and resp.read().startswith(b"asgi ")
            finally:
                conn.close()
        assert server.stop() == 0


def test_lifespan_startup_and_shutdown_run_in_each_worker(fastcluster_server: Any,
                                                          tmp_path: Path) -> None:
    events = tmp_path / "events"
    server = fastcluster_server(cli_apps.asgi_app, workers=2,  # the app itself, not a str
                                env={"CLI_TEST_EVENTS": str(events)})
    pids = set(server.worker_pids())
    started = [ln.split() for ln in events.read_text().splitlines()]
    assert sorted(started) == sorted(["startup", str(p)] for p in pids)
    assert get(server)[0] == 200
    assert server.stop() == 0
    lines = [ln.split() for ln in events.read_text().splitlines()]
    assert sorted(lines[2:]) == sorted(["shutdown", str(p)] for p in pids)


def test_graceful_stop_closes_idle_keep_alive_and_finishes_busy_requests(
        fastcluster_server: Any) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=1,
                                args=("--timeout-keep-alive", "60"))
    idle = http.client.HTTPConnection(server.host, server.port, timeout=5)
    idle.request("GET", "/first")
    assert idle.getresponse().read().endswith(b" /first\n")
    busy = socket.create_connection((server.host, server.port), timeout=5)
    try:
        busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)  # the request is in the app (0.5 s)
        t0 = time.monotonic()
        server.signal(signal.SIGTERM)
        data = b""
        while chunk := busy.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b" /slow\n"), data
        assert b"connection: close" in data.lower()  # the response ends its connection
        assert idle.sock is not None and idle.sock.recv(1) == b""  # closed, not left to time out
        assert server.process.wait(10) == 0
        assert time.monotonic() - t0 < 5  # not the 60 s keep-alive timeout
    finally:
        busy.close()
        idle.close()
    assert server.stop() == 0


def test_status_lists_workers_and_counters_move(fastcluster_server: Any) -> None:
    metrics_port = free_port()
    server = fastcluster_server("cli_apps:asgi_app", workers=2,
                                args=("--metrics", f"127.0.0.1:{metrics_port}"))
    assert stat.S_IMODE(os.stat(server.status_socket).st_mode) == 0o600
    proc = cli("status", "--socket", server.status_socket, "--json")
    assert proc.returncode == 0, proc.stderr
    before = json.loads(proc.stdout)
    assert before["primary"]["pid"] == server.pid
    assert before["primary"]["policy"] == "rr"
    assert len(before["workers"]) == 2
    for w in before["workers"]:
        assert set(w) >= {"id", "pid", "state", "uptime", "dispatched", "open", "requests",
                          "restarts", "rss"}
        assert w["state"] == "listening" and w["restarts"] == 0 and w["rss"] > 0
    for _ in range(10):
        assert get(server)[0] == 200
    deadline = time.monotonic() + 5
    while True:  # a worker counts its request once the response is sent
        after = server.status()
        if totals(after, "requests") >= totals(before, "requests") + 10:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.02)
    assert totals(after, "requests") == totals(before, "requests") + 10
    assert totals(after, "dispatched") == totals(before, "dispatched") + 10
    assert all(w["requests"] >= 5 for w in after["workers"])  # rr: 5 each
    table = cli("status", "--socket", server.status_socket)
    assert table.returncode == 0, table.stderr
    header = next(ln for ln in table.stdout.splitlines() if "PID" in ln).split()
    assert header == ["ID", "PID", "STATE", "UPTIME", "DISPATCHED", "OPEN", "QUEUED", "REQUESTS",
                      "RESTARTS", "RSS"]
    for pid in server.worker_pids():
        assert str(pid) in table.stdout
    watch = cli("status", "--socket", server.status_socket, "--watch", "--json",
                "--interval", "0.1", "-n", "3")
    assert watch.returncode == 0, watch.stderr
    assert len(watch.stdout.splitlines()) == 3
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    samples = [ln for ln in body.splitlines()
               if ln.startswith("fastcluster_worker_requests_total{")]
    assert len(samples) == 2
    assert sum(int(ln.split()[-1]) for ln in samples) >= totals(after, "requests")
    assert "fastcluster_workers 2" in body.splitlines()
    assert "fastcluster_ready 1" in body.splitlines()
    assert server.stop() == 0
    assert not os.path.exists(server.status_socket)  # removed at exit


def test_status_finds_the_primary_in_the_default_place(tmp_path: Path) -> None:
    env = cli_env(XDG_RUNTIME_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "fastcluster", "run", "cli_apps:wsgi_app",
                             "--workers", "1", "--bind", "127.0.0.1:0"], cwd=TESTS, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    path = tmp_path / f"fastcluster-{proc.pid}.sock"
    try:
        deadline = time.monotonic() + 15
        out = None
        while time.monotonic() < deadline:
            out = cli("status", "--json", env=env)  # no --socket: found in $XDG_RUNTIME_DIR
            if out.returncode == 0 and json.loads(out.stdout)["workers"]:
                break
            time.sleep(0.1)
        assert out is not None and out.returncode == 0, out
        assert json.loads(out.stdout)["primary"]["pid"] == proc.pid
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    assert not path.exists()


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed "
                    "(apt-get install -y wrk)")
def test_wrk_load_is_served_without_errors_and_counted(fastcluster_server: Any) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=2, policy="least")
    proc = subprocess.run(["wrk", "-t1", "-c8", "-d1s", server.url + "/"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Socket errors" not in proc.stdout and "Non-2xx" not in proc.stdout, proc.stdout
    done = int(proc.stdout.split(" requests in ")[0].split()[-1])
    assert done > 0
    deadline = time.monotonic() + 5
    while totals(server.status(), "requests") < done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert totals(server.status(), "requests") >= done
    assert server.stop() == 0


def _load(server: ClusterServer, stop: threading.Event, counts: dict[str, int],
          max_requests: int, max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds
    while not stop.is_set() and counts["ok"] + counts["failed"] < max_requests \
            and time.monotonic() < deadline:
        try:
            status, body = get(server)
            counts["ok" if status == 200 else "failed"] += 1
            counts.setdefault("pids", set()).add(int(body.split()[1]))  # type: ignore[attr-defined]
        except (OSError, http.client.HTTPException) as e:
            counts["failed"] += 1
            counts.setdefault("errors", []).append(repr(e))  # type: ignore[attr-defined]


@pytest.mark.parametrize("reload_on", ["SIGHUP", "SIGUSR1"])
def test_sighup_rolling_restart_through_the_cli_fails_no_request(fastcluster_server: Any,
                                                                  reload_on: str) -> None:
    args = () if reload_on == "SIGHUP" else ("--reload-on", reload_on)
    server = fastcluster_server("cli_apps:asgi_app", workers=2, args=args)
    old = set(server.worker_pids())
    stop = threading.Event()
    counts: dict[str, Any] = {"ok": 0, "failed": 0}
    clients = [threading.Thread(target=_load, args=(server, stop, counts, 4000, 20.0))
               for _ in range(2)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.3)
        at_hup = counts["ok"]
        server.signal(signal.Signals[reload_on])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            doc = server.status()
            pids = {w["pid"] for w in doc["workers"]}
            if not pids & old and len(pids) == 2 and all(
                    w["state"] == "listening" for w in doc["workers"]):
                break
            time.sleep(0.05)
        during = counts["ok"] - at_hup  # served while workers were being replaced
        time.sleep(0.3)  # some load on the new workers
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert not pids & old, f"old workers still serving: {pids & old}; log:\n{server.log()}"
    assert counts["failed"] == 0, counts
    assert during > 0 and counts["pids"] >= old | pids  # old and new workers both served
    assert all(w["restarts"] == 1 for w in doc["workers"])
    assert server.stop() == 0


@pytest.mark.parametrize(("ref", "message"), [
    ("no_such_module:app", "cannot import module 'no_such_module'"),
    ("cli_apps:no_such_app", "module 'cli_apps' has no attribute 'no_such_app'"),
    ("cli_apps", "must be 'module:attribute'"),
    ("_helpers:ROOT", "is not an ASGI or WSGI app (not callable)"),
])
def test_bad_app_exits_1_with_a_clear_error_and_forks_nothing(ref: str, message: str) -> None:
    t0 = time.monotonic()
    proc = cli("run", ref, "--workers", "2", "--bind", "127.0.0.1:0", timeout=15)
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr
    assert "forked" not in proc.stderr
    assert time.monotonic() - t0 < 10


def test_unusable_bind_address_exits_1_before_forking(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("run", "cli_apps:wsgi_app", "--bind", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (--bind): Address already in use" in proc.stderr
    proc = cli("run", "cli_apps:wsgi_app", "--bind", f"unix:{tmp_path}/no/dir.sock")
    assert proc.returncode == 1 and "no directory" in proc.stderr
    assert "forked" not in proc.stderr


def test_failing_lifespan_startup_stops_instead_of_crash_looping(tmp_path: Path) -> None:
    proc = cli("run", "cli_apps:failing_startup", "--workers", "2", "--bind", "127.0.0.1:0",
               "--status-socket", str(tmp_path / "s.sock"), timeout=20)
    assert proc.returncode == 1, proc.stderr
    assert "could not start serving" in proc.stderr
    assert proc.stderr.count("forked") == 2  # the two first workers, no respawn
    assert "no database (on purpose)" in proc.stderr


def test_without_uvicorn_the_error_names_the_extra(tmp_path: Path) -> None:
    blocker = tmp_path / "uvicorn"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('uvicorn is absent (test)')\n")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", env=env)
    assert proc.returncode == 1
    assert "pip install 'fastcluster-server[asgi]'" in proc.stderr
    assert "forked" not in proc.stderr
    # a WSGI app needs no uvicorn
    assert "uvicorn" not in cli("run", "--help", env=env).stderr


def test_settings_from_config_file_env_and_flags(fastcluster_server: Any,
                                                  tmp_path: Path) -> None:
    config = tmp_path / "fc.toml"
    config.write_text('[fastcluster]\nworkers = 3\npolicy = "least"\naccess-log = true\n')
    server = fastcluster_server("cli_apps:wsgi_app", workers=None, policy=None,
                                env={"FASTCLUSTER_CONFIG": str(config),
                                     "FASTCLUSTER_POLICY": "shared"},
                                args=("--workers", "2"))
    doc = server.status()
    assert len(doc["workers"]) == 2  # the flag beats the file
    assert doc["primary"]["policy"] == "shared"  # the environment beats the file
    assert get(server, "/logged")[0] == 200
    assert server.stop() == 0
    assert '"GET /logged HTTP/1.1" 200' in server.log()  # access_log from the file


def test_factory_preloaded_in_the_primary_and_asgi_access_log(fastcluster_server: Any
                                                               ) -> None:
    server = fastcluster_server("cli_apps:make_wsgi_app", workers=2,
                                args=("--factory", "--preload"))
    status, body = get(server, "/made")
    assert status == 200 and body.startswith("wsgi ")
    assert server.stop() == 0
    server = fastcluster_server("cli_apps:asgi_app", workers=1, args=("--access-log",))
    assert get(server, "/seen")[0] == 200
    assert server.stop() == 0
    assert '"GET /seen HTTP/1.1" 200' in server.log()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed "
                    "(apt-get install -y openssl)")
def test_asgi_and_wsgi_over_tls(fastcluster_server: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    for app, kind in (("cli_apps:asgi_app", "asgi"), ("cli_apps:wsgi_app", "wsgi")):
        server = fastcluster_server(app, workers=2, args=("--ssl-certfile", str(cert),
                                                          "--ssl-keyfile", str(key)))
        for i in range(4):
            conn = http.client.HTTPSConnection(server.host, server.port, timeout=5,
                                               context=ctx)
            try:
                conn.request("GET", f"/tls{i}")
                resp = conn.getresponse()
                body = resp.read().decode()
                assert resp.status == 200 and body.startswith(kind)
                assert body.endswith(f" /tls{i}\n")
            finally:
                conn.close()
        assert server.stop() == 0
    bad = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", "--ssl-certfile",
              str(tmp_path / "missing.pem"))
    assert bad.returncode == 1 and "cannot load the certificate" in bad.stderr


def test_max_requests_recycles_workers_without_a_failed_request(fastcluster_server: Any
                                                                 ) -> None:
    server = fastcluster_server("cli_apps:wsgi_app", workers=1, args=("--max-requests", "5"))
    first = server.worker_pids()[0]
    pids, deadline = [], time.monotonic() + 15
    while len(set(pids)) < 3 and len(pids) < 5000 and time.monotonic() < deadline:
        status, body = get(server)
        assert status == 200
        pids.append(int(body.split()[1]))
    assert pids[0] == first and len(set(pids)) >= 3, pids  # recycled twice, nothing failed
    deadline = time.monotonic() + 10  # the last old worker finishes, then it is 1 worker
    while len(ws := server.status()["workers"]) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(ws) == 1 and ws[0]["restarts"] >= 2, ws  # it replaced one that replaced one
    assert server.stop() == 0


def test_wsgi_worker_with_every_thread_busy_is_not_taken_for_hung(fastcluster_server: Any
                                                                   ) -> None:
    # one thread, requests of 1.5 s, hang timeout 1 s: the second request waits
    # for the thread longer than the timeout; the worker must live on
    server = fastcluster_server("cli_apps:wsgi_app", workers=1,
                                args=("--threads", "1", "--timeout", "1"))
    pid = server.worker_pids()[0]
    results: list[tuple[int, str]] = []
    clients = [threading.Thread(target=lambda: results.append(get(server, "/slow")))
               for _ in range(2)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(15)
    assert [r[0] for r in results] == [200, 200], results
    assert {int(r[1].split()[1]) for r in results} == {pid}
    assert server.worker_pids() == [pid]
    assert "SIGABRT" not in server.log()
    assert server.stop() == 0


def test_plugin_tears_down_every_process_when_the_test_fails(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(f"""
import json, os

def test_uses_a_cluster(fastcluster_server):
    server = fastcluster_server("cli_apps:asgi_app", workers=2, policy="least")
    pids = [server.pid, *server.worker_pids()]
    with open({str(tmp_path / "pids.json")!r}, "w") as f:
        json.dump(pids, f)
    assert False, "fails on purpose"
""")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), TESTS])
    # -p works whether or not the pytest11 entry point is installed (same name)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "fastcluster.pytest_plugin", "test_inner.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "1 failed" in proc.stdout, proc.stdout + proc.stderr
    assert "fails on purpose" in proc.stdout
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert len(pids) == 3
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")
                and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]


def test_help_lists_every_setting_and_bad_values_are_named() -> None:
    from fastcluster.cli.options import OPTIONS

    out = cli("run", "--help").stdout
    for opt in OPTIONS:
        if opt.name != "app":
            assert opt.flag in out and f"${opt.env}" in out, opt.name
    bad = cli("run", "cli_apps:asgi_app", env=cli_env(FASTCLUSTER_WORKERS="lots"))
    assert bad.returncode == 1
    assert "setting 'workers' (from $FASTCLUSTER_WORKERS) must be an int from 1 to 256, " \
           "got 'lots'" in bad.stderr
    bad = cli("run", "cli_apps:asgi_app", "--policy", "random")
    assert bad.returncode == 1 and "must be one of rr, least, shared, reuseport" in bad.stderr
    bad = cli("run", "cli_apps:asgi_app", "--max-rss", "lots")
    assert bad.returncode == 1 and "setting 'max_rss' (from --max-rss) must be a size" in bad.stderr
    bad = cli("run", "cli_apps:wsgi_app", "--bind", "127.0.0.1:0", "--user", "no-such-user-x")
    assert bad.returncode == 1 and "'no-such-user-x'" in bad.stderr and "forked" not in bad.stderr


def test_status_under_steer_shows_the_kernels_choice_per_worker(fastcluster_server: Any
                                                                ) -> None:
    from test_steer_core import _ebpf_refusal
    if _ebpf_refusal():
        pytest.skip(f"the figures are the eBPF program's: {_ebpf_refusal()}")
    server = fastcluster_server("cli_apps:asgi_app", workers=2, policy="steer")

    def settled() -> dict[str, Any]:
        # done is counted when asyncio's connection_lost ran, and the primary
        # sets the program's counts back to queue + open every 10 ms: wait
        # until nothing is open and two reads 50 ms apart agree
        deadline = time.monotonic() + 5
        last = server.status()
        while True:
            time.sleep(0.05)
            now = server.status()
            stable = totals(now, "dispatched") == totals(last, "dispatched")
            if (stable and totals(now, "open") == 0) or time.monotonic() > deadline:
                return now
            last = now

    before = settled()
    if any(w["queued"] is None for w in before["workers"]):
        pytest.fail(f"no steer figures in the status: {before['workers']}")
    for _ in range(10):
        assert get(server)[0] == 200
    after = settled()
    assert after["primary"]["policy"] == "steer"
    assert totals(after, "dispatched") == totals(before, "dispatched") + 10  # chosen by eBPF
    assert totals(after, "open") == 0 and totals(after, "queued") == 0
    table = cli("status", "--socket", server.status_socket)
    assert table.returncode == 0 and "QUEUED" in table.stdout, table.stderr
    assert server.stop() == 0
