"""Control frames are bounded (issue 17, item 8): a frame over `max_frame`
(1 MiB by default) is refused at its header, and a partial frame held longer
than `frame_timeout` is dropped with the worker's channel (the worker is
killed, as for garbage). The primary's peak RSS (VmHWM) stays near where it
was, its loop is never late by more than 0.5 s (a 20 ms timer's lateness),
and it keeps serving through its good worker.
"""

from __future__ import annotations

import signal
from pathlib import Path

from _faults import HTTP_SERVER, request
from _helpers import env, free_port, running, script  # noqa: F401

FRAMES = HTTP_SERVER + """
import struct, time
from fastcluster import _role

MODES = ["big28", "partial64", "stall"]

def hwm_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

def misbehave(mode):
    ctl = _role.runtime.ctl
    with ctl.lock:
        ctl.sock.setblocking(True)
        send = ctl.sock.sendall
        try:
            if mode == "big28":  # one whole, valid 28 MiB frame
                body = b'{"t":"msg","d":"' + b"x" * (28 << 20) + b'"}'
                send(struct.pack(">I", len(body)) + body)
            elif mode == "partial64":  # 60 MiB of a 64 MiB frame, then nothing
                send(struct.pack(">I", 64 << 20))
                chunk = b"x" * (1 << 20)
                for _ in range(60):
                    send(chunk)
            else:  # 500 KiB of a 900 KiB frame (under the limit), then nothing
                send(struct.pack(">I", 900 << 10) + b'{"t":"msg","d":"' + b"x" * (500 << 10))
        except OSError:
            pass  # the primary hung up on us
    time.sleep(30)
    os._exit(9)  # not reached when the primary kills us

if cluster.is_primary:
    try:
        cluster.setup_primary(respawn=False, frame_timeout=0.5)
    except TypeError:  # (before max_frame/frame_timeout existed)
        cluster.setup_primary(respawn=False)
    good = cluster.fork({"MODE": "good"})
    todo = list(MODES)
    started = {}
    lag = [0.0]

    def tick(due=None):  # the primary's loop latency: how late a 20 ms timer runs
        now = time.monotonic()
        if due is not None:
            lag[0] = max(lag[0], now - due)
        _role.primary()._timers.call_later(0.02, lambda: tick(now + 0.02))
    tick()

    def next_bad():
        if not todo:
            print("all done", flush=True)
            return
        mode = todo.pop(0)
        w = cluster.fork({"MODE": mode})
        started[w.id] = time.monotonic()
        def on_exit(code, sig, w=w, mode=mode):
            took = time.monotonic() - started[w.id]
            print("exit", mode, code, sig, f"{took:.1f}", "hwm", hwm_kb(),
                  f"lag {lag[0]:.3f}", flush=True)
            next_bad()
        w.on("exit", on_exit)

    def on_message(w, m):
        if w is good and m == "serving":
            print("hwm", hwm_kb(), flush=True)
            next_bad()
        else:
            print("message from", w.id, len(str(m)), flush=True)
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


def test_oversized_and_stalled_frames_are_dropped(tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, FRAMES), dict(env, PORT=str(port))) as r:
        base = int(r.wait_for("hwm ", timeout=10)[0].split()[1])
        exits = r.wait_for("exit ", count=3, timeout=30)
        ok, _by = request(port)
        assert ok
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    got = [ln.split() for ln in exits]
    assert [g[1:4] for g in got] == [["big28", "None", "SIGKILL"],
                                     ["partial64", "None", "SIGKILL"],
                                     ["stall", "None", "SIGKILL"]], out
    assert 0.4 <= float(got[2][4]) <= 5.0, got[2]  # frame_timeout 0.5 s
    peak = max(int(g[6]) for g in got)
    assert peak - base < 24 << 10, f"primary VmHWM grew from {base} to {peak} kB"
    lag = float(got[2][8])  # the loop's worst lateness over the whole run
    assert lag < 0.5, f"the primary's loop stalled {lag:.3f} s"
    logged = "\n".join(out)
    assert "over the limit (1048576)" in logged
    assert "partial frame" in logged
    assert not [ln for ln in out if ln.startswith("message from")], out
    print(f"primary VmHWM {base} kB before, {peak} kB at most after the frames; "
          f"loop lag at most {lag * 1000:.0f} ms")


FABRICATED = HTTP_SERVER + """
import time
from fastcluster import _role

if cluster.is_primary:
    cluster.setup_primary(ready_timeout=3)
    cluster.on("message", lambda w, m: print(m, w.id, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig,
                                                  w.exited_after_disconnect, flush=True))
    cluster.on("listening", lambda w, a: print("listening", w.id, list(a), flush=True))
    cluster.fork()
    cluster.run()
else:
    if cluster.worker.id == 1:  # also claims an address the primary never gave it
        def lie():
            time.sleep(0.3)
            _role.runtime._send({"t": "listening", "address": ["10.9.9.9", 1]})
            cluster.worker.send("lied")
        import threading
        threading.Thread(target=lie, daemon=True).start()
    serve_http(int(os.environ["PORT"]))
"""


def test_a_fabricated_listening_frame_cannot_fail_a_rolling_restart(
        tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, FABRICATED), dict(env, PORT=str(port))) as r:
        r.wait_for("lied 1", timeout=10)
        r.signal(signal.SIGHUP)
        exits = r.wait_for("exit 1 ", timeout=8)  # the liar retired, its replacement serving
        ok, _by = request(port)
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert exits == ["exit 1 0 None True"], out
    assert ok
    assert "listening 1 ['10.9.9.9', 1]" not in out
    assert "did not give it" in "\n".join(out)
    assert code == 0


GONE_CHANNEL = HTTP_SERVER + """
import threading, time
from fastcluster import _role

if cluster.is_primary:
    cluster.setup_primary(respawn=False)
    cluster.on("message", lambda w, m: print(m, w.id, flush=True))
    cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
    cluster.fork()
    cluster.fork()
    cluster.run()
    print("primary done", flush=True)
else:
    if cluster.worker.id == 1:
        # What a worker at its fd limit does (its data channel handed back),
        # then frames that name that channel: the primary's dispatcher has no
        # such worker any more (ESRCH), and must answer, not fail
        def gone_then_frames():
            time.sleep(0.3)
            _role.runtime.intake.hand_back()
            time.sleep(0.3)
            _role.runtime._send({"t": "intake", "window": 2})
            _role.runtime._send({"t": "listen", "req": 77, "backlog": 16,
                                 "address": ["127.0.0.1", int(os.environ["PORT2"])]})
            _role.runtime._send({"t": "unlisten", "lid": 0})
            time.sleep(0.3)
            cluster.worker.send("sent")
        threading.Thread(target=gone_then_frames, daemon=True).start()
    serve_http(int(os.environ["PORT"]))
"""


def test_frames_naming_a_handed_back_channel_leave_the_primary_up(
        tmp_path: Path, env: dict[str, str]) -> None:
    """CI found this: a worker at its fd limit handed its data channel back,
    and its next "intake" frame made the dispatcher raise ESRCH out of the
    primary's loop (the primary exited, the cluster was down)."""
    port, port2 = free_port(), free_port()
    with running(script(tmp_path, GONE_CHANNEL), dict(env, PORT=str(port),
                                                      PORT2=str(port2))) as r:
        r.wait_for("sent 1", timeout=10)
        served = [request(port) for _ in range(10)]
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert all(ok for ok, _by in served), (served, out)
    assert "primary done" in out, out
    assert code == 0, out
    assert not any("Traceback" in ln for ln in out), out
