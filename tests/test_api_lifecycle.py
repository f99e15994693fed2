"""Node's test-cluster-* lifecycle scenarios: roles, events and states in
order, exit codes and signals, disconnect and kill flags, fork env,
setup_primary, the primary's death, spawn.

Each scenario is a small script run in a subprocess; it prints lines the
test asserts on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import env, lines, run, running, script, wait_dead  # noqa: F401


def test_basic_events_and_states_in_order(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os
        import fastcluster as cluster

        if cluster.is_primary:
            assert cluster.is_primary and not cluster.is_worker and cluster.worker is None
            w = cluster.fork()
            print("P forked", w.id, w.state, w.is_connected(), w.is_dead())

            def on_cluster(name):
                def handler(worker, *args):
                    assert worker is w
                    print("P cluster", name, worker.state, *args)
                return handler

            def on_worker(name):
                def handler(*args):
                    print("P worker", name, w.state, *args)
                return handler

            for ev in ("fork", "online", "listening", "disconnect", "exit"):
                cluster.on(ev, on_cluster(ev))
            for ev in ("online", "listening", "disconnect", "exit"):
                w.on(ev, on_worker(ev))
            w.on("listening", lambda address: w.kill())
            cluster.run()
            print("P end", len(cluster.workers), w.state, w.is_dead(), w.exited_after_disconnect)
        else:
            assert cluster.is_worker and not cluster.is_primary
            print("W", cluster.worker.id, cluster.worker.pid == os.getpid(), cluster.workers)
            listener = cluster.listen(("127.0.0.1", 0))
            cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = lines(proc.stdout, "P ")
    port = None
    for ln in got:
        if "listening" in ln:
            port = ln.split(",")[-1].strip(" )")
    assert port is not None and int(port) > 0
    assert got == [
        "P forked 1 none True False",
        "P cluster fork none",
        "P worker online online",
        "P cluster online online",
        f"P worker listening listening ('127.0.0.1', {port})",
        f"P cluster listening listening ('127.0.0.1', {port})",
        "P worker disconnect disconnected",
        "P cluster disconnect disconnected",
        "P worker exit dead 0 None",
        "P cluster exit dead 0 None",
        "P end 0 dead True True",
    ], proc.stdout
    assert "W 1 True {}" in proc.stdout


def test_ids_start_at_one_and_are_not_reused(tmp_path: Path,
                                             env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(respawn=False)  # Node's bare behaviour
            ids = [cluster.fork().id for _ in range(3)]
            cluster.on("exit", lambda w, code, sig: print("exit", w.id, code)
                       or (len(ids) < 5 and ids.append(cluster.fork().id)))
            cluster.run()
            print("ids", ids)
        else:
            raise SystemExit(cluster.worker.id)
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert "ids [1, 2, 3, 4, 5]" in proc.stdout
    assert sorted(lines(proc.stdout, "exit")) == [f"exit {i} {i}" for i in range(1, 6)]


def test_worker_exit_code(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import sys
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(respawn=False)  # Node's bare behaviour
            w = cluster.fork()
            w.on("disconnect", lambda: print("disconnect", w.state, w.exited_after_disconnect))
            w.on("exit", lambda code, sig: print("exit", code, sig, w.state,
                                                 w.exited_after_disconnect, w.is_dead()))
            cluster.run()
        else:
            cluster.listen(("127.0.0.1", 0))
            sys.exit(42)
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["disconnect disconnected False",
                                  "exit 42 None dead False True"]


def test_worker_uncaught_exception_exits_1(tmp_path: Path,
                                           env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(respawn=False)  # Node's bare behaviour
            cluster.fork()
            cluster.on("exit", lambda w, code, sig: print("exit", code, sig))
            cluster.run()
        else:
            raise RuntimeError("boom in worker")
    """)
    proc = run(path, env)
    assert proc.returncode == 0
    assert lines(proc.stdout) == ["exit 1 None"]
    assert "RuntimeError: boom in worker" in proc.stderr


def test_worker_killed_by_signal(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os, signal
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(respawn=False)  # Node's bare behaviour
            w = cluster.fork()
            w.on("listening", lambda address: os.kill(w.pid, signal.SIGKILL))
            w.on("disconnect", lambda: print("disconnect", w.state, w.exited_after_disconnect))
            cluster.on("exit", lambda worker, code, sig: print(
                "exit", code, sig, worker.state, worker.exited_after_disconnect,
                worker.is_dead(), worker.is_connected()))
            cluster.run()
        else:
            cluster.listen(("127.0.0.1", 0))
            cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["disconnect disconnected False",
                                  "exit None SIGKILL dead False True False"]


def test_worker_disconnect_sets_flag(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            w = cluster.fork()
            w.on("listening", lambda address: w.disconnect())
            w.on("disconnect", lambda: print("disconnect", w.exited_after_disconnect,
                                             w.is_connected()))
            w.on("exit", lambda code, sig: print("exit", code, sig, w.exited_after_disconnect,
                                                 w.is_dead(), w.state))
            cluster.run()
            print("workers", cluster.workers)
        else:
            cluster.worker.on("disconnect", lambda: print("worker saw disconnect", flush=True))
            cluster.listen(("127.0.0.1", 0))
            cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout, "disconnect") + lines(proc.stdout, "exit") == [
        "disconnect True False", "exit 0 None True True dead"]
    assert "worker saw disconnect" in proc.stdout
    assert "workers {}" in proc.stdout


def test_kill_and_disconnect_from_the_worker(tmp_path: Path,
                                             env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os
        import fastcluster as cluster

        if cluster.is_primary:
            for action in ("disconnect", "kill"):
                w = cluster.fork({"ACTION": action})
                w.on("disconnect", lambda w=w: print("disconnect", w.id,
                                                     w.exited_after_disconnect))
                w.on("exit", lambda code, sig, w=w: print("exit", w.id, code, sig,
                                                          w.exited_after_disconnect))
            cluster.run()
        else:
            getattr(cluster.worker, os.environ["ACTION"])()
            cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(lines(proc.stdout)) == ["disconnect 1 True", "disconnect 2 True",
                                          "exit 1 0 None True", "exit 2 0 None True"]


def test_is_connected_and_is_dead(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            w = cluster.fork()
            print("P after fork", w.is_connected(), w.is_dead())
            w.on("message", lambda msg: msg == "ready" and w.disconnect())
            w.on("disconnect", lambda: print("P disconnect", w.is_connected()))
            w.on("exit", lambda code, sig: print("P exit", w.is_connected(), w.is_dead()))
            cluster.run()
        else:
            me = cluster.worker
            print("W start", me.is_connected(), me.is_dead(), flush=True)
            me.on("disconnect", lambda: print("W disconnect", me.is_connected(), flush=True))
            me.send("ready")
            cluster.run()
            print("W end", me.is_connected(), flush=True)
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout, "P ") == ["P after fork True False", "P disconnect False",
                                        "P exit False True"]
    assert lines(proc.stdout, "W ") == ["W start True False", "W disconnect False",
                                        "W end False"]


def test_fork_env(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os, subprocess, sys
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(respawn=False, env={"FROM_SETTINGS": "s", "SHARED": "settings"})
            w = cluster.fork({"cluster_test_prop": "custom", "SHARED": "fork"})
            w.on("message", print)
            cluster.run()
            print("primary", os.environ.get("cluster_test_prop"), os.environ.get("SHARED"))
        else:
            child = subprocess.run([sys.executable, "-c",
                                    "import os; print(sorted(k for k in os.environ "
                                    "if k.startswith('FASTCLUSTER_W')))"],
                                   capture_output=True, text=True)
            cluster.worker.send([os.environ.get("cluster_test_prop"),
                                 os.environ.get("FROM_SETTINGS"), os.environ.get("SHARED"),
                                 child.stdout.strip()])
    """)
    for method in ("fork", "spawn"):
        env = dict(env, FASTCLUSTER_TEST_METHOD=method)
        body = path.read_text()
        if method == "spawn":
            path.write_text(body.replace('env={"FROM_SETTINGS"',
                                         'start_method="spawn", env={"FROM_SETTINGS"'))
        proc = run(path, env)
        assert proc.returncode == 0, proc.stderr
        assert lines(proc.stdout) == ["['custom', 's', 'fork', '[]']", "primary None None"], \
            (method, proc.stdout)


def test_setup_primary_cumulative_and_setup_event(tmp_path: Path,
                                                  env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import sys
        import fastcluster as cluster

        if cluster.is_primary:
            print("initial", cluster.settings)
            seen = []
            cluster.on("setup", lambda s: seen.append(dict(s)))
            cluster.setup_primary(args=["custom argument"], silent=True)
            print("after 1", cluster.settings["args"], cluster.settings["silent"],
                  cluster.settings["exec"], cluster.settings["policy"])
            cluster.setup_primary(graceful_timeout=5)
            print("after 2", cluster.settings["args"], cluster.settings["silent"],
                  cluster.settings["graceful_timeout"])
            cluster.setup_primary()
            print("setup events", len(seen))  # on the next tick: none yet
            for bad in ({"policy": "bogus"}, {"bogus": 1}, {"start_method": 3},
                        {"graceful_timeout": -1}, {"env": {"A": 1}}, {"args": "x"}):
                try:
                    cluster.setup_primary(**bad)
                except (TypeError, ValueError) as e:
                    print("error", type(e).__name__, e)
            print("events after errors", len(seen), cluster.settings["policy"])
            for _ in range(2):
                w = cluster.fork()
                w.once("message", lambda data, w=w: print("got", data) or w.kill())
            cluster.on("fork", lambda w: print("fork event, setups so far", len(seen)))
            cluster.run()
            print("setup events", len(seen), [s["graceful_timeout"] for s in seen])
        else:
            print("silent worker prints nothing", flush=True)
            cluster.worker.send(sys.argv[1:])
            cluster.run()
    """)
    proc = run(path, dict(env, FASTCLUSTER_POLICY="least"))
    assert proc.returncode == 0, proc.stderr
    out = lines(proc.stdout)
    assert out[0] == "initial {}"
    assert out[1] == f"after 1 ['custom argument'] True {path} least"
    assert out[2] == "after 2 ['custom argument'] True 5.0"
    assert out[3] == "setup events 0"
    # three setup_primary() calls and two fork()s (Node's fork() runs
    # setupPrimary()), each with the settings of its call, each before its "fork"
    assert lines(proc.stdout, "setup events")[-1] == "setup events 5 [30.0, 5.0, 5.0, 5.0, 5.0]"
    assert lines(proc.stdout, "fork event") == ["fork event, setups so far 4",
                                                "fork event, setups so far 5"]
    errors = lines(proc.stdout, "error")
    assert len(errors) == 6
    assert "'policy'" in errors[0] and "'bogus'" in errors[0] and "'rr'" in errors[0]
    assert errors[0].startswith("error ValueError")
    assert errors[1].startswith("error TypeError") and "'bogus'" in errors[1]
    assert errors[2].startswith("error TypeError") and "'start_method'" in errors[2]
    assert errors[3].startswith("error ValueError") and "'graceful_timeout'" in errors[3]
    assert "'env'" in errors[4] and "'args'" in errors[5]
    assert "events after errors 0 least" in out
    assert lines(proc.stdout, "got") == ["got ['custom argument']"] * 2
    assert "silent worker" not in proc.stdout


def test_setup_event_on_the_next_tick_and_settings_as_node(tmp_path: Path,
                                                          env: dict[str, str]) -> None:
    # Node's test-cluster-setup-primary*.js pattern: the listener is added
    # after the call and hears it. node 20 (observed): setupPrimary() fills
    # args/exec/silent; fork() returns before "setup", which comes before
    # "fork"; each "setup" carries the settings of its own call.
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(silent=False)
            cluster.once("setup", lambda s: print("setup 1", s["args"], s["exec"], s["silent"]))
            cluster.setup_primary(args=["x"])
            cluster.on("setup", lambda s: print("setup", s["args"]))
            s = cluster.settings
            print("settings", s["args"], s["exec"] == __file__, s["silent"])
            cluster.on("fork", lambda w: print("fork", w.id))
            w = cluster.fork()
            print("fork returned", w.id)
            w.on("online", w.kill)
            cluster.run()
        else:
            cluster.run()
    """)
    proc = run(path, env, args=("a", "b"))
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == [
        "settings ['x'] True False",
        "fork returned 1",
        f"setup 1 ['a', 'b'] {path} False",  # both listeners hear the first call's
        "setup ['a', 'b']",
        "setup ['x']",  # the second call's
        "setup ['x']",  # fork()'s
        "fork 1",
    ]


def test_settings_exec_under_python_m(tmp_path: Path, env: dict[str, str]) -> None:
    # python -m pkg.mod: exec shows the module's file (sys.argv[0]); the
    # worker still runs it as a module (its __name__ is "__main__" there and
    # its relative import works)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("NAME = 'helper'\n")
    (pkg / "mod.py").write_text(
        "import fastcluster as cluster\n"
        "from .helper import NAME\n"
        "if cluster.is_primary:\n"
        "    cluster.setup_primary()\n"
        "    print('exec', cluster.settings['exec'], cluster.settings['args'], flush=True)\n"
        "    w = cluster.fork()\n"
        "    w.on('message', lambda m: print('worker', m, flush=True) or w.kill())\n"
        "    cluster.run()\n"
        "else:\n"
        "    cluster.worker.send([__name__, NAME])\n"
        "    cluster.run()\n")
    proc = subprocess.run([sys.executable, "-m", "pkg.mod", "q"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=15)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == [f"exec {pkg / 'mod.py'} ['q']",
                                  "worker ['__main__', 'helper']"]


def test_bad_policy_in_environment(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster
        try:
            cluster.setup_primary()
        except ValueError as e:
            print("error", e)
    """)
    proc = run(path, dict(env, FASTCLUSTER_POLICY="fastest"))
    assert "FASTCLUSTER_POLICY='fastest'" in proc.stdout and "reuseport" in proc.stdout


def test_disconnect_with_no_workers(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        called = []
        cluster.disconnect(lambda: called.append(len(cluster.workers)))
        print("sync", called)
        cluster.run()
        print("after run", called)
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["sync []", "after run [0]"]


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_primary_killed_leaves_no_worker(tmp_path: Path, env: dict[str, str],
                                         method: str) -> None:
    path = script(tmp_path, f"""
        import os
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(start_method={method!r})
            for _ in range(3):
                cluster.fork()
            cluster.on("online", lambda w: print("worker", w.pid, flush=True))
            cluster.run()
        else:
            cluster.listen(("127.0.0.1", 0))
            cluster.run()
    """)
    with running(path, env) as r:
        pids = [int(ln.split()[1]) for ln in r.wait_for("worker", 3)]
        r.signal(signal.SIGKILL)
        r.proc.wait(5)
        assert wait_dead(pids, 2.0) == []


def test_spawn_start_method(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os, sys
        import fastcluster as cluster

        def work():
            me = cluster.worker
            listener = cluster.listen(("127.0.0.1", 0))
            me.send({"id": me.id, "ppid": os.getppid(), "argv": sys.argv[1:],
                     "marker": [k for k in os.environ if k.startswith("FASTCLUSTER_W")
                                or k.startswith("FASTCLUSTER_B")],
                     "name": __name__})
            me.on("message", lambda m: print("worker got", m, flush=True))
            cluster.run()

        if __name__ == "__main__":
            if cluster.is_primary:
                cluster.setup_primary(start_method="spawn", args=["a", "b"])
                cluster.fork()
                cluster.setup_primary(target=work)
                cluster.fork()

                def on_message(w, m):
                    print("msg", w.id, m["id"], m["ppid"] == os.getpid(), m["argv"],
                          m["marker"], m["name"])
                    w.send("bye")
                    w.disconnect()

                cluster.on("message", on_message)
                cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig))
                cluster.run()
            else:
                work()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(lines(proc.stdout, "msg")) == [
        "msg 1 1 True ['a', 'b'] [] __main__",
        "msg 2 2 True ['a', 'b'] [] __fc_main__",
    ]
    assert sorted(lines(proc.stdout, "exit")) == ["exit 1 0 None", "exit 2 0 None"]
    assert lines(proc.stdout, "worker got").count("worker got bye") == 2


def test_target_and_exec(tmp_path: Path, env: dict[str, str]) -> None:
    script(tmp_path, """
        import sys
        import fastcluster as cluster
        cluster.worker.send(["exec", sys.argv])
    """, name="other.py")
    path = script(tmp_path, """
        import sys
        import fastcluster as cluster

        def main():
            cluster.worker.send(["target", sys.argv[1:]])

        if cluster.is_primary:
            cluster.setup_primary(target=main, respawn=False)
            cluster.fork()
            cluster.setup_primary(target=None, exec="other.py", args=["x"])
            cluster.fork()
            cluster.on("message", lambda w, m: print(w.id, m))
            cluster.run()
        else:
            print("not reached")
    """)
    proc = run(path, env, args=("p1",))
    assert proc.returncode == 0, proc.stderr
    assert sorted(lines(proc.stdout)) == ["1 ['target', ['p1']]",
                                          f"2 ['exec', ['{tmp_path / 'other.py'}', 'x']]"]


def test_worker_without_handles_exits_when_main_returns(tmp_path: Path,
                                                        env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import time
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.setup_primary(respawn=False)  # Node's bare behaviour
            t0 = time.monotonic()
            a = cluster.fork({"KEEP": ""})
            b = cluster.fork({"KEEP": "1"})
            cluster.on("exit", lambda w, code, sig: print("exit", w.id, code, sig,
                                                          w.exited_after_disconnect))
            a.on("exit", lambda code, sig: b.send("stop"))
            cluster.run()
            print("fast", time.monotonic() - t0 < 5)
        else:
            import os
            if os.environ["KEEP"]:
                cluster.worker.on("message", lambda m: cluster.worker.disconnect())
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["exit 1 0 None False", "exit 2 0 None True", "fast True"]


def test_sigterm_to_primary_is_graceful(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os, time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import fastcluster as cluster

        class Slow(BaseHTTPRequestHandler):
            def do_GET(self):
                print("request started", flush=True)
                time.sleep(0.7)
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"done\\n")

            def log_message(self, *args):
                pass

        if cluster.is_primary:
            for _ in range(2):
                cluster.fork()
            cluster.on("listening", lambda w, a: print("listening", a[1], flush=True))
            cluster.on("exit", lambda w, code, sig: print("exit", code, sig, flush=True))
            cluster.run()
            print("primary done", flush=True)
        else:
            server = ThreadingHTTPServer(("127.0.0.1", 0), Slow, bind_and_activate=False)
            cluster.listen_server(server).serve_forever()
    """)
    import threading

    from _helpers import http_get

    with running(path, env) as r:
        port = int(r.wait_for("listening", 2)[0].split()[1])
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(http_get(port, timeout=5)))
        t.start()
        r.wait_for("request started")
        r.signal(signal.SIGTERM)
        t.join(6)
        code, out = r.finish()
    assert result and result[0][0] == 200 and result[0][2] == b"done\n"  # type: ignore[index]
    assert code == 0
    assert sorted(ln for ln in out if ln.startswith("exit")) == ["exit 0 None"] * 2
    assert "primary done" in out
