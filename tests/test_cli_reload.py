"""`fastcluster run --reload` through the real CLI: editing the app's file under
bounded load replaces the workers through the rolling restart: no request
fails and the new code answers; --reload-include/--reload-exclude choose
which changes count.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_cli import cli

from fastcluster.pytest_plugin import ClusterServer

pytest.importorskip("watchfiles", reason="--reload needs watchfiles (the cli extra)")

APP = '''
import os

VERSION = "{version}"


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"{{VERSION}} {{os.getpid()}}\\n".encode()
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]}})
    await send({{"type": "http.response.body", "body": body}})
'''


def write_app(path: Path, version: str) -> None:
    path.write_text(APP.format(version=version))


def fetch(server: ClusterServer) -> str:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, (resp.status, body)
        return body.split()[0]
    finally:
        conn.close()


def _load(server: ClusterServer, stop: threading.Event, counts: dict[str, Any]) -> None:
    deadline = time.monotonic() + 30  # bounded in time and in count
    while not stop.is_set() and time.monotonic() < deadline and counts["ok"] < 20000:
        try:
            counts.setdefault("versions", set()).add(fetch(server))
            counts["ok"] += 1
        except (OSError, AssertionError, http.client.HTTPException) as e:
            counts["failed"] += 1
            counts.setdefault("errors", []).append(repr(e))


def wait_for(server: ClusterServer, version: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fetch(server) == version:
            return True
        time.sleep(0.1)
    return False


def test_reload_on_an_edit_replaces_workers_and_drops_no_request(fastcluster_server: Any,
                                                                 tmp_path: Path) -> None:
    app_file = tmp_path / "reload_app.py"
    write_app(app_file, "v1")
    server = fastcluster_server("reload_app:app", workers=2, cwd=str(tmp_path),
                                args=("--reload", "--app-dir", str(tmp_path)))
    old = set(server.worker_pids())
    assert fetch(server) == "v1"
    stop = threading.Event()
    counts: dict[str, Any] = {"ok": 0, "failed": 0}
    clients = [threading.Thread(target=_load, args=(server, stop, counts)) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.5)
        write_app(app_file, "v2")
        assert wait_for(server, "v2"), server.log()
        deadline = time.monotonic() + 20  # the rolling restart ends: all workers new
        while time.monotonic() < deadline and (set(server.worker_pids()) & old
                                               or len(server.worker_pids()) != 2):
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert counts["failed"] == 0, counts
    assert counts["versions"] == {"v1", "v2"} and counts["ok"] > 0
    assert not set(server.worker_pids()) & old
    assert all(fetch(server) == "v2" for _ in range(4))
    print("requests served during the reload test:", counts["ok"])
    assert "reload_app.py changed: replacing the workers (SIGHUP)" in server.log()
    assert server.stop() == 0


def test_an_edit_that_breaks_the_app_keeps_the_old_workers(fastcluster_server: Any,
                                                           tmp_path: Path) -> None:
    app_file = tmp_path / "reload_app.py"
    write_app(app_file, "v1")
    server = fastcluster_server("reload_app:app", workers=1, cwd=str(tmp_path),
                                args=("--reload", "--app-dir", str(tmp_path)))
    first = server.worker_pids()
    app_file.write_text(APP.format(version="v2") + "\nthis is not python(\n")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "rolling restart stopped" not in server.log():
        time.sleep(0.1)
    assert "rolling restart stopped" in server.log()  # the new worker could not import it
    assert server.worker_pids() == first and fetch(server) == "v1"  # the old one serves on
    write_app(app_file, "v3")  # fixed: reloads
    assert wait_for(server, "v3"), server.log()
    assert server.stop() == 0


def test_reload_include_and_exclude_choose_what_reloads(fastcluster_server: Any,
                                                        tmp_path: Path) -> None:
    app_file = tmp_path / "reload_app.py"
    write_app(app_file, "v1")
    (tmp_path / "templates").mkdir()
    server = fastcluster_server("reload_app:app", workers=1, cwd=str(tmp_path),
                                args=("--reload", "--reload-dir", str(tmp_path),
                                      "--reload-include", "*.py",
                                      "--reload-include", "*.html",
                                      "--reload-exclude", "skip_*.py"))
    first = server.worker_pids()
    (tmp_path / "skip_me.py").write_text("x = 1\n")  # excluded
    (tmp_path / "notes.txt").write_text("not included\n")
    time.sleep(1.5)
    assert server.worker_pids() == first and "changed" not in server.log()
    (tmp_path / "templates" / "page.html").write_text("<p>new</p>\n")  # included
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and server.worker_pids() in (first, []):
        time.sleep(0.1)
    assert server.worker_pids() != first, server.log()
    assert "page.html changed" in server.log()
    assert server.stop() == 0


def test_reload_dir_must_exist(tmp_path: Path) -> None:
    proc = cli("run", "cli_apps:asgi_app", "--bind", "127.0.0.1:0", "--status-socket", "off",
               "--reload", "--reload-dir", str(tmp_path / "absent"))
    assert proc.returncode == 1 and "--reload-dir" in proc.stderr and "not a directory" \
        in proc.stderr
