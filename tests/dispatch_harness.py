"""A primary built from fastcluster._core alone, for the dispatcher's tests.

Theory of operation: run as a script, one scenario per run, so that each test
gets its own processes, fd table and resource limits. The harness forks raw
workers (a WorkerChannel and a tiny responder each), forks a client process
(asyncio, bounded in count and time) that reports its tallies as JSON on a
pipe, and drives the dispatcher, watching that pipe, until the client is done.
It prints one JSON line: the client's results and the dispatcher's stats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from typing import Any

from fastcluster import _core

PIPE_TOKEN = 1


def worker_main(ch: _core.WorkerChannel, slot: int, hold: bool) -> None:
    """Replies '<slot>\\n' to each connection; closes it unless hold."""
    held: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    sel.register(ch.fileno(), selectors.EVENT_READ)
    while True:
        sel.select(1.0)
        if os.getppid() == 1:
            return
        while True:
            batch = ch.recv()
            if batch is None:
                return
            if not batch:
                break
            for _tag, fd in batch:
                s = socket.socket(fileno=fd)
                s.setblocking(True)
                try:
                    s.sendall(b"%d\n" % slot)
                except OSError:
                    pass
                if hold:
                    held.append(s)
                else:
                    s.close()
                    ch.connection_closed(1)


Address = Any  # (host, port) or a Unix socket path; or a list of them, used in turn


async def client_main(addr: Address, count: int, concurrency: int, timeout: float,
                      deadline: float) -> dict[str, Any]:
    replies: dict[str, int] = {}
    failures: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    addrs = addr if isinstance(addr, list) else [addr]

    async def one(i: int) -> None:
        target = addrs[i % len(addrs)]
        async with sem:
            if time.monotonic() > deadline:
                failures["deadline"] = failures.get("deadline", 0) + 1
                return
            try:
                if isinstance(target, str):
                    opening = asyncio.open_unix_connection(target)
                else:
                    opening = asyncio.open_connection(*target)
                r, w = await asyncio.wait_for(opening, timeout)
                try:
                    line = await asyncio.wait_for(r.readline(), timeout)
                finally:
                    w.close()
                key = line.decode().strip() or "empty"
                if key == "empty":
                    failures[key] = failures.get(key, 0) + 1
                else:
                    replies[key] = replies.get(key, 0) + 1
            except (OSError, asyncio.TimeoutError) as e:
                name = type(e).__name__
                failures[name] = failures.get(name, 0) + 1

    await asyncio.gather(*(one(i) for i in range(count)))
    return {"replies": replies, "failures": failures}


def fork_client(addr: Address, count: int, concurrency: int, timeout: float,
                limit: float) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            deadline = time.monotonic() + limit
            res = asyncio.run(client_main(addr, count, concurrency, timeout, deadline))
            os.write(w, json.dumps(res).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def bad_worker_main(ch: _core.WorkerChannel, mode: str) -> None:
    """garbage: floods the data channel with junk (bytes, fds) for 3 s.
    hangup: reads nothing for 1 s (so its window fills), then closes its
    end of the channel and lives on."""
    if mode == "garbage":
        junk = os.open("/dev/null", os.O_RDONLY)
        end = time.monotonic() + 3.0
        sock = socket.socket(fileno=os.dup(ch.fileno()))
        while time.monotonic() < end:
            try:
                sock.send(os.urandom(64))
                _core.send_fds(sock.fileno(), [junk] * 8)
            except OSError:
                time.sleep(0.001)
        sock.close()
        worker_main(ch, 0, False)
    else:
        time.sleep(1.0)
        ch.close()
        time.sleep(30.0)


class Harness:
    def __init__(self, workers: int, policy: str, window: int, hold: list[int],
                 bad: str = "", peer: bool = False) -> None:
        self.bad = bad
        self.peer = peer  # the dispatcher holds each worker's end (no copies kept)
        self.table = _core.CounterTable(16)
        pol = _core.POLICY_LEAST if policy == "least" else _core.POLICY_RR
        self.d = _core.Dispatcher(self.table, window=window, policy=pol)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.addr = self.listener.getsockname()
        self.lid = self.d.add_listener(self.listener.fileno())
        self.extra: list[tuple[socket.socket, int]] = []
        self.pids: dict[int, int] = {}
        for slot in range(workers):
            self.fork_worker(slot, slot in hold)

    def add_listeners(self, kinds: list[str], tmpdir: str) -> list[Address]:
        """More listening sockets (v4, v6, unix), served by every worker."""
        addrs: list[Address] = []
        for kind in kinds:
            if kind == "unix":
                sock = socket.socket(socket.AF_UNIX)
                path = os.path.join(tmpdir, f"l{len(self.extra)}.sock")
                sock.bind(path)
            else:
                sock = socket.socket(socket.AF_INET6 if kind == "v6" else socket.AF_INET)
                sock.bind(("::1" if kind == "v6" else "127.0.0.1", 0))
            sock.listen(1024)
            lid = self.d.add_listener(sock.fileno())
            for slot in self.pids:
                self.d.subscribe(slot, lid)
            self.extra.append((sock, lid))
            name = sock.getsockname()
            addrs.append(name if kind == "unix" else (name[0], name[1]))
        return addrs

    def fork_worker(self, slot: int, hold: bool) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.d.add_worker(slot, mine.detach(), theirs.fileno() if self.peer else None)
        self.d.subscribe(slot, self.lid)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.d.close()
                self.listener.close()
                for sock, _lid in self.extra:
                    sock.close()
                ch = _core.WorkerChannel(theirs.detach(), self.table, slot)
                if slot == 0 and self.bad:
                    bad_worker_main(ch, self.bad)
                else:
                    worker_main(ch, slot, hold)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pids[slot] = pid

    def kill(self, slot: int, sig: int) -> None:
        os.kill(self.pids[slot], sig)

    def reap(self, slot: int) -> None:
        os.waitpid(self.pids[slot], 0)
        self.d.remove_worker(slot)

    def serve_until_done(self, client_fd: int, limit: float, tick: Any = None) -> dict[str, Any]:
        self.d.watch(client_fd, PIPE_TOKEN)
        chunks: list[bytes] = []
        end = time.monotonic() + limit
        while time.monotonic() < end:
            for kind, ident, _ in self.d.run(0.05):
                if kind == _core.EV_WATCH and ident == PIPE_TOKEN:
                    data = os.read(client_fd, 65536)
                    if not data:
                        self.d.unwatch(client_fd)
                        os.close(client_fd)
                        return json.loads(b"".join(chunks))
                    chunks.append(data)
            if tick is not None:
                tick()
        raise SystemExit("harness: the client did not finish in time")

    def shutdown(self) -> None:
        for slot, pid in self.pids.items():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.d.remove_worker(slot)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def close_wait_on(port: int) -> int:
    """Sockets in CLOSE_WAIT (state 08) on our port, in this network namespace."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "08" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["spread", "stop_one", "stop_all", "kill_inflight", "emfile", "soak"])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--policy", default="rr")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hold", type=int, action="append", default=[])
    ap.add_argument("--listeners", default="", help="more listeners: v4,v6,unix")
    ap.add_argument("--bad", choices=["garbage", "hangup"], default="",
                    help="worker 0 misbehaves on its data channel")
    ap.add_argument("--peer", action="store_true",
                    help="the dispatcher holds each worker's end and keeps no copies")
    ap.add_argument("--slot-window", type=int, default=0,
                    help="worker 0's own window (set_window), below --window")
    a = ap.parse_args()

    h = Harness(a.workers, a.policy, a.window, a.hold, a.bad, a.peer)
    w0 = a.window
    if a.slot_window:
        h.d.set_window(0, a.slot_window)
        w0 = a.slot_window
    out: dict[str, Any] = {}
    target: Address = h.addr
    if a.listeners:
        import tempfile
        tmp = tempfile.mkdtemp(prefix="fc-harness-")
        target = [h.addr, *h.add_listeners(a.listeners.split(","), tmp)]
    if a.scenario == "emfile":
        # The client must not share the primary's fd limit: fork it first.
        for slot in range(a.workers):
            h.kill(slot, signal.SIGSTOP)
        pid, fd = fork_client(h.addr, a.connections, a.concurrency, 20.0, 40.0)
        nfds = len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nfds + 8, hard))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # workers stopped: copies pile up to the limit
            h.d.run(0.05)
        c0 = cpu_seconds()
        t1 = time.monotonic()
        while time.monotonic() - t1 < 1.0:
            h.d.run(0.05)
        out["cpu_while_exhausted"] = (cpu_seconds() - c0) / (time.monotonic() - t1)
        out["stats_exhausted"] = h.d.stats()
        for slot in range(a.workers):
            h.kill(slot, signal.SIGCONT)
        out["client"] = h.serve_until_done(fd, 60.0)
        os.waitpid(pid, 0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        pid, fd = fork_client(h.addr, 50, 8, 5.0, 20.0)
        out["after"] = h.serve_until_done(fd, 30.0)
        os.waitpid(pid, 0)
    elif a.scenario == "soak":
        # warm up, so that lazily grown arrays and caches are in the baseline
        pid, fd = fork_client(h.addr, 2000, a.concurrency, 20.0, 60.0)
        h.serve_until_done(fd, 60.0)
        os.waitpid(pid, 0)
        out["before"] = {"fds": len(os.listdir("/proc/self/fd")), "rss_kib": rss_kib()}
        pid, fd = fork_client(h.addr, a.connections, a.concurrency, 20.0, 240.0)
        out["client"] = h.serve_until_done(fd, 300.0)
        os.waitpid(pid, 0)
        h.d.run(0.2)
        out["after"] = {"fds": len(os.listdir("/proc/self/fd")), "rss_kib": rss_kib(),
                        "close_wait": close_wait_on(h.addr[1])}
    elif a.scenario == "stop_one":
        h.kill(0, signal.SIGSTOP)
        pid, fd = fork_client(h.addr, a.connections, a.concurrency, 20.0, 40.0)
        state = {"resumed": False}

        def tick() -> None:
            # Resume worker 0 once the others have served all but its window.
            s1 = sum(h.d.slot_stats(s)["closed"] for s in range(1, a.workers))
            if not state["resumed"] and s1 >= a.connections - w0:
                out["others_before_resume"] = s1
                out["held_by_stopped"] = h.d.slot_stats(0)["held"]
                h.kill(0, signal.SIGCONT)
                state["resumed"] = True

        out["client"] = h.serve_until_done(fd, 60.0, tick)
        os.waitpid(pid, 0)
    elif a.scenario == "stop_all":
        for slot in range(a.workers):
            h.kill(slot, signal.SIGSTOP)
        pid, fd = fork_client(h.addr, a.connections, a.concurrency, 20.0, 40.0)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.5:
            h.d.run(0.05)
        c0 = cpu_seconds()
        t1 = time.monotonic()
        while time.monotonic() - t1 < 1.0:
            h.d.run(0.05)
        out["cpu_while_full"] = (cpu_seconds() - c0) / (time.monotonic() - t1)
        out["stats_full"] = h.d.stats()
        out["held_full"] = [h.d.slot_stats(s)["held"] for s in range(a.workers)]
        for slot in range(a.workers):
            h.kill(slot, signal.SIGCONT)
        out["client"] = h.serve_until_done(fd, 60.0)
        os.waitpid(pid, 0)
    elif a.scenario == "kill_inflight":
        h.kill(0, signal.SIGSTOP)
        pid, fd = fork_client(h.addr, a.connections, a.concurrency, 20.0, 40.0)
        t0 = time.monotonic()
        while h.d.slot_stats(0)["held"] < a.window and time.monotonic() - t0 < 10:
            h.d.run(0.02)
        out["held_at_kill"] = h.d.slot_stats(0)["held"]
        h.kill(0, signal.SIGKILL)
        if a.peer:  # no hang-up while we hold its end: the reap tells (as in the primary)
            os.waitpid(h.pids[0], 0)
            h.d.remove_worker(0)
        out["client"] = h.serve_until_done(fd, 60.0)
        os.waitpid(pid, 0)
        h.pids.pop(0)
    else:
        c0 = cpu_seconds()
        t0 = time.monotonic()
        pid, fd = fork_client(target, a.connections, a.concurrency, 20.0, 100.0)
        out["client"] = h.serve_until_done(fd, 120.0)
        out["primary_cpu_share"] = (cpu_seconds() - c0) / (time.monotonic() - t0)
        os.waitpid(pid, 0)
    out["stats"] = h.d.stats()
    out["slots"] = [h.d.slot_stats(s) for s in range(a.workers)]
    h.shutdown()
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
