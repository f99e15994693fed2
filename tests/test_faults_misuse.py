"""API misuse and security (issue E). Misuse: each mistake raises at once, a
clear exception naming the argument, the value and what is allowed, and
nothing else is disturbed (the same cluster then serves a request and
exits cleanly). Security: nothing a worker sends is unpickled or
evaluated; every channel is a socketpair (no filesystem path); a worker
dropped to another uid cannot signal, trace or borrow from the primary.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from _faults import HTTP_SERVER, children, request
from _helpers import env, free_port, lines, run, running, script  # noqa: F401

MISUSE = HTTP_SERVER + """
import signal, socket

def attempt(label, fn):
    try:
        fn()
    except Exception as e:
        print("misuse", label, type(e).__name__, "|", e, flush=True)
    else:
        print("misuse", label, "no error", flush=True)

if cluster.is_primary:
    cluster.setup_primary()
    before = dict(cluster.settings)
    attempt("unknown-policy", lambda: cluster.setup_primary(policy="fifo"))
    attempt("unknown-setting", lambda: cluster.setup_primary(workers=4))
    attempt("bad-setting-type", lambda: cluster.setup_primary(respawn="yes"))
    attempt("fork-env", lambda: cluster.fork(env={"A": 1}))
    attempt("on-not-callable", lambda: cluster.on("exit", "print"))
    attempt("on-bad-event", lambda: cluster.on(5, print))
    attempt("disconnect-callback", lambda: cluster.disconnect(5))
    attempt("primary-listen-float", lambda: cluster.listen(3.5))
    attempt("primary-listen-backlog", lambda: cluster.listen(("127.0.0.1", 0), backlog="x"))
    print("settings intact", cluster.settings == before, flush=True)
    # listen() in the primary is not an error: a plain socket of its own, as a
    # net.Server in Node's primary (the workers' ports are bound for them)
    own = cluster.listen(("127.0.0.1", 0))
    print("primary listen", type(own).__name__, own.getsockname()[1] > 0, flush=True)
    own.close()
    cluster.setup_primary(respawn=False)  # the doomed worker stays dead
    w = cluster.fork()
    doomed = cluster.fork({"DOOMED": "1"})
    attempt("send-set", lambda: w.send({1, 2}))
    attempt("send-object", lambda: w.send(object()))
    attempt("kill-bad-name", lambda: w.kill("SIGFOO"))
    attempt("kill-bad-number", lambda: w.kill(0))
    attempt("kill-bad-type", lambda: w.kill(1.5))

    def on_exit(worker, code, sig):
        if worker is doomed:
            doomed.on("error", lambda e: print("dead send error", type(e).__name__, "|", e,
                                                flush=True))
            print("dead send returns", doomed.send("hello?"), flush=True)
            attempt("run-reentrant", cluster.run)

    def on_message(worker, m):
        print("message", m, flush=True)
        if m == "serving":
            port = int(os.environ["PORT"])
            # the workers' port, bound by the primary for them already
            attempt("primary-listen-taken", lambda: cluster.listen(("127.0.0.1", port)))
    cluster.on("exit", on_exit)
    cluster.on("message", on_message)
    cluster.run()
    print("primary done", flush=True)
else:
    if os.environ.get("DOOMED"):
        os._exit(0)
    attempt("worker-fork", cluster.fork)
    attempt("worker-setup", lambda: cluster.setup_primary(respawn=True))
    attempt("worker-disconnect-all", cluster.disconnect)
    attempt("listen-port-range", lambda: cluster.listen(("127.0.0.1", 70000)))
    attempt("listen-port-type", lambda: cluster.listen(("127.0.0.1", "80")))
    attempt("listen-host-type", lambda: cluster.listen((127, 0)))
    attempt("listen-object", lambda: cluster.listen(object()))
    attempt("listen-empty-path", lambda: cluster.listen(""))
    attempt("listen-backlog", lambda: cluster.listen(("127.0.0.1", 0), backlog=-1))
    attempt("listen-unknown-host", lambda: cluster.listen(("no-such-host.invalid", 0)))
    attempt("worker-send-bytes", lambda: cluster.worker.send(b"raw"))
    serve_http(int(os.environ["PORT"]))
"""

# label -> words the message must contain (argument, value, what is allowed)
EXPECT = {
    "unknown-policy": ("ValueError", "'policy'", "'fifo'", "'rr'", "'least'"),
    "unknown-setting": ("TypeError", "'workers'", "allowed:", "respawn"),
    "bad-setting-type": ("TypeError", "'respawn'", "'yes'", "True or False"),
    "fork-env": ("TypeError", "env", "{'A': 1}", "str to str"),
    "on-not-callable": ("TypeError", "'exit'", "'print'", "callable"),
    "on-bad-event": ("TypeError", "event", "str", "int"),
    "disconnect-callback": ("TypeError", "callback", "5", "callable or None"),
    "primary-listen-float": ("TypeError", "address", "3.5", "(host, port)"),
    "primary-listen-backlog": ("TypeError", "backlog", "'x'", "int"),
    "send-set": ("TypeError", "JSON", "{1, 2}", "allowed:"),
    "send-object": ("TypeError", "JSON", "object", "allowed:"),
    "kill-bad-name": ("ValueError", "signal", "'SIGFOO'", "SIGTERM"),
    "kill-bad-number": ("ValueError", "signal", "0", "1 to"),
    "kill-bad-type": ("TypeError", "signal", "1.5", "a name"),
    "run-reentrant": ("RuntimeError", "cluster.run()", "already running"),
    "primary-listen-taken": ("OSError", "Address already in use"),
    "worker-fork": ("RuntimeError", "cluster.fork()", "primary", "worker"),
    "worker-setup": ("RuntimeError", "cluster.setup_primary()", "primary", "worker"),
    "worker-disconnect-all": ("RuntimeError", "cluster.disconnect()", "primary",
                              "cluster.worker.disconnect()"),
    "listen-port-range": ("ValueError", "port", "70000", "0 to 65535"),
    "listen-port-type": ("TypeError", "port", "'80'", "int from 0 to 65535"),
    "listen-host-type": ("TypeError", "host", "127", "str"),
    "listen-object": ("TypeError", "address", "object", "(host, port)"),
    "listen-empty-path": ("ValueError", "address", "path", "empty"),
    "listen-backlog": ("ValueError", "backlog", "-1", ">= 0"),
    "listen-unknown-host": ("gaierror", "no-such-host.invalid:0"),
    "worker-send-bytes": ("TypeError", "JSON", "b'raw'", "allowed:"),
}


def test_api_misuse_raises_clear_errors_and_disturbs_nothing(tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    path = script(tmp_path, MISUSE)
    port = free_port()
    with running(path, dict(env, PORT=str(port))) as r:
        r.wait_for("message serving")
        r.wait_for("misuse primary-listen-taken")
        r.wait_for("dead send error")
        ok, pid = request(port)
        assert ok, pid
        r.signal(signal.SIGTERM)
        code, out = r.finish(timeout=15)
    assert code == 0, out
    got = {ln.split()[1]: ln.split(" ", 2)[2] for ln in lines("\n".join(out), "misuse ")}
    assert sorted(got) == sorted(EXPECT), out
    unclear = {label: got[label] for label, words in EXPECT.items()
               if not all(w in got[label] for w in words)}
    assert unclear == {}, "\n".join(f"{k}: {v}" for k, v in unclear.items())
    assert "settings intact True" in out
    assert "primary listen SocketListener True" in out
    assert "dead send returns False" in out
    dead = [ln for ln in out if ln.startswith("dead send error")]
    assert len(dead) == 1 and "dead" in dead[0] and "hello?" not in dead[0], dead
    assert "primary done" in out
    assert not [ln for ln in out if "Traceback" in ln], out


SMUGGLE = """
import json, os, pickle, struct
import fastcluster as cluster
from fastcluster import _role

MARKER = os.environ["MARKER"]

class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + MARKER,))

def kinds(obj):
    if isinstance(obj, dict):
        return {"dict"} | {k for key, v in obj.items() for k in kinds(key) | kinds(v)}
    if isinstance(obj, list):
        return {"list"} | {k for v in obj for k in kinds(v)}
    return {type(obj).__name__}

if cluster.is_primary:
    w = cluster.fork()
    errors = []
    w.on("error", lambda e: errors.append(type(e).__name__))
    seen = set()
    def on_message(worker, m):
        if m == "done":
            print("kinds", sorted(seen), flush=True)
            print("errors", len(errors), set(errors), flush=True)
            print("marker exists", os.path.exists(MARKER), flush=True)
            worker.disconnect()
        else:
            seen.update(kinds(m))
    cluster.on("message", on_message)
    cluster.run()
else:
    sock = _role.runtime.ctl.sock
    def raw(body):
        with _role.runtime.ctl.lock:
            sock.setblocking(True)
            sock.sendall(struct.pack(">I", len(body)) + body)
    payloads = [pickle.dumps(Boom(), protocol=p) for p in (0, 2, 5)]
    for body in payloads:                       # a pickle as the frame itself
        raw(body)
    for body in payloads:                       # a pickle inside a JSON string
        raw(json.dumps({"t": "msg", "d": body.decode("latin-1")}).encode())
    odd = {"__reduce__": ["os.system", ["touch " + MARKER]], "__class__": "os._wrap_close",
           "py/object": "os.system", "$type": "System.Diagnostics.Process",
           "!!python/object/apply:os.system": ["touch " + MARKER], "big": 10 ** 300,
           "float": 1e308, "neg": -0.0, "nested": [[[{"a": None}]]], "t": True}
    raw(json.dumps({"t": "msg", "d": odd}).encode())
    raw(b'{"t": "msg", "d": NaN}')              # not JSON (Python's extension)
    raw(b'{"t": "msg", "d": ' + b"9" * 5000 + b"}")  # an int too long to parse
    raw(b'{"t": "msg", "d": 1, "nfds": 3}')     # claims fds it does not pass
    raw(b'{"t": "listen", "req": 99, "address": {"__reduce__": 1}, "backlog": "x"}')
    cluster.worker.send("done")
    cluster.run()
"""


def test_nothing_from_a_worker_is_unpickled_or_evaluated(tmp_path: Path,
                                                         env: dict[str, str]) -> None:
    marker = tmp_path / "pwned"
    proc = run(script(tmp_path, SMUGGLE), dict(env, MARKER=str(marker)))
    assert proc.returncode == 0, proc.stderr
    out = lines(proc.stdout)
    assert "kinds ['NoneType', 'bool', 'dict', 'float', 'int', 'list', 'str']" in out, out
    assert "errors 5 {'ProtocolError'}" in out, out  # 3 pickles, NaN, the long int
    assert "marker exists False" in out
    assert not marker.exists()


def unix_sockets() -> dict[int, tuple[str, str]]:
    """inode -> (type, path) of every Unix socket on the host."""
    out = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            out[int(fields[6])] = (fields[4], fields[7] if len(fields) > 7 else "")
    return out


def socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


CHANNELS = HTTP_SERVER + """
if cluster.is_primary:
    for _ in range(2):
        cluster.fork()
    cluster.on("message", lambda w, m: print(m, w.pid, flush=True))
    cluster.run()
else:
    serve_http(int(os.environ["PORT"]))
"""


def test_channels_are_socketpairs_without_a_path(tmp_path: Path, env: dict[str, str]) -> None:
    port = free_port()
    with running(script(tmp_path, CHANNELS), dict(env, PORT=str(port))) as r:
        r.wait_for("serving", 2)
        assert request(port)[0]
        table = unix_sockets()
        procs = [r.pid, *children(r.pid)]
        mine = {pid: {i: table[i] for i in socket_inodes(pid) if i in table} for pid in procs}
        r.signal(signal.SIGTERM)
        code, _out = r.finish(timeout=15)
    assert code == 0
    assert len(procs) == 3
    for pid, socks in mine.items():
        assert socks, f"process {pid} has no Unix socket"
        named = {i: s for i, s in socks.items() if s[1]}
        assert named == {}, f"process {pid} has Unix sockets with a path: {named}"
        kinds = {t for t, _ in socks.values()}
        assert kinds == {"0001", "0005"}, socks  # SOCK_STREAM control, SOCK_SEQPACKET data
    for pid in procs[1:]:  # a worker holds its two channel ends and nothing else
        assert sorted(t for t, _ in mine[pid].values()) == ["0001", "0005"], mine[pid]


PRIVILEGE = """
import ctypes, errno, os, signal, socket
import fastcluster as cluster

def probe(label, fn):
    try:
        fn()
    except PermissionError:
        return label + "=EPERM"
    except OSError as e:
        return label + "=" + errno.errorcode.get(e.errno, str(e.errno))
    return label + "=allowed"

def main():
    ppid = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    def ptrace():
        if libc.ptrace(16, ppid, None, None) != 0:  # PTRACE_ATTACH
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    def listening():  # rr: the worker holds no listening socket at all
        n = 0
        for fd in map(int, os.listdir("/proc/self/fd")):
            try:
                s = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue
            with s:
                n += s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        return f"listening={n}"
    results = [f"uid={os.getuid()}", f"gid={os.getgid()}",
               probe("kill0", lambda: os.kill(ppid, 0)),
               probe("term", lambda: os.kill(ppid, signal.SIGTERM)),
               probe("ptrace", ptrace),
               probe("mem", lambda: open(f"/proc/{ppid}/mem", "rb").close()),
               probe("fds", lambda: os.listdir(f"/proc/{ppid}/fd")),
               probe("environ", lambda: open(f"/proc/{ppid}/environ", "rb").close()),
               listening()]
    cluster.worker.send(" ".join(results))

if cluster.is_primary:
    cluster.setup_primary(target=main, uid=65534, gid=65534, respawn=False)
    w = cluster.fork()
    w.on("message", lambda m: print(m, flush=True))
    cluster.run()
    print("primary alive", flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_a_worker_dropped_to_another_uid_cannot_touch_the_primary(
        tmp_path: Path, env: dict[str, str]) -> None:
    proc = run(script(tmp_path, PRIVILEGE), env)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout) == [
        "uid=65534 gid=65534 kill0=EPERM term=EPERM ptrace=EPERM mem=EPERM fds=EPERM "
        "environ=EPERM listening=0",
        "primary alive"], proc.stdout + proc.stderr
