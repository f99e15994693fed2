"""The `steer` policy with real processes (issue 14): a primary with workers
that accept natively on their slot's socket, real clients on loopback, real
signals. The scenario script is test_supervisor.py's (an http.server worker
answering its pid); each test reads the primary's event and log lines.

Every client loop is bounded in count and time.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _helpers import env, http_get, running, wait_dead  # noqa: F401
from test_supervisor import Load, live_workers, pids_of, socket_activated, start, wait_until

from fastcluster import _core


def _bpf_refused() -> str | None:
    try:
        _core.Steer(1, _core.STEER_EBPF).close()
    except PermissionError as exc:
        return f"bpf() refused here: {exc}"
    return None


needs_bpf = pytest.mark.skipif(_bpf_refused() is not None, reason=str(_bpf_refused()))


def hold(port: int, n: int) -> list[socket.socket]:
    """n connections that send nothing yet: each stays open in its worker."""
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def ask(conns: list[socket.socket]) -> collections.Counter[int]:
    """Sends a request on each held connection; the pids that answered."""
    for c in conns:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    pids: collections.Counter[int] = collections.Counter()
    for c in conns:
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), data
        pids[int(body)] += 1
    return pids


@needs_bpf
def test_ebpf_steers_each_connection_to_the_worker_with_fewest_open(
        tmp_path: Path, env: dict[str, str]) -> None:
    path, run_env, port = start(tmp_path, env, workers=2, policy="steer")
    with running(path, run_env) as r:
        pids = set(pids_of(r.wait_for("listening", 2)))
        r.wait_for("steer: eBPF program")
        # open connections count until closed: 8 held ones split exactly
        assert ask(hold(port, 8)) == collections.Counter({p: 4 for p in pids})
        served = collections.Counter(int(http_get(port)[2]) for _ in range(40))
        assert set(served) <= pids and sum(served.values()) == 40
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


@pytest.mark.parametrize("mode", ["cbpf", "plain"])
def test_forced_modes_serve_every_request(tmp_path: Path, env: dict[str, str],
                                          mode: str) -> None:
    path, run_env, port = start(tmp_path, env, workers=2, policy="steer", steer_mode=mode)
    with running(path, run_env) as r:
        pids = set(pids_of(r.wait_for("listening", 2)))
        r.wait_for({"cbpf": "steer: classic BPF weights", "plain": "steer: plain"}[mode])
        served = collections.Counter(int(http_get(port)[2]) for _ in range(60))
        assert set(served) <= pids and sum(served.values()) == 60
        if mode == "cbpf":  # weights from open connections: a held one weighs its worker
            assert len(served) == 2, served
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


def test_without_bpf_privilege_the_primary_falls_back_to_classic_bpf(
        tmp_path: Path, env: dict[str, str]) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not installed: apt-get install util-linux")
    if os.geteuid() != 0:
        pytest.skip("not root: bpf() is refused anyway (the other tests cover that path)")
    drop = [setpriv, "--inh-caps=-bpf,-sys_admin", "--bounding-set=-bpf,-sys_admin", "--"]
    probe = subprocess.run([*drop, "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop CAP_BPF here: {probe.stderr.strip()}")
    path, run_env, port = start(tmp_path, env, workers=2, policy="steer")
    with running(path, run_env, prefix=tuple(drop)) as r:
        pids = set(pids_of(r.wait_for("listening", 2)))
        refused = r.wait_for("steer: the eBPF program is refused")[0]
        assert "Operation not permitted" in refused, refused
        r.wait_for("steer: classic BPF weights")
        served = collections.Counter(int(http_get(port)[2]) for _ in range(40))
        assert set(served) <= pids and sum(served.values()) == 40
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


@needs_bpf
def test_queued_connections_survive_a_sigkilled_worker(tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    path, run_env, port = start(tmp_path, env, workers=2, policy="steer")
    with running(path, run_env) as r:
        stopped, other = pids_of(r.wait_for("listening", 2))
        os.kill(stopped, signal.SIGSTOP)  # accepts nothing: its share waits in its queue
        conns = hold(port, 8)  # 4 accepted by `other`, 4 queued for `stopped`
        os.kill(stopped, signal.SIGKILL)
        assert wait_dead([stopped], 5) == []
        new = [p for p in pids_of(r.wait_for("listening", 3)) if p not in (stopped, other)]
        served = ask(conns)  # the replacement serves the dead worker's queue: none reset
        assert served == collections.Counter({other: 4, new[0]: 4}), served
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


@needs_bpf
@pytest.mark.parametrize("how", ["ttou", "hup", "hup-spawn"])
def test_ttou_and_rolling_restart_lose_nothing_under_load(tmp_path: Path, env: dict[str, str],
                                                          how: str) -> None:
    workers = 3
    method = "spawn" if how.endswith("spawn") else "fork"  # spawn: the fds come by message
    path, run_env, port = start(tmp_path, env, workers=workers, policy="steer",
                                graceful_timeout=5, start_method=method)
    with running(path, run_env) as r:
        first = set(pids_of(r.wait_for("listening", workers)))
        load = Load(port, max_requests=6000, max_seconds=20)
        try:
            assert wait_until(lambda: load.ok >= 200, 8)
            if how == "ttou":
                r.signal(signal.SIGTTOU)
                r.wait_for("exit", timeout=5)
                r.signal(signal.SIGTTOU)
                r.wait_for("exit", 2, timeout=5)
                assert wait_until(lambda: len(live_workers(r.seen)) == 1, 3, r)
            else:  # rolling restart: replacements in new slots, the old slots retired
                r.signal(signal.SIGHUP)
                assert wait_until(lambda: not live_workers(r.seen) & first
                                  and len(live_workers(r.seen)) == workers, 15, r)
            after = load.ok
            assert wait_until(lambda: load.ok >= after + 200, 8)
        finally:
            load.stop()
        alive = live_workers(r.seen)
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert load.failed == [], (load.ok, load.failed[:5])
    assert set(load.pids) & alive  # the ones left served after the change
    assert code == 0


@needs_bpf
def test_hung_worker_is_steered_away_from_before_it_is_killed(tmp_path: Path,
                                                              env: dict[str, str]) -> None:
    # SIGABRT ignored: the hung worker lives until the SIGKILL ABORT_GRACE (2 s) later,
    # and no replacement can take its slot's connections meanwhile
    ignore = "import signal as _s\n_s.signal(_s.SIGABRT, _s.SIG_IGN)\n"
    path, run_env, port = start(tmp_path, env, workers=2, extra=ignore, policy="steer",
                                timeout=1)
    with running(path, run_env) as r:
        hung, other = pids_of(r.wait_for("listening", 2))
        # its serve_forever() beats from its first turn, just after "listening"
        # (a worker stopped before its first beat is not beating, so not hung)
        time.sleep(0.5)
        os.kill(hung, signal.SIGSTOP)  # no heartbeat: the watchdog takes it for hung
        r.wait_for("fastcluster: worker", timeout=10)  # "... is hung: ...; SIGABRT"
        assert any("is hung" in ln for ln in r.seen), r.seen
        # fewest open would give it half of these; biased out, it gets none
        got = ask(hold(port, 6))
        assert got == collections.Counter({other: 6}), (got, hung, other, r.seen)
        r.wait_for("exit", timeout=10)
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


@pytest.mark.parametrize("after", ["rr", "steer"])
def test_the_port_binds_again_at_once_after_a_steer_primary_stops(
        tmp_path: Path, env: dict[str, str], after: str) -> None:
    # the server closes first (HTTP/1.0), so TIME_WAITs are left on the port
    path, run_env, port = start(tmp_path, env, workers=2, policy="steer")
    with running(path, run_env) as r:
        r.wait_for("listening", 2)
        assert all(http_get(port)[0] == 200 for _ in range(20))
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0
    again = dict(run_env, SETTINGS='{"policy": "%s"}' % after)
    with running(path, again) as r:
        r.wait_for("listening", 2)  # before the fix: EADDRINUSE in the workers
        assert http_get(port)[0] == 200
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


UNIX = """
import logging, os, socket
import fastcluster as cluster
if cluster.is_primary:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cluster.setup_primary(policy="steer")
    cluster.on("listening", lambda w, a: print("listening", w.id, w.pid, flush=True))
    for _ in range(2):
        cluster.fork()
    cluster.run()
else:
    lst = cluster.listen(os.environ["SOCK"])
    while True:
        conn, _ = lst.accept()
        with conn:
            conn.sendall(str(os.getpid()).encode())
"""


def test_unix_address_falls_back_to_least_with_a_log_line(tmp_path: Path,
                                                         env: dict[str, str]) -> None:
    path = tmp_path / "unix.py"
    path.write_text(UNIX)
    sock_path = str(tmp_path / "s.sock")
    with running(path, dict(env, SOCK=sock_path)) as r:
        pids = set(pids_of(r.wait_for("listening", 2)))
        r.wait_for("steer: ")
        assert any("is a Unix socket" in ln and "least" in ln for ln in r.seen), r.seen
        served: collections.Counter[int] = collections.Counter()
        for _ in range(10):
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(5)
                c.connect(sock_path)
                served[int(c.recv(64))] += 1
        assert set(served) == pids  # least over idle workers alternates
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


def test_a_systemd_socket_is_served_under_least_with_the_reason(tmp_path: Path,
                                                               env: dict[str, str]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    path, run_env, _ = start(tmp_path, env, workers=2, policy="steer")
    run_env.update(PORT=str(port))
    proc = socket_activated(listener, path, run_env, tmp_path)
    try:
        deadline = time.monotonic() + 10
        statuses: list[int] = []
        while time.monotonic() < deadline and len(statuses) < 6:
            try:
                statuses.append(http_get(port)[0])
            except OSError:
                time.sleep(0.05)  # the workers are not listening yet: queued, or refused
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert statuses == [200] * 6, out
    assert "came from systemd, listening already: served under `least`" in out, out
    assert proc.returncode == 0, out


@needs_bpf
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_worker_maps_only_its_own_page_and_holds_no_bpf_fd(tmp_path: Path,
                                                             env: dict[str, str],
                                                             method: str) -> None:
    path, run_env, port = start(tmp_path, env, workers=2, policy="steer", start_method=method)
    with running(path, run_env) as r:
        pids = pids_of(r.wait_for("listening", 2))
        assert http_get(port)[0] == 200
        for pid in pids:
            targets = []
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            assert not [t for t in targets if "bpf" in t or "fastcluster-steer" in t], targets
            with open(f"/proc/{pid}/maps") as f:
                maps = [ln.split() for ln in f if "bpf-map" in ln or "fastcluster-steer" in ln]
            assert len(maps) == 1, maps  # its own page, nothing of the siblings'
            lo, hi = (int(x, 16) for x in maps[0][0].split("-"))
            assert hi - lo == _core.STEER_PAGE_SIZE, maps
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0
