"""A fault of ours in the primary's handling of one event is logged with
its traceback and the loop goes on (issue 17: the primary never dies
because of a worker). CI found the case that motivated it: a frame that
reached a dispatcher call for a worker the dispatcher no longer had
(test_faults_frames.py). Here the fault is injected where no real one is
known: a worker's exit whose handling raises once.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from _faults import HTTP_SERVER, request
from _helpers import env, free_port, running, script  # noqa: F401

FAULTY_EXIT = HTTP_SERVER + """
from fastcluster import _role

if cluster.is_primary:
    cluster.setup_primary(respawn=False)
    cluster.on("message", lambda w, m: print(m, w.id, w.pid, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
    recycler = _role.primary()._recycler
    plain = recycler.on_exit
    faults = [1]

    def on_exit(proc):  # the first exit's handling fails half-way
        if faults:
            faults.pop()
            raise RuntimeError("injected fault")
        plain(proc)
    recycler.on_exit = on_exit
    for _ in range(3):
        cluster.fork()
    cluster.run()
    print("primary done", flush=True)
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_a_fault_while_handling_an_exit_leaves_the_loop_running(
        tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, FAULTY_EXIT), dict(env, PORT=str(port))) as r:
        pids = {ln.split()[1]: int(ln.split()[2]) for ln in r.wait_for("serving", 3, timeout=15)}
        os.kill(pids["1"], signal.SIGKILL)  # its exit's handling raises
        r.wait_for("exit 1 ", timeout=5)
        os.kill(pids["2"], signal.SIGKILL)  # and the next exit is as usual
        r.wait_for("exit 2 ", timeout=5)
        served = [request(port) for _ in range(5)]
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    text = "\n".join(out)
    assert all(ok for ok, _by in served), (served, text)
    assert "handling worker 1's exit raised" in text and "injected fault" in text, text
    assert "exit 3 0 None" in text, text  # the last one disconnected and exited at SIGTERM
    assert "primary done" in text and code == 0, text


FAULTY_CHANNEL = HTTP_SERVER + """
import threading, time
from fastcluster import _role

if cluster.is_primary:
    cluster.setup_primary(respawn=False)
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
    primary = _role.primary()

    def on_message(w, m):
        print(m, w.id, w.pid, flush=True)
        if m == "serving" and w.id == 1:  # its next read fails, and would each time
            def boom(*_a, **_k):
                raise RuntimeError("injected channel fault")
            primary._procs[w.id].chan.read = boom
    cluster.on("message", on_message)
    for _ in range(2):
        cluster.fork()
    cluster.run()
    print("primary done", flush=True)
else:
    if cluster.worker.id == 1:
        def again():
            time.sleep(0.5)
            cluster.worker.send("again")
        threading.Thread(target=again, daemon=True).start()
    serve_http(int(os.environ["PORT"]))
"""


def test_a_fault_on_a_workers_channel_kills_that_worker_not_the_loop(
        tmp_path: Path, env: dict[str, str]) -> None:
    """Left readable, a channel whose handling raises would come back on
    every turn of the loop: the worker is killed once, the loop goes on."""
    port = free_port()
    with running(script(tmp_path, FAULTY_CHANNEL), dict(env, PORT=str(port))) as r:
        r.wait_for("serving", 2, timeout=15)
        r.wait_for("exit 1 None SIGKILL", timeout=5)
        served = [request(port) for _ in range(5)]
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    text = "\n".join(out)
    assert all(ok for ok, _by in served), (served, text)
    assert text.count("serving worker 1's channel raised") == 1, text
    assert "exit 2 0 None" in text and "primary done" in text and code == 0, text


FAULTY_READER = HTTP_SERVER + """
import resource, time
from fastcluster import _role

if cluster.is_primary:
    primary = _role.primary()
    cluster.fork()
    r, w = os.pipe()
    os.write(w, b"x")  # readable for good: nobody reads it

    def boom():
        raise RuntimeError("injected reader fault")

    def check():
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        print("cpu", cpu.ru_utime + cpu.ru_stime - start[0], flush=True)
        cluster.disconnect()
    start = [0.0]

    def arm():
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        start[0] = cpu.ru_utime + cpu.ru_stime
        primary.add_reader(r, boom)
        primary._timers.call_later(1.0, check)
    cluster.on("listening", lambda w, a: arm())
    cluster.run()
    print("primary done", flush=True)
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_a_reader_that_raises_is_dropped_not_called_every_turn(
        tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, FAULTY_READER), dict(env, PORT=str(port))) as r:
        cpu = float(r.wait_for("cpu ", timeout=15)[0].split()[1])
        code, out = r.finish(timeout=15)
    text = "\n".join(out)
    assert cpu < 0.3, (cpu, text[-2000:])  # a spinning loop takes the whole second
    assert text.count("raised; it is no longer watched") == 1, text
    assert "primary done" in text and code == 0, text
