"""A stopped worker (issue 17, L6): SIGSTOP one worker of two under rr.

The dispatcher skips a worker that has held sent fds without taking them
for longer than `stall_ms` (20 ms here), so the load goes on at the other
worker's pace instead of every other connection waiting in the stopped
one's window; after SIGCONT it takes what it held and nothing is lost.

The watchdog: a stopped worker cannot act on SIGABRT, so one whose state in
/proc is T gets SIGKILL at once and is replaced within `timeout` + 1 s.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from _faults import HTTP_SERVER, Load
from _helpers import env, free_port, running, script  # noqa: F401

STALL = HTTP_SERVER + """
import time

if cluster.is_primary:
    timeout = os.environ.get("TIMEOUT")
    cluster.setup_primary(policy="rr", stall_ms=20, respawn=True,
                          timeout=float(timeout) if timeout else None)
    cluster.on("message", lambda w, m: print(m, w.id, w.pid, time.monotonic(), flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, w.pid, code, sig,
                                                  time.monotonic(), flush=True))
    for _ in range(2):
        cluster.fork()
    cluster.run()
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_rr_skips_a_stopped_worker_and_loses_nothing(tmp_path: Path,
                                                      env: dict[str, str]) -> None:
    path = script(tmp_path, STALL)
    port = free_port()
    with running(path, dict(env, PORT=str(port))) as r:
        pids = [int(ln.split()[2]) for ln in r.wait_for("serving", 2, timeout=15)]
        load = Load(port, threads=32, max_seconds=30, timeout=20).start()
        time.sleep(0.5)
        n0 = load.ok
        time.sleep(1.0)
        before = load.ok - n0
        os.kill(pids[1], signal.SIGSTOP)
        try:
            time.sleep(0.3)
            n1 = load.ok
            time.sleep(1.5)
            during = (load.ok - n1) / 1.5
        finally:
            os.kill(pids[1], signal.SIGCONT)
        time.sleep(0.5)
        load.stop()
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    assert not load.failed, load.failed  # the stopped worker's connections were served
    assert load.pids[str(pids[1])] > 0, load.pids
    # one worker now serves everything, so its own pace (about half the
    # rate of two, here where the workers are the bottleneck) is the
    # ceiling; without the skip the rate fell to 0 (every client thread
    # soon waited on a connection in the stopped worker's window)
    assert during >= 0.4 * before, (before, during, load.pids)
    print(f"stall: rr {before:.0f} req/s before SIGSTOP, {during:.0f} req/s while one "
          f"worker of two was stopped; {load.ok} served, 0 lost after SIGCONT")


def test_stopped_worker_is_killed_at_once_and_replaced(tmp_path: Path,
                                                       env: dict[str, str]) -> None:
    timeout = 1.0
    path = script(tmp_path, STALL)
    port = free_port()
    with running(path, dict(env, PORT=str(port), TIMEOUT=str(timeout))) as r:
        pids = [int(ln.split()[2]) for ln in r.wait_for("serving", 2, timeout=15)]
        time.sleep(0.3)  # both beat
        t_stop = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        exit_line = r.wait_for("exit", timeout=timeout + 5)[0].split()
        third = r.wait_for("serving", 3, timeout=10)[2].split()
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    text = "\n".join(out)
    assert code == 0, text
    assert int(exit_line[2]) == pids[1] and exit_line[4] == "SIGKILL", exit_line
    assert "is stopped" in text, text
    replaced = float(third[3]) - t_stop
    assert replaced < timeout + 1.0, (replaced, text)
    print(f"stall: stopped worker replaced {replaced:.3f} s after SIGSTOP (timeout {timeout} s)")
