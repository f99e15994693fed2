"""Orphaned connections (issue 17, L1): no fault leaves the cluster down.

When workers hang or die with connections queued, those fds come back to
the primary as orphans. They are bounded by the fds the primary has left
(room always kept for respawn and control), the oldest shed with a reset
at the bound, and expired after `orphan_timeout`; the primary raises its
soft RLIMIT_NOFILE to the hard limit at start and says so; /healthz fails
once no worker has been alive for `health_grace` seconds.

The outage is reproduced small: RLIMIT_NOFILE 256 (soft and hard, so the
raise cannot help) in the primary, three single-threaded workers that a
request hangs (`timeout` 1 s kills them), 600 clients queued behind them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

from _faults import HTTP_SERVER, children, fd_count, request
from _helpers import env, free_port, http_get, running, script  # noqa: F401

HANGING = HTTP_SERVER + r"""
import logging, resource, time
from http.server import HTTPServer

class Hanging(PidHandler):
    def do_GET(self):
        if self.path == "/hang":
            time.sleep(60)  # the serving loop stops: the watchdog kills us
        super().do_GET()

def serve_single(port):
    server = HTTPServer(("127.0.0.1", port), Hanging, bind_and_activate=False)
    # it serves one request at a time, so its window would be 1 and queued
    # clients would wait in the kernel's backlog: claim more, to be handed a
    # channel full of connections that become orphans when it dies
    server.fastcluster_concurrency = 64
    cluster.listen_server(server)
    cluster.worker.send("serving")
    server.serve_forever(poll_interval=0.1)

if cluster.is_primary:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    soft, hard = (int(x) for x in os.environ["NOFILE"].split(":"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    settings = dict(timeout=1.0, respawn=True, respawn_delay=float(os.environ["DELAY"]),
                    respawn_delay_max=float(os.environ["DELAY"]))
    if os.environ.get("HEALTH"):
        # respawn_burst 0: the hung worker's replacement waits out DELAY too
        settings.update(health=os.environ["HEALTH"], health_grace=0.5, orphan_timeout=0.5,
                        respawn_burst=0)
    cluster.setup_primary(**settings)
    def mark(*parts):
        # the hung workers' stacks (SIGABRT, on the stderr we share) come in
        # many small writes: a marker is one write that begins its own line
        sys.stdout.write("\n" + " ".join(map(str, parts)) + "\n")
        sys.stdout.flush()
    cluster.on("message", lambda w, m: mark(m, w.id, w.pid, time.monotonic()))
    cluster.on("exit", lambda w, code, sig: mark("exit", w.id, w.pid, code, sig,
                                                 time.monotonic()))
    for _ in range(int(os.environ["WORKERS"])):
        cluster.fork()
    print("nofile", *resource.getrlimit(resource.RLIMIT_NOFILE), flush=True)
    cluster.run()
else:
    serve_single(int(os.environ["PORT"]))
"""


def hang_all(port: int, workers: int) -> list[socket.socket]:
    """One hanging request per worker (rr: consecutive connections)."""
    hangs = []
    for _ in range(workers):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /hang HTTP/1.0\r\n\r\n")
        hangs.append(s)
        time.sleep(0.05)
    return hangs


def queue_clients(port: int, n: int) -> list[socket.socket]:
    clients = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            clients.append(s)
    return clients


def outcome(s: socket.socket, deadline: float) -> str:
    """served, reset, closed (empty answer) or hung (nothing by deadline)."""
    s.settimeout(max(0.05, deadline - time.monotonic()))
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return "reset"
    except OSError:
        return "hung"
    return "served" if data.startswith(b"HTTP/1.0 200") else "closed"


def test_orphans_never_exhaust_the_primary_and_respawn_goes_on(tmp_path: Path,
                                                                 env: dict[str, str]) -> None:
    path = script(tmp_path, HANGING)
    port = free_port()
    socks: list[socket.socket] = []
    try:
        with running(path, dict(env, PORT=str(port), NOFILE="256:256", DELAY="0.05",
                                WORKERS="3")) as r:
            first = r.wait_for("serving", 3, timeout=15)
            socks += hang_all(port, 3)
            socks += queue_clients(port, 600)
            # the three are killed (timeout 1 s), their queues come back as
            # orphans; replacements must come and serve what was not shed
            r.wait_for("exit", 3, timeout=10)
            r.wait_for("serving", 6, timeout=15)
            deadline = time.monotonic() + 15
            outcomes = [outcome(s, deadline) for s in socks[3:]]
            fds_after = fd_count(r.pid)
            after = [request(port, timeout=5) for _ in range(30)]
            # respawn keeps working: kill one more, it is replaced. A replacement
            # may have left by itself meanwhile (at its fd limit it hands its
            # channel back and is replaced), its exit line not read yet: the
            # victim is a worker the kernel says is alive now
            serving = [ln.split() for ln in r.seen if ln.startswith("serving")]
            live = {str(p) for p in children(r.pid)}
            alive = [(w, p) for _, w, p, _t in serving if p in live]
            assert alive, (r.seen, live)
            for victim_id, victim_pid in reversed(alive):  # the newest that is still there
                try:
                    os.kill(int(victim_pid), signal.SIGKILL)
                    break
                except ProcessLookupError:
                    continue
            else:
                raise AssertionError(f"every worker left by itself: {r.seen}")
            r.wait_for(f"exit {victim_id} {victim_pid}", timeout=5)
            r.wait_for("serving", len(serving) + 1, timeout=10)
            assert request(port)[0]
            r.signal(signal.SIGTERM)
            code, out = r.finish(timeout=20)
    finally:
        for s in socks:
            s.close()
    text = "\n".join(out)
    assert code == 0, text
    assert len(first) == 3
    assert "respawn failed" not in text, text
    assert "hung" not in outcomes, outcomes.count("hung")
    served = outcomes.count("served")
    assert served > 0, outcomes
    assert fds_after < 200, fds_after
    assert all(ok for ok, _ in after), after
    print(f"orphans: 600 queued behind 3 hung workers at RLIMIT_NOFILE 256: {served} served, "
          f"{outcomes.count('reset')} reset, {outcomes.count('closed')} closed, 0 hung; "
          f"primary at {fds_after} fds after; 30 requests after, all served")


def test_orphans_expire_healthz_fails_without_workers_rlimit_raised(
        tmp_path: Path, env: dict[str, str]) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    path = script(tmp_path, HANGING)
    port, health = free_port(), free_port()
    with running(path, dict(env, PORT=str(port), NOFILE=f"128:{hard}", DELAY="4",
                            WORKERS="1", HEALTH=f"127.0.0.1:{health}")) as r:
        nofile = r.wait_for("nofile")[0].split()
        r.wait_for("serving", timeout=15)
        assert http_get(health, "/healthz")[0] == 200
        socks = hang_all(port, 1) + queue_clients(port, 20)
        exit_t = float(r.wait_for("exit", timeout=10)[0].split()[5])
        # no worker for 4 s (respawn_delay): orphans expire after 0.5 s with
        # a reset; /healthz fails after health_grace (0.5 s)
        deadline = time.monotonic() + 3.0
        outcomes = [outcome(s, deadline) for s in socks[1:]]
        t_out = time.monotonic()
        down = http_get(health, "/healthz")
        r.wait_for("serving", 2, timeout=10)
        up = http_get(health, "/healthz")
        for s in socks:
            s.close()
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=20)
    text = "\n".join(out)
    assert code == 0, text
    assert nofile[1] == nofile[2] and int(nofile[1]) > 128, nofile
    assert "raised the soft RLIMIT_NOFILE from 128 to" in text, text
    assert outcomes == ["reset"] * 20, outcomes
    assert t_out - exit_t < 2.5, t_out - exit_t
    assert down[0] == 503 and b"no worker" in down[2], down
    assert up[0] == 200, up
    print(f"orphans: 20 expired with a reset {t_out - exit_t:.2f} s after their worker died; "
          f"/healthz {down[0]} with no worker, {up[0]} once replaced")


def test_bad_orphan_stall_and_grace_settings_are_clear_errors() -> None:
    import pytest

    from fastcluster.wire.settings import defaults

    cases = [
        ("orphan_timeout", -1, ValueError, "None (no expiry) or a number of seconds from "
         "0.05 to 86400, got -1"),
        ("orphan_timeout", float("nan"), ValueError, "got nan"),
        ("orphan_timeout", "30", TypeError, "got '30'"),
        ("stall_ms", -5, ValueError, "an int from 0 to 60000, got -5"),
        ("stall_ms", 2.5, TypeError, "an int from 0 to 60000, got 2.5"),
        ("health_grace", 0, ValueError, "a finite number of seconds > 0, got 0"),
        ("health_grace", None, TypeError, "got None"),
    ]
    for name, value, exc, words in cases:
        with pytest.raises(exc) as info:
            defaults().merge({name: value})
        assert str(info.value).startswith(f"setting {name!r} must be "), info.value
        assert words in str(info.value), info.value
    ok = defaults().merge({"orphan_timeout": None, "stall_ms": 0, "health_grace": 0.5})
    assert (ok.orphan_timeout, ok.stall_ms, ok.health_grace) == (None, 0, 0.5)
