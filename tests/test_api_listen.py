"""Shared ports (Node's test-cluster-listening-port, -eaddrinuse,
-bind-privileged-port, -disconnect), Listener semantics, http.server and
asyncio servers under every policy, and the README's example."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest

from _helpers import ROOT, env, free_port, http_get, lines, run, running, script  # noqa: F401

POLICIES = ["rr", "least", "shared", "reuseport"]


def test_listening_port_zero_is_one_real_port(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import fastcluster as cluster

        if cluster.is_primary:
            ports = []
            def on_listening(w, address):
                ports.append(address[1])
                if len(ports) == 3:
                    print("ports", len(set(ports)), ports[0] > 0, flush=True)
                    cluster.disconnect(lambda: print("disconnected", flush=True))
            cluster.on("listening", on_listening)
            for _ in range(3):
                cluster.fork()
            cluster.run()
        else:
            listener = cluster.listen(("127.0.0.1", 0))
            assert listener.getsockname()[1] > 0
            cluster.run()
    """)
    proc = run(path, env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["ports 1 True", "disconnected"]


def test_eaddrinuse_then_retry_succeeds(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import errno, os, socket
        import fastcluster as cluster

        port = int(os.environ["PORT"])
        if cluster.is_primary:
            w = cluster.fork()
            # bound after the fork: a forked worker would hold its own copy
            blocker = socket.socket()
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
            def on_message(m):
                print("worker says", m, flush=True)
                blocker.close()
                w.send("retry")
            w.on("message", on_message)
            w.on("listening", lambda address: print("listening", address[1] == port,
                                                    flush=True) or w.disconnect())
            cluster.run()
        else:
            try:
                cluster.listen(("127.0.0.1", port))
            except OSError as e:
                cluster.worker.send(errno.errorcode[e.errno])
            def retry(m):
                cluster.listen(("127.0.0.1", port))
            cluster.worker.on("message", retry)
    """)
    proc = run(path, dict(env, PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["worker says EADDRINUSE", "listening True"]


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


@pytest.mark.skipif(_unprivileged_port_start() <= 42, reason="port 42 is not privileged here")
def test_bind_privileged_port_eacces(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import errno
        import fastcluster as cluster

        if cluster.is_primary:
            w = cluster.fork()
            w.on("message", lambda m: print(m, flush=True) or w.disconnect())
            cluster.run()
        else:
            try:
                cluster.listen(("127.0.0.1", 42))
            except OSError as e:
                cluster.worker.send(errno.errorcode[e.errno])
            cluster.run()  # until the primary disconnects it: a main that returned
                           # would end the worker unasked, and respawn would replace it
    """)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:  # root may bind low ports: run without that capability
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("runs as root and util-linux's setpriv is missing to drop "
                        "CAP_NET_BIND_SERVICE")
        prefix = (setpriv, "--bounding-set", "-net_bind_service", "--")
    proc = run(path, env, prefix=prefix)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == ["EACCES"]


def test_disconnect_eight_workers_two_servers(tmp_path: Path, env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os, selectors
        import fastcluster as cluster

        ports = [int(os.environ["PORT1"]), int(os.environ["PORT2"])]
        if cluster.is_primary:
            listening = []
            served = []
            def on_listening(w, address):
                listening.append(address[1])
                if len(listening) == 16:
                    print("ready", sorted(set(listening)) == sorted(ports), flush=True)
            def on_message(w, m):
                served.append(m)
                if len(served) == 10:
                    def done():
                        print("callback workers", len(cluster.workers), flush=True)
                    cluster.disconnect(done)
            cluster.on("listening", on_listening)
            cluster.on("message", on_message)
            exits = []
            cluster.on("exit", lambda w, code, sig: exits.append((code, sig)))
            for _ in range(8):
                cluster.fork()
            cluster.run()
            print("exits", len(exits), set(exits), flush=True)
        else:
            sel = selectors.DefaultSelector()
            for port in ports:
                sel.register(cluster.listen(("127.0.0.1", port)), selectors.EVENT_READ)
            while True:
                for key, _ in sel.select(1.0):
                    try:
                        conn, _addr = key.fileobj.accept()
                    except BlockingIOError:
                        continue
                    with conn:
                        conn.sendall(conn.recv(100))
                    cluster.worker.send(cluster.worker.id)
    """)
    p1, p2 = free_port(), free_port()
    with running(path, dict(env, PORT1=str(p1), PORT2=str(p2))) as r:
        assert r.wait_for("ready", timeout=10) == ["ready True"]
        for i in range(10):
            with socket.create_connection(("127.0.0.1", (p1, p2)[i % 2]), timeout=3) as c:
                c.sendall(b"echo %d" % i)
                assert c.recv(100) == b"echo %d" % i
        code, out = r.finish()
    assert code == 0
    assert "callback workers 0" in out
    assert "exits 8 {(0, None)}" in out


def test_listener_stays_readable_while_it_holds_fds(tmp_path: Path,
                                                   env: dict[str, str]) -> None:
    """One accept per select() wake-up: fds that came in one batch must keep
    the listener readable, or the server sleeps on delivered connections."""
    path = script(tmp_path, """
        import selectors, time
        import fastcluster as cluster

        if cluster.is_primary:
            cluster.fork()
            def on_message(w, m):
                if m[0] == "port":  # only after the probes: they must see no client
                    print("port", m[1], flush=True)
                else:
                    print("worker", m, flush=True)
                    w.disconnect()
            cluster.on("message", on_message)
            cluster.run()
        else:
            listener = cluster.listen(("127.0.0.1", 0))
            listener.setblocking(False)
            try:
                listener.accept()
            except BlockingIOError:
                nonblocking = "BlockingIOError"
            listener.settimeout(0.1)
            try:
                listener.accept()
            except TimeoutError:
                timeout = "TimeoutError"
            listener.setblocking(False)
            cluster.worker.send(["port", listener.getsockname()[1]])
            time.sleep(1.0)  # the test connects 5 clients meanwhile: one batch
            sel = selectors.DefaultSelector()
            sel.register(listener, selectors.EVENT_READ)
            served, idle = 0, 0
            deadline = time.monotonic() + 5
            while served < 5 and time.monotonic() < deadline:
                if not sel.select(0.5):
                    idle += 1
                    continue
                conn, addr = listener.accept()  # one per wake-up
                with conn:
                    assert conn.gettimeout() is None and addr[0] == "127.0.0.1"
                    conn.sendall(b"hi")
                served += 1
            cluster.worker.send([nonblocking, timeout, served, idle])
            cluster.run()
    """)
    with running(path, env) as r:
        port = int(r.wait_for("port")[0].split()[1])
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(5)]
        try:
            for c in conns:
                assert c.recv(10) == b"hi"
        finally:
            for c in conns:
                c.close()
        code, out = r.finish()
    assert code == 0
    assert "worker ['BlockingIOError', 'TimeoutError', 5, 0]" in out


def test_closed_listener_takes_no_more_connections(tmp_path: Path,
                                                   env: dict[str, str]) -> None:
    path = script(tmp_path, """
        import os
        import fastcluster as cluster
        from http.server import BaseHTTPRequestHandler, HTTPServer

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.send_header("X-Worker", os.environ["ROLE"])
                self.end_headers()
            def log_message(self, *a):
                pass

        if cluster.is_primary:
            cluster.fork({"ROLE": "closer"})
            cluster.fork({"ROLE": "server"})
            cluster.on("message", lambda w, m: print(m, flush=True))
            cluster.run()
        else:
            server = HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H,
                                bind_and_activate=False)
            cluster.listen_server(server)
            if os.environ["ROLE"] == "closer":
                server.server_close()
                cluster.worker.send("closed")
                cluster.run()
            else:
                cluster.worker.send("serving")
                server.serve_forever()
    """)
    port = free_port()
    with running(path, dict(env, PORT=str(port))) as r:
        r.wait_for("closed")
        r.wait_for("serving")
        roles = {http_get(port)[1]["x-worker"] for _ in range(20)}
        assert roles == {"server"}
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    assert code == 0


HTTP_WORKER = """
import asyncio, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import fastcluster as cluster
import fastcluster.aio

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"Hello from Cluster!\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Worker-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            body = b"Hello from Cluster!\\n"
            close = b"connection: close" in head.lower()
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nX-Worker-Pid: %d\\r\\n"
                         b"X-Loop: %s\\r\\n\\r\\n%s" % (len(body), os.getpid(),
                         type(asyncio.get_running_loop()).__module__.encode(), body))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def aio_main(address):
    server = await fastcluster.aio.start_server(handle, address)
    main_thread = []
    cluster.worker.on("message", lambda m: main_thread.append(
        threading.current_thread() is threading.main_thread()))
    cluster.worker.send(["ready", list(server.getsockname()) if isinstance(
        server.getsockname(), tuple) else server.getsockname()])
    await server.serve_forever()
    print("serve_forever returned", main_thread, flush=True)

def main():
    kind = os.environ["KIND"]
    address = os.environ.get("ADDRESS") or ("127.0.0.1", int(os.environ["PORT"]))
    if kind == "http":
        server = ThreadingHTTPServer(address if isinstance(address, tuple) else
                                     ("127.0.0.1", 0), H, bind_and_activate=False)
        if isinstance(address, str):
            server.server_address = address
        cluster.listen_server(server)
        cluster.worker.send(["ready", None])
        server.serve_forever()
    else:
        if kind == "uvloop":
            import uvloop
            uvloop.install()
        asyncio.run(aio_main(address))

if __name__ == "__main__":
    if cluster.is_primary:
        cluster.setup_primary(start_method=os.environ.get("METHOD", "fork"))
        if os.environ.get("METHOD") == "spawn":
            cluster.setup_primary(target=main)
        for _ in range(2):
            cluster.fork()
        ready = []
        def on_message(w, m):
            if m[0] == "ready":
                ready.append(w.id)
                if len(ready) == 2:
                    print("ready", flush=True)
                w.send("ping")
        cluster.on("message", on_message)
        cluster.on("exit", lambda w, code, sig: print("exit", code, sig, flush=True))
        cluster.run()
        print("primary done", flush=True)
    else:
        main()
"""


def _serve_and_check(tmp_path: Path, env: dict[str, str], kind: str, policy: str,
                     method: str = "fork") -> None:
    path = script(tmp_path, HTTP_WORKER)
    port = free_port()
    run_env = dict(env, KIND=kind, PORT=str(port), FASTCLUSTER_POLICY=policy, METHOD=method)
    with running(path, run_env) as r:
        r.wait_for("ready", timeout=10)
        pids: dict[str, int] = {}
        loops = set()
        for _ in range(40):
            status, headers, body = http_get(port)
            assert (status, body) == (200, b"Hello from Cluster!\n")
            pids[headers["x-worker-pid"]] = pids.get(headers["x-worker-pid"], 0) + 1
            loops.add(headers.get("x-loop"))
        r.signal(signal.SIGTERM)
        code, out = r.finish()
    assert code == 0, out
    assert sorted(ln for ln in out if ln.startswith("exit")) == ["exit 0 None"] * 2, out
    if policy == "rr":
        assert len(pids) == 2 and min(pids.values()) >= 15, pids
    if policy == "least":  # ties go round robin, but a worker's count of open
        # connections drops only once it has closed one: on a busy machine
        # that lags, and the sequential requests lean to the other worker
        assert len(pids) == 2 and min(pids.values()) >= 4, pids
    if kind != "http":
        assert out.count("serve_forever returned [True]") == 2, out
    if kind == "uvloop":
        assert loops == {b"uvloop".decode()}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("kind", ["http", "asyncio"])
def test_servers_under_each_policy(tmp_path: Path, env: dict[str, str], kind: str,
                                   policy: str) -> None:
    _serve_and_check(tmp_path, env, kind, policy)


def test_uvloop_server(tmp_path: Path, env: dict[str, str]) -> None:
    pytest.importorskip("uvloop")
    _serve_and_check(tmp_path, env, "uvloop", "rr")


@pytest.mark.parametrize("kind", ["http", "asyncio"])
def test_spawn_servers(tmp_path: Path, env: dict[str, str], kind: str) -> None:
    _serve_and_check(tmp_path, env, kind, "rr", method="spawn")


@pytest.mark.parametrize("policy", ["rr", "shared"])
def test_unix_socket_address(tmp_path: Path, env: dict[str, str], policy: str) -> None:
    path = script(tmp_path, HTTP_WORKER)
    sock_path = str(tmp_path / "http.sock")
    run_env = dict(env, KIND="asyncio", ADDRESS=sock_path, PORT="0", FASTCLUSTER_POLICY=policy)
    with running(path, run_env) as r:
        r.wait_for("ready", timeout=10)
        for _ in range(10):
            with socket.socket(socket.AF_UNIX) as c:
                c.settimeout(3)
                c.connect(sock_path)
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                for _ in range(100):
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                assert data.endswith(b"Hello from Cluster!\n")
        r.signal(signal.SIGINT)
        code, _out = r.finish()
    assert code == 0
    assert not os.path.exists(sock_path)  # the primary removed the socket file it made


def test_hello_example(env: dict[str, str]) -> None:
    """README's first command: the seed's example, answering from several workers."""
    n = os.cpu_count() or 1
    port = free_port()
    with running(ROOT / "examples" / "hello_cluster.py", dict(env, PORT=str(port))) as r:
        primary = r.wait_for("Primary")[0]
        assert primary == f"Primary {r.pid} is running"
        started = r.wait_for("Worker", n, timeout=15)
        worker_pids = {ln.split()[1] for ln in started}
        assert all(ln.endswith("started") for ln in started)
        answered: set[str] = set()
        deadline = time.monotonic() + 10
        for _ in range(200):
            if len(answered) >= min(n, 2) or time.monotonic() > deadline:
                break
            status, headers, body = http_get(port)
            assert (status, body) == (200, b"Hello from Cluster!\n")
            answered.add(headers["x-worker-pid"])
        assert len(answered) >= min(n, 2) and answered <= worker_pids
        r.signal(signal.SIGINT)
        code, out = r.finish()
    assert code == 0
    assert sorted(ln for ln in out if ln.endswith("died")) == sorted(
        f"Worker {pid} died" for pid in worker_pids)



COUNTING_WORKER = """
import asyncio, os
import fastcluster as cluster
import fastcluster.aio

RETYPED = set()  # per protocol object served: is its type a counting subclass?

class Plain(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        RETYPED.add(type(self) not in (Plain, Slotted, Closure))
        if data.endswith(b"\\r\\n\\r\\n"):
            self.transport.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
            if b"close" in data.lower():
                self.transport.close()

class Slotted(asyncio.Protocol):
    __slots__ = ("transport",)  # no __dict__: the intake cannot keep state on it
    connection_made = Plain.connection_made
    data_received = Plain.data_received

class Closure(asyncio.Protocol):  # hooks set on the instance, as some servers do
    def __init__(self):
        self.connection_made = lambda t: setattr(self, "transport", t)
        self.connection_lost = lambda exc: None
    data_received = Plain.data_received

async def main():
    kind = {"plain": Plain, "slotted": Slotted, "closure": Closure}[os.environ["PROTO"]]
    server = await fastcluster.aio.create_server(kind, ("127.0.0.1", int(os.environ["PORT"])))
    cluster.worker.send("ready")

    async def report():  # the open-connection count whenever it changes
        last = None
        while True:
            retyped = RETYPED == {True}
            if (server._conns, retyped) != last:
                last = (server._conns, retyped)
                cluster.worker.send(["open", *last])
            await asyncio.sleep(0.02)

    reporter = asyncio.create_task(report())
    await server.serve_forever()
    reporter.cancel()

if cluster.is_primary:
    w = cluster.fork()
    w.on("message", lambda m: print(m if m == "ready" else " ".join(map(str, m)), flush=True))
    cluster.run()
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("proto", ["plain", "slotted", "closure"])
@pytest.mark.parametrize("policy", ["rr", "shared"])
def test_aio_counts_connections_of_any_protocol_class(tmp_path: Path, env: dict[str, str],
                                                      policy: str, proto: str) -> None:
    """fastcluster.aio counts open connections (status, graceful drain) by
    retyping each protocol object to a counting subclass, or by wrapping it
    where that cannot work; every shape counts up and back down to zero."""
    path = script(tmp_path, COUNTING_WORKER)
    port = free_port()
    run_env = dict(env, PROTO=proto, PORT=str(port), FASTCLUSTER_POLICY=policy)
    # retyped: plain always; slotted only where no state is kept on it (shared);
    # closure never (its instance hooks would shadow the subclass's)
    retyped = {"plain": True, "slotted": policy == "shared", "closure": False}[proto]
    with running(path, run_env) as r:
        r.wait_for("ready", timeout=10)
        held = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(3)]
        try:
            for s in held:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert s.recv(100).endswith(b"ok")
            for _ in range(20):
                status, _h, body = http_get(port)
                assert (status, body) == (200, b"ok")
            r.wait_for(f"open 3 {retyped}", timeout=5)
        finally:
            for s in held:
                s.close()
        r.wait_for(f"open 0 {retyped}", timeout=5)
        assert not [ln for ln in r.seen if ln.startswith("open -")], r.seen
        r.signal(signal.SIGTERM)
        code, out = r.finish()
    assert code == 0, out


UNIX_RELATIVE = """
import os, signal, socket
import fastcluster as cluster

if cluster.is_primary:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cluster.setup_primary(cwd=os.environ["WDIR"], respawn=True)
    cluster.on("exit", lambda w, code, sig: print("exit", w.pid, code, sig, flush=True))
    cluster.on("message", lambda w, m: print(m, flush=True))

    def leave(*args):
        for w in list(cluster.workers.values()):
            w.send("leave")

    signal.signal(signal.SIGUSR1, leave)
    cluster.fork({"ROLE": "sock"})
    cluster.fork({"ROLE": "idle"})
    cluster.run()
elif os.environ["ROLE"] == "sock":
    lst = cluster.listen("s.sock")
    cluster.worker.on("message", lambda m: cluster.worker.disconnect())
    cluster.worker.send(f"listening {os.getpid()} {lst.getsockname()}")
    while True:
        try:
            conn, _ = lst.accept()
        except OSError:
            break
        conn.sendall(str(os.getpid()).encode())
        conn.close()
else:
    cluster.worker.on("message", lambda m: None)  # stays: the primary keeps running
    cluster.run()
"""


def _unix_pid(path: str) -> str:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(path)
        return c.recv(64).decode()


@pytest.mark.parametrize("policy", ["rr", "shared"])
def test_relative_unix_path_is_the_workers_and_removed_when_unused(
        tmp_path: Path, env: dict[str, str], policy: str) -> None:
    # Node resolves a relative path against the worker's cwd (here the cwd
    # setting; the primary runs in tmp_path) and binds the shorter of it and
    # its path relative to the primary's cwd: the absolute one is longer
    # than sun_path's 108 bytes here.
    wdir = tmp_path / ("d" * 90)
    wdir.mkdir()
    want = str(wdir / "s.sock")
    assert len(want) > 108
    path = script(tmp_path, UNIX_RELATIVE)
    run_env = dict(env, WDIR=str(wdir), FASTCLUSTER_POLICY=policy)
    with running(path, run_env) as r:
        first = r.wait_for("listening")[0].split()
        assert first[2] == want, first
        assert not (tmp_path / "s.sock").exists()
        os.chdir(wdir)  # connect by a short name: the absolute one does not fit either
        try:
            assert _unix_pid("s.sock") == first[1]
            os.kill(int(first[1]), signal.SIGKILL)  # a respawn keeps the path
            r.wait_for(f"exit {first[1]} None SIGKILL")
            assert os.path.exists("s.sock")
            second = r.wait_for("listening", 2)[1].split()
            assert _unix_pid("s.sock") == second[1]
            r.signal(signal.SIGUSR1)  # the listening worker leaves; nothing replaces it
            r.wait_for(f"exit {second[1]} 0 None")
            r.wait_for("fastcluster: no worker listens on")  # logged after the exit event
            gone = not os.path.exists("s.sock")
        finally:
            os.chdir(ROOT)
        r.signal(signal.SIGTERM)
        code, _out = r.finish()
    text = "\n".join(r.seen)
    assert code == 0, text
    assert gone, text  # removed while the primary still ran (the idle worker kept it up)
    assert f"no worker listens on {want} any more: closed and removed" in text
