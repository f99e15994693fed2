"""A stopped worker (issue 17, L6): SIGSTOP one worker of two under rr.

The dispatcher skips a worker that has held sent fds without taking them
for longer than `stall_ms` (20 ms here), so an open-loop load (400/s, what
one worker serves alone) goes on at its pace instead of every other
connection waiting in the stopped worker's channel, which took the rate
to 0; after SIGCONT it takes what it held and nothing is lost.

The watchdog: a stopped worker cannot act on SIGABRT, so one whose state in
/proc is T gets SIGKILL at once and is replaced within `timeout` + 1 s.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path

from _faults import HTTP_SERVER, request
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


class Paced:
    """Open-loop load: a request every 1/rate s, each in a pool thread, for
    `seconds` (bounded: rate x seconds requests). A closed loop of client
    threads would not do: on a loaded machine the slower worker holds most
    of them in its channel already when it is stopped, and no skip can
    give back what was sent before the stop."""

    def __init__(self, port: int, rate: float, seconds: float, threads: int = 96) -> None:
        self.port, self.rate, self.seconds = port, rate, seconds
        self.done: list[tuple[float, bool, str]] = []  # (time, ok, pid or why)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
        self._pacer = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Paced:
        self._pacer.start()
        return self

    def _one(self) -> None:
        ok, what = request(self.port, timeout=20)
        self.done.append((time.monotonic(), ok, what))

    def _run(self) -> None:
        t0 = time.monotonic()
        for i in range(int(self.rate * self.seconds)):
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._pool.submit(self._one)

    def join(self) -> None:
        self._pacer.join(self.seconds + 5)
        self._pool.shutdown(wait=True)

    def served(self, start: float, end: float) -> float:
        """Requests served per second in [start, end)."""
        return sum(1 for t, ok, _ in self.done if ok and start <= t < end) / (end - start)


def test_rr_skips_a_stopped_worker_and_loses_nothing(tmp_path: Path,
                                                      env: dict[str, str]) -> None:
    path = script(tmp_path, STALL)
    port = free_port()
    with running(path, dict(env, PORT=str(port))) as r:
        pids = [int(ln.split()[2]) for ln in r.wait_for("serving", 2, timeout=15)]
        # 400/s: what one worker serves alone with room to spare here
        load = Paced(port, rate=400, seconds=4.0).start()
        time.sleep(0.5)
        t_before = time.monotonic()
        time.sleep(1.0)
        t_stop = time.monotonic()
        os.kill(pids[1], signal.SIGSTOP)
        try:
            time.sleep(1.8)
        finally:
            os.kill(pids[1], signal.SIGCONT)
        load.join()
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, "\n".join(out)
    before = load.served(t_before, t_stop)
    during = load.served(t_stop + 0.3, t_stop + 1.8)
    failed = [what for _, ok, what in load.done if not ok]
    stopped_served = sum(1 for _, ok, pid in load.done if ok and pid == str(pids[1]))
    assert len(load.done) == 1600 and not failed, failed  # nothing lost
    assert stopped_served > 0
    # without the skip every other request waited in the stopped worker's
    # channel until every pool thread was caught there: the rate fell to 0
    assert during >= 0.5 * before, (before, during)
    print(f"stall: rr {before:.0f} req/s before SIGSTOP (400/s offered), {during:.0f} req/s "
          f"while one worker of two was stopped; 1600 served, 0 lost after SIGCONT")


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
