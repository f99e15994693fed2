"""Bad input (issue E): a worker's garbage on its control channel, a worker
misusing its data channel, clients that misbehave. In every case the primary
keeps serving (a request answered by another worker proves it) and no
exception escapes it.

The misbehaving workers reach into the runtime (`_role.runtime`) to write
what a buggy or hostile worker could write; everything else is public API.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from _faults import HTTP_SERVER, Load, cpu_seconds, fd_count, request, wait_until
from _helpers import env, free_port, running, script  # noqa: F401

CONTROL = HTTP_SERVER + """
import random, struct, time
from fastcluster import _role

MODES = ["truncated", "short_header", "oversized", "bad_json", "unknown", "flood_random",
         "flood_junk_frames", "flood_unknown"]

def frame(body):
    return struct.pack(">I", len(body)) + body

def misbehave(mode):
    ctl = _role.runtime.ctl
    with ctl.lock:
        ctl.sock.setblocking(True)
        send = ctl.sock.sendall
        if mode == "truncated":      # a header for 100 bytes, 10 of them, then exit
            send(struct.pack(">I", 100) + b'{"t": "msg')
            os._exit(7)
        if mode == "short_header":   # 2 bytes of a header, then exit
            send(b"\\x00\\x00")
            os._exit(8)
        if mode == "oversized":      # one byte over the limit: fatal, SIGKILLed
            from fastcluster.wire.frames import MAX_FRAME
            send(struct.pack(">I", MAX_FRAME + 1) + b"{" * 1000)
        elif mode == "bad_json":     # well framed, not JSON: tolerated 16 times
            for i in range(40):
                send(frame(b"{not json %d" % i))
        elif mode == "unknown":      # well formed, unknown types: ignored
            for i in range(2000):
                send(frame(b'{"t": "no-such-type-%d", "x": [1, 2, 3]}' % i))
            send(frame(b'{"t": "msg", "d": "after unknown"}'))
            os._exit(0)
        elif mode == "flood_random":  # random bytes at full speed
            rng = random.Random(5)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                send(rng.randbytes(65536))
        elif mode == "flood_junk_frames":  # valid frames of junk at full speed
            junk = frame(b"\\xff" * 1000) * 64
            end = time.monotonic() + 3
            while time.monotonic() < end:
                send(junk)
        elif mode == "flood_unknown":  # valid frames the primary ignores, for 2 s
            junk = frame(b'{"t": "no-such-type", "x": "%s"}' % (b"y" * 900)) * 64
            end = time.monotonic() + 2
            while time.monotonic() < end:
                send(junk)
            os._exit(0)
    time.sleep(5)
    os._exit(9)  # not reached when the primary kills us

if cluster.is_primary:
    cluster.setup_primary(respawn=False)  # each bad worker is killed once, not replaced
    good = cluster.fork({"MODE": "good"})
    todo = list(MODES)
    errors = {}

    def next_bad():
        if not todo:
            print("all done", flush=True)
            return
        mode = todo.pop(0)
        w = cluster.fork({"MODE": mode})
        errors[w.id] = [mode, 0, 0]
        def on_error(e, w=w):
            errors[w.id][1 if e.fatal else 2] += 1
        w.on("error", on_error)
        def on_exit(code, sig, w=w):
            mode, fatal, soft = errors[w.id]
            print("exit", mode, code, sig, "fatal", fatal, "soft", soft, flush=True)
            next_bad()
        w.on("exit", on_exit)

    def on_message(w, m):
        print("message", w.id, w.pid, m, flush=True)
        if w is good and m == "serving":
            next_bad()
    cluster.on("message", on_message)
    cluster.run()
    print("primary done", flush=True)
else:
    mode = os.environ["MODE"]
    if mode == "good":
        serve_http(int(os.environ["PORT"]))
    else:
        misbehave(mode)
"""


def test_bad_control_frames_are_survived(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, CONTROL)
    port = free_port()
    with running(path, dict(env, PORT=str(port))) as r:
        good_pid = r.wait_for("message 1 ")[0].split()[2]
        load = Load(port, threads=2, max_seconds=60).start()
        r.wait_for("all done", timeout=60)
        load.stop()
        assert load.failed == {} and load.ok > 0, dict(load.failed)
        ok, served_by = request(port)
        assert ok, served_by
        assert served_by == good_pid
        assert set(load.pids) == {good_pid}
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    exits = [ln for ln in out if ln.startswith("exit ")]
    assert exits == [
        "exit truncated 7 None fatal 0 soft 0",
        "exit short_header 8 None fatal 0 soft 0",
        "exit oversized None SIGKILL fatal 1 soft 0",
        "exit bad_json None SIGKILL fatal 0 soft 17",
        "exit unknown 0 None fatal 0 soft 0",
        "exit flood_random None SIGKILL fatal 1 soft 0",
        "exit flood_junk_frames None SIGKILL fatal 0 soft 17",
        "exit flood_unknown 0 None fatal 0 soft 0",
    ], out
    logged = "\n".join(out)
    assert logged.count("broke the control protocol") == 4
    assert logged.count("sent a bad control frame") == 32
    assert [ln.split()[-2:] for ln in out if ln.startswith("message 6 ")] == [
        ["after", "unknown"]]
    assert "primary done" in out
    assert not [ln for ln in out if "Traceback" in ln], out
    print(f"control garbage: {load.attempted} requests during it, "
          f"{sum(load.failed.values())} failed")


DATA = HTTP_SERVER + """
import signal, socket, threading, time
from fastcluster import _role

def data_channel():
    return socket.socket(fileno=os.dup(_role.runtime.intake.channel.fileno()))

if cluster.is_primary:
    # the idle worker is to hold its rr share until it hangs up: with the
    # stall skip (stall_ms, tests/test_faults_stall.py) it would be passed
    # over once it sat on its first fds, and the hang-up path go untested
    cluster.setup_primary(stall_ms=0)
    for role in ("hangup", "good", "chatter"):
        cluster.fork({"ROLE": role})
    cluster.on("message", lambda w, m: print(m, w.pid, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.pid, code, sig, flush=True))
    cluster.run()
else:
    role = os.environ["ROLE"]
    port = int(os.environ["PORT"])
    if role == "good":
        serve_http(port)
    elif role == "chatter":
        def chatter():  # bytes (no fds) on the data channel at full speed, 3 s
            chan = data_channel()
            chan.setblocking(False)
            end = time.monotonic() + 3
            while time.monotonic() < end:
                try:
                    chan.send(b"garbage!" * 8)
                except BlockingIOError:
                    time.sleep(0.001)
            chan.close()
            cluster.worker.send("chattered")
        threading.Thread(target=chatter, daemon=True).start()
        serve_http(port)
    else:
        # listens, takes nothing; on SIGUSR1 hangs up its data channel
        server = ThreadingHTTPServer(("127.0.0.1", port), PidHandler, bind_and_activate=False)
        cluster.listen_server(server)
        go = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *a: go.set())
        cluster.worker.send("idle")
        while not go.wait(0.05):
            pass
        chan = data_channel()
        chan.shutdown(socket.SHUT_RDWR)
        chan.close()
        cluster.worker.send("hung up")
        cluster.run()
"""


def test_worker_misusing_its_data_channel(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, DATA)
    port = free_port()
    results: list[tuple[bool, str]] = []
    waited: list[float] = []

    def one() -> None:
        t0 = time.monotonic()
        results.append(request(port, timeout=15))
        waited.append(time.monotonic() - t0)

    with running(path, dict(env, PORT=str(port))) as r:
        idle = int(r.wait_for("idle")[0].split()[1])
        good = r.wait_for("serving", 2)
        load = Load(port, threads=2, max_seconds=30).start()
        burst = [threading.Thread(target=one) for _ in range(60)]
        for t in burst:
            t.start()
        time.sleep(0.5)  # a third of the burst waits, sent to the idle worker
        os.kill(idle, signal.SIGUSR1)
        r.wait_for("hung up")
        for t in burst:
            t.join(20)
        r.wait_for("chattered", timeout=10)
        load.stop()
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    serving = {ln.split()[1] for ln in good}
    assert len(results) == 60 and all(ok for ok, _ in results), results
    assert {pid for _, pid in results} <= serving
    # the idle worker's share waited until its hang-up, then went elsewhere
    assert sum(w >= 0.45 for w in waited) >= 10, sorted(waited)
    assert load.failed == {} and set(load.pids) == serving, (dict(load.failed), load.pids)
    assert not [ln for ln in out if "Traceback" in ln], out
    print(f"data channel: {60 + load.attempted} requests, "
          f"{sum(load.failed.values())} failed")


CLIENTS = HTTP_SERVER + """
if cluster.is_primary:
    for _ in range(2):
        cluster.fork()
    cluster.on("message", lambda w, m: print(m, w.pid, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.pid, code, sig, flush=True))
    cluster.run()
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_misbehaving_clients_do_not_disturb_the_dispatcher(tmp_path: Path,
                                                           env: dict[str, str]) -> None:
    path = script(tmp_path, CLIENTS)
    port = free_port()
    idle: list[socket.socket] = []
    counts = {"idle": 100, "half_closed": 200, "rst": 2000}
    try:
        with running(path, dict(env, PORT=str(port))) as r:
            r.wait_for("serving", 2)
            assert request(port)[0]
            fds_before = fd_count(r.pid)
            # connections that never send: the primary never reads them
            for _ in range(counts["idle"]):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.3)
            cpu0 = cpu_seconds(r.pid)
            time.sleep(1.0)
            idle_cpu = cpu_seconds(r.pid) - cpu0
            load = Load(port, threads=2, max_seconds=30).start()
            # half-closed: the request side shut at once; the server sees EOF
            eof = 0
            for _ in range(counts["half_closed"]):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.shutdown(socket.SHUT_WR)
                    eof += s.recv(100) == b""
            # RST storm: connect, then close with SO_LINGER 0
            linger0 = struct.pack("ii", 1, 0)
            for _ in range(counts["rst"]):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
                s.connect(("127.0.0.1", port))
                s.close()
            load.stop()
            assert request(port)[0]
            for s in idle:
                s.close()
            idle.clear()
            fds_back = wait_until(lambda: fd_count(r.pid) == fds_before, 5)
            fds_after = fd_count(r.pid)
            r.signal(signal.SIGTERM)
            code, out = r.finish(timeout=15)
    finally:
        for s in idle:
            s.close()
    assert code == 0, out
    assert idle_cpu < 0.05, idle_cpu
    assert eof == counts["half_closed"]
    assert load.failed == {} and load.ok > 0, dict(load.failed)
    assert len(load.pids) == 2
    assert fds_back, (fds_before, fds_after)
    assert sorted(ln.split()[2:] for ln in out if ln.startswith("exit ")) == [["0", "None"]] * 2
    print(f"clients: {sum(counts.values())} misbehaving connections, {load.attempted} "
          f"requests meanwhile, {sum(load.failed.values())} failed; primary fds "
          f"{fds_before} -> {fds_after}; primary CPU with {counts['idle']} idle "
          f"connections: {idle_cpu:.3f} s over 1 s")


FIELDS = HTTP_SERVER + """
import json, struct
from fastcluster import _role

FRAMES = [
    {"t": "msg"},                                              # no "d"
    {"t": "msg", "d": 1, "nfds": "x"},
    {"t": "online", "pid": "x", "extra": [1]},
    {"t": "listen", "req": "x", "address": ["127.0.0.1", 0]},
    {"t": "listen", "req": 1, "address": ["::1", "0", 0, 0]},
    {"t": "listen", "req": 2, "address": ["::1", 0, -1, 0]},
    {"t": "listen", "req": 3, "address": "/nonexistent/dir/sock", "backlog": 10 ** 30},
    {"t": "listen", "req": 4, "address": "x" * 300},                 # path too long
    {"t": "listen", "req": 5, "address": ["no-such-host.invalid\\u0000", 0]},
    {"t": "listen", "req": 6, "address": ["256.1.1.1", 0]},
    {"t": "listen", "req": 7, "address": ["localhost", 0, 0]},
    {"t": "listen", "req": 8, "address": ["", 99999]},
    {"t": "listen", "req": 9, "address": {"host": "x"}},
    {"t": "listen", "req": 10, "address": None, "backlog": True},
    {"t": "listen", "req": 2 ** 80, "address": 99999},
    {"t": "listening", "address": {"a": 1}},
    {"t": "listening", "address": ["h", "not a port"]},
    {"t": "unlisten", "lid": "abc"},
    {"t": "unlisten", "lid": 10 ** 30},
    {"t": "unlisten", "lid": -1},
    {"t": "unlisten"},
    {"t": "disconnecting", "x": 1},
    {"t": ""},
    {"t": "x" * 100000},
]

def fds():
    return len(os.listdir("/proc/self/fd"))

if cluster.is_primary:
    good = cluster.fork({"ROLE": "good"})
    errors = []
    def on_message(w, m):
        print("message", m, w.pid, flush=True)
        if m == "serving":
            bad = cluster.fork({"ROLE": "bad"})
            bad.on("error", lambda e: errors.append(type(e).__name__))
        elif m == "ready":
            baseline.append(fds())
            w.send("go")
        elif m == "sent":
            print("errors", len(errors), set(errors), flush=True)
            print("fds kept", fds() - baseline[0], flush=True)
            w.disconnect()
    baseline = []
    cluster.on("message", on_message)
    cluster.run()
else:
    if os.environ["ROLE"] == "good":
        serve_http(int(os.environ["PORT"]))
    else:
        ctl = _role.runtime.ctl
        import threading
        go = threading.Event()
        cluster.worker.on("message", lambda m: go.set())
        cluster.worker.send("ready")
        go.wait(10)
        with ctl.lock:
            ctl.sock.setblocking(True)
            for f in FRAMES:
                body = json.dumps(f).encode()
                ctl.sock.sendall(struct.pack(">I", len(body)) + body)
            ctl.sock.setblocking(False)
        cluster.worker.send("sent")
        cluster.run()
"""


def test_well_formed_frames_with_bad_fields(tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, FIELDS), dict(env, PORT=str(port))) as r:
        r.wait_for("message sent", timeout=15)
        ok, _pid = request(port)
        assert ok
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    errors = [ln for ln in out if ln.startswith("errors ")]
    assert errors and errors[0].endswith("{'ProtocolError'}"), out
    assert "fds kept 0" in out, "\n".join(out)
    assert not [ln for ln in out if "Traceback" in ln], out


CLOSER = HTTP_SERVER + """
from fastcluster import _role

if cluster.is_primary:
    cluster.setup_primary(timeout=1.0, respawn=False)
    cluster.fork({"ROLE": "closer"})
    cluster.fork({"ROLE": "good"})
    cluster.on("message", lambda w, m: print(m, w.pid, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.pid, code, sig, flush=True))
    cluster.run()
else:
    port = int(os.environ["PORT"])
    if os.environ["ROLE"] == "good":
        serve_http(port)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", port), PidHandler, bind_and_activate=False)
        cluster.listen_server(server)
        # a bug closes the data channel's fd under the runtime (no shutdown): the
        # primary, which holds the channel's other end, sees no hang-up
        os.close(_role.runtime.intake.channel.fileno())
        cluster.worker.send("closed")
        if os.environ["MODE"] == "accepting":
            server.serve_forever()  # its next accept() finds the channel broken
        else:
            cluster.run()  # never accepts: the primary finds the intake stalled
"""


@pytest.mark.parametrize("mode", ["accepting", "idle"])
def test_worker_whose_data_channel_fd_is_closed(tmp_path: Path, env: dict[str, str],
                                                mode: str) -> None:
    port = free_port()
    results: list[tuple[bool, str, float]] = []

    def one() -> None:
        t0 = time.monotonic()
        ok, pid = request(port, timeout=10)
        results.append((ok, pid, time.monotonic() - t0))

    with running(script(tmp_path, CLOSER), dict(env, PORT=str(port), MODE=mode)) as r:
        closer = r.wait_for("closed")[0].split()[1]
        good = r.wait_for("serving")[0].split()[1]
        burst = [threading.Thread(target=one) for _ in range(20)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(15)
        gone = "0 None" if mode == "accepting" else "None SIGABRT"
        r.wait_for(f"exit {closer} {gone}")
        assert request(port)[1] == good
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    assert len(results) == 20 and all(ok for ok, _, _ in results), results
    assert {pid for _, pid, _ in results} == {good}
    logged = "\n".join(out)
    if mode == "accepting":  # the worker saw it, finished and left; its queue read back
        assert "worker data channel failed" in logged
    else:  # stalled for the hang timeout (1 s), then killed; its queue read back
        waited = sorted(t for _, _, t in results)
        assert 0.9 <= waited[-1] < 4, waited
        assert "has not taken the connections waiting for it" in logged
