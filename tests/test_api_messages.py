"""Messaging between the primary and its workers (Node's test-cluster-message,
test-cluster-invalid-message): JSON both ways, errors in the sender, and a
worker's garbage on its control channel never hurting the primary."""

from __future__ import annotations

from pathlib import Path

from _helpers import env, lines, run, script  # noqa: F401


def test_messages_both_ways(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import json, math
        import fastcluster as cluster

        SAMPLES = [{"a": 1, "b": [1, 2, {"c": None}]}, [1, "two", 3.5, True, None],
                   "h\\u00e9llo \\u2713", 42, -1.5, None, True, (1, 2), "x" * 300_000]

        if cluster.is_primary:
            w = cluster.fork()
            got = []
            order = []
            w.on("message", lambda m: order.append("worker"))
            def on_message(worker, m):
                order.append("cluster")
                got.append(m)
                if len(got) == 1:  # the worker's hello
                    for bad in (object(), {"x": math.nan}, {1, 2}):
                        try:
                            w.send(bad)
                        except TypeError as e:
                            print("primary TypeError", type(bad).__name__)
                    for s in SAMPLES:
                        assert w.send(s) is True
                    w.send("done")
                elif m == "done":
                    expect = json.loads(json.dumps(SAMPLES))
                    print("echoed", got[1:-2] == expect, len(got))
                    print("worker errors", got[-2])
                    w.disconnect()
            cluster.on("message", on_message)
            cluster.run()
            print("order", order[:4])
            print("send after exit", w.send("late"))
        else:
            me = cluster.worker
            received = []
            def on_message(m):
                if m == "done":
                    errors = []
                    for bad in (set(), b"bytes"):
                        try:
                            me.send(bad)
                        except TypeError:
                            errors.append(type(bad).__name__)
                    for r in received:
                        me.send(r)
                    me.send(errors)
                    me.send("done")
                else:
                    received.append(m)
            me.on("message", on_message)
            me.send({"hello": me.id})
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    out = lines(proc.stdout)
    assert lines(proc.stdout, "primary TypeError") == [
        "primary TypeError object", "primary TypeError dict", "primary TypeError set"]
    assert "echoed True 12" in out
    assert "worker errors ['set', 'bytes']" in out
    assert "order ['worker', 'cluster', 'worker', 'cluster']" in out
    assert "send after exit False" in out


def test_message_handler_exception_does_not_kill_the_primary(
        tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            w = cluster.fork()
            def bad(worker, m):
                raise RuntimeError("handler bug " + str(m))
            cluster.on("message", bad)
            cluster.on("message", lambda worker, m: print("second handler", m, flush=True))
            cluster.on("message", lambda worker, m: m == 2 and worker.disconnect())
            cluster.run()
            print("primary alive")
        else:
            cluster.worker.send(1)
            cluster.worker.send(2)
            cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["second handler 1", "second handler 2", "primary alive"]
    assert proc.stderr.count("RuntimeError: handler bug") == 2


def test_invalid_messages_do_not_hurt_the_primary(tmp_path: Path,
                                                  env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os, socket, struct, time
        import fastcluster as cluster
        from fastcluster import _role

        def frame(body):
            return struct.pack(">I", len(body)) + body

        def devnulls():
            return sum(1 for fd in os.listdir("/proc/self/fd")
                       if os.path.realpath(f"/proc/self/fd/{fd}") == os.devnull)

        if cluster.is_primary:
            cluster.setup_primary(respawn=False)  # the killed worker stays dead here
            fds = {}
            def on_message(w, m):
                print("message", w.id, m, flush=True)
                if m == "soft done":
                    fds["after"] = devnulls()
                    print("fds kept", fds["after"] - fds["before"], flush=True)
                    w.disconnect()
                elif m == "ok":
                    w.disconnect()
            cluster.on("message", on_message)
            cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig, flush=True))
            soft = cluster.fork({"MODE": "soft"})
            fds["before"] = devnulls()  # after the dispatcher (and its reserve fd) exists
            soft.on("error", lambda e: print("error event", type(e).__name__, flush=True))
            hard = cluster.fork({"MODE": "hard"})
            hard.once("error", lambda e: print("hard error", e.fatal, flush=True))
            hard.on("exit", lambda code, sig: cluster.fork({"MODE": "ok"}))
            cluster.run()
            print("primary done", flush=True)
        else:
            ctl = _role.runtime.ctl
            mode = os.environ["MODE"]
            if mode == "soft":
                time.sleep(0.2)
                with ctl.lock:
                    for body in (b"{not json", b"[1, 2]", b'{"t": 5}', b"\\xff\\xfe",
                                 b'{"t": "listening", "address": 42}',
                                 b'{"t": "listen", "req": "x"}', b'{"t": "msg"}',
                                 b'{"t": "no such type"}', b"[" * 100000 + b"]" * 100000):
                        ctl.sock.setblocking(True)
                        ctl.sock.sendall(frame(body))
                    junk = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
                    socket.send_fds(ctl.sock, [frame(b'{"t": "msg", "d": "with fds"}')], junk)
                    ctl.sock.setblocking(False)
                cluster.worker.send("soft done")
                cluster.run()
            elif mode == "hard":
                with ctl.lock:
                    ctl.sock.setblocking(True)
                    ctl.sock.sendall(struct.pack(">I", 1 << 30) + b"x" * 100)
                cluster.run()
            else:
                cluster.worker.send("ok")
                cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    out = lines(proc.stdout)
    assert "message 1 with fds" in out
    assert "message 1 soft done" in out
    assert "fds kept 0" in out
    assert out.count("error event ProtocolError") == 8
    assert "hard error True" in out
    assert "exit 2 None SIGKILL" in out
    assert "message 3 ok" in out
    assert sorted(ln for ln in out if ln.startswith("exit")) == [
        "exit 1 0 None", "exit 2 None SIGKILL", "exit 3 0 None"]
    assert out[-1] == "primary done"
    assert "broke the control protocol" in proc.stderr
