"""`fastcluster run` under faults (issue 17): respawn pacing from its three
sources, workers that leave unasked, boot failures, the status socket's
trust. Real `fastcluster run` processes (the pytest plugin's fixture), real
signals; every wait bounded.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from _faults import wait_until
from test_cli import cli, cli_env

from fastcluster.pytest_plugin import fastcluster_server  # noqa: F401


def _respawn_delays(log: str) -> list[float]:
    # a young death: "respawning in"; a ready one past --respawn-burst: "next respawn in"
    return [float(x) for x in re.findall(r"(?:respawning|next respawn) in ([0-9.]+) s", log)]


def test_respawn_pacing_from_flags_env_and_config(fastcluster_server: Any,
                                                   tmp_path: Path) -> None:
    config = tmp_path / "fc.toml"
    config.write_text("[fastcluster]\nrespawn_delay_max = 0.9\n")
    server = fastcluster_server("cli_apps:wsgi_app", workers=1,
                                env={"FASTCLUSTER_CONFIG": str(config),
                                     "FASTCLUSTER_RESPAWN_STABLE": "60"},
                                args=("--respawn-delay", "0.6", "--respawn-burst", "1"))
    # the first death of a ready worker is replaced at once (--respawn-burst 1); the
    # next two (young, or ready past the burst) back off: 0.6 s, then 1.2 s capped at 0.9
    for _ in range(3):
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda pid=pid: server.worker_pids() not in ([], [pid]), 5.0)
    delays = _respawn_delays(server.log())
    assert len(delays) == 2, server.log()
    assert 0.45 <= delays[0] <= 0.75 and 0.7 <= delays[1] <= 1.1, delays  # +-20% jitter
    assert server.stop() == 0
    bad = cli("run", "cli_apps:wsgi_app", env=cli_env(FASTCLUSTER_RESPAWN_DELAY="soon"))
    assert bad.returncode == 1
    assert "setting 'respawn_delay' (from $FASTCLUSTER_RESPAWN_DELAY) must be a number " \
           "of seconds > 0, got 'soon'" in bad.stderr


_ = (pytest, time)


def _lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


def _scrape(port: int, timeout: float = 3.0) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().status
    finally:
        conn.close()


def test_status_and_metrics_at_the_fd_limit_pause_expire_and_resume(
        fastcluster_server: Any) -> None:
    import resource
    import socket

    from _faults import cpu_seconds
    from _helpers import free_port

    mport = free_port()
    server = fastcluster_server("cli_apps:wsgi_app", workers=1,
                                args=("--metrics", f"127.0.0.1:{mport}"))
    # 33 idle scrapers (connected, never asking): the oldest gives way to a real scrape
    idle = [socket.create_connection(("127.0.0.1", mport), timeout=5) for _ in range(33)]
    try:
        time.sleep(0.2)
        assert _scrape(mport) == 200
        hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)[1]
        soft = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)[0]
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (_lowest_free_fd(server.pid), hard))
        waiting = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        waiting += [socket.create_connection(("127.0.0.1", mport), timeout=5)
                    for _ in range(2)]
        idle += waiting  # closed at the end whatever happens
        try:
            for s in waiting[:2]:
                s.connect(server.status_socket)
            time.sleep(0.3)
            t0 = cpu_seconds(server.pid)
            time.sleep(1.0)
            spent = cpu_seconds(server.pid) - t0
            assert spent < 0.3, f"the primary spent {spent:.2f} s of CPU in 1 s at EMFILE"
            # idle scrapers expire on their timer (5 s) although nothing is accepted
            for s in idle[:33]:
                s.settimeout(8)
            assert idle[32].recv(1) == b""
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert waiting[0].recv(1 << 16).startswith(b"{")  # answered once fds are back
        assert _scrape(mport) == 200
        assert server.status()["workers"]
    finally:
        for s in idle:
            s.close()
    assert server.stop() == 0
    print(f"primary CPU at EMFILE with status+metrics waiting: {spent:.3f} s in 1 s")


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
def test_a_user_worker_that_cannot_import_fails_the_cli_instead_of_looping() -> None:
    import shutil
    import tempfile

    # uvloop the primary can find (it checks --loop) and a `nobody` worker cannot read
    shadow = tempfile.mkdtemp(prefix="fc-shadow-")
    os.chmod(shadow, 0o755)
    try:
        mod = Path(shadow) / "uvloop.py"
        mod.write_text("raise ImportError('a stand-in only root may read')\n")
        mod.chmod(0o600)
        env = cli_env()
        env["PYTHONPATH"] = os.pathsep.join([shadow, env["PYTHONPATH"]])
        t0 = time.monotonic()
        proc = cli("run", "cli_apps:asgi_app", "--loop", "uvloop", "--workers", "2",
                   "--bind", "127.0.0.1:0", "--user", "nobody", "--status-socket", "off",
                   env=env, timeout=20)
    finally:
        shutil.rmtree(shadow, ignore_errors=True)
    assert proc.returncode == 1, proc.stderr
    assert "could not start serving" in proc.stderr
    assert "Permission denied" in proc.stderr
    assert proc.stderr.count("forked") == 2, proc.stderr  # no respawn
    assert time.monotonic() - t0 < 15


def test_a_lifespan_startup_that_never_completes_times_out_and_fails_the_cli() -> None:
    t0 = time.monotonic()
    proc = cli("run", "cli_apps:hanging_startup", "--workers", "2", "--bind", "127.0.0.1:0",
               "--ready-timeout", "1", "--status-socket", "off", timeout=20)
    assert proc.returncode == 1, proc.stderr
    assert "lifespan startup did not complete within 1 s (ready_timeout)" in proc.stderr
    assert "could not start serving" in proc.stderr
    assert proc.stderr.count("forked") == 2, proc.stderr
    assert time.monotonic() - t0 < 10


def test_a_worker_terminated_from_outside_is_replaced_and_leaving_is_never_exit_0(
        fastcluster_server: Any) -> None:
    server = fastcluster_server("cli_apps:wsgi_app", workers=2)
    first = server.worker_pids()
    os.kill(first[0], signal.SIGTERM)  # not asked by the primary: gunicorn keeps the count
    assert wait_until(lambda: len(server.worker_pids()) == 2
                      and first[0] not in server.worker_pids(), 5.0), server.log()
    assert first[1] in server.worker_pids()
    assert server.stop() == 0
    # with respawn off, the workers leaving stops the CLI: with status 1, saying why
    server = fastcluster_server("cli_apps:wsgi_app", workers=2, args=("--respawn", "false"))
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: server.process.poll() is not None, 10.0), server.log()
    assert server.process.returncode == 1
    assert "every worker left" in server.log()


def _fake_primary(path: Path, doc: dict[str, Any]) -> Any:
    """A status socket at path answering doc once per client (a thread)."""
    import json
    import socket
    import threading

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(10)

    def serve() -> None:
        try:
            while True:
                conn, _ = srv.accept()
                with conn:
                    conn.sendall(json.dumps(doc).encode())
        except OSError:
            return

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the socket")
def test_status_trusts_only_its_own_sockets_and_strips_terminal_escapes(
        tmp_path: Path) -> None:
    evil = "\x1b]0;owned\x07\x1b[2J"
    doc = {"version": 1, "primary": {"pid": os.getpid(), "uptime": 1.0, "policy": "rr",
                                     "app": "x:app" + evil, "interface": "wsgi",
                                     "addresses": [["127.0.0.1", 1]], "workers": 1,
                                     "restarts": 0, "rss": 1, "dispatcher": {}},
           "workers": [{"id": 1, "pid": 2, "state": "listening" + evil, "uptime": 1.0}]}
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    sock = run_dir / f"fastcluster-{os.getpid()}.sock"
    srv = _fake_primary(sock, doc)
    try:
        os.chown(sock, 65534, 65534)  # another user's socket where ours would be
        env = cli_env(XDG_RUNTIME_DIR=str(run_dir))
        out = cli("status", env=env)
        assert out.returncode == 1, out
        assert "owned by uid 65534" in out.stderr, out.stderr
        os.chown(sock, 0, 0)
        out = cli("status", env=env)
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x07" not in out.stdout, repr(out.stdout)
        assert "x:app" in out.stdout and "listening" in out.stdout
    finally:
        srv.close()


def test_default_status_path_is_private_and_another_users_file_cannot_stop_it(
        tmp_path: Path) -> None:
    import json
    import stat as st
    import subprocess
    import sys

    from test_cli import TESTS

    import shutil
    import tempfile

    fake_tmp = Path(tempfile.mkdtemp(prefix="fc-t-", dir="/tmp"))  # short: sun_path
    fake_tmp.chmod(0o1777)
    squat = fake_tmp / f"fastcluster-{os.geteuid()}"  # another user got there first
    squat.mkdir()
    if os.geteuid() == 0:
        os.chown(squat, 65534, 65534)
    else:
        squat.chmod(0o755)
    env = cli_env(TMPDIR=str(fake_tmp))
    env.pop("XDG_RUNTIME_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "fastcluster", "run", "cli_apps:wsgi_app",
                             "--workers", "1", "--bind", "127.0.0.1:0"], cwd=TESTS, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            out = cli("status", "--json", env=env)
            if out.returncode == 0 and json.loads(out.stdout)["workers"]:
                break
            time.sleep(0.1)
        assert out is not None and out.returncode == 0, out
        found = [p for p in fake_tmp.glob("fastcluster-*/fastcluster-*.sock")]
        assert len(found) == 1 and found[0].parent != squat, found
        info = found[0].parent.stat()
        assert info.st_uid == os.geteuid() and st.S_IMODE(info.st_mode) == 0o700
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        shutil.rmtree(fake_tmp, ignore_errors=True)
    assert proc.returncode == 0, err


def test_steer_mode_and_fault_settings_from_flags(fastcluster_server: Any) -> None:
    server = fastcluster_server("cli_apps:asgi_app", workers=2, policy="steer",
                                args=("--steer-mode", "cbpf", "--stall-ms", "0",
                                      "--orphan-timeout", "0", "--health-grace", "5"))
    from test_cli import get

    assert get(server)[0] == 200
    assert "steer: classic BPF weights" in server.log(), server.log()  # forced, not eBPF
    assert server.stop() == 0
    for flag, value, allowed in (("--steer-mode", "bpf", "one of auto, ebpf, cbpf, plain"),
                                 ("--stall-ms", "-1", "0"),
                                 ("--health-grace", "0", "seconds > 0")):
        bad = cli("run", "cli_apps:asgi_app", flag, value)
        assert bad.returncode == 1, bad.stderr
        assert flag in bad.stderr and value in bad.stderr and allowed in bad.stderr, bad.stderr
