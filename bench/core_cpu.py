"""The primary's CPU per connection, C core alone: `python bench/core_cpu.py`.

A primary made of fastcluster._core (no Python per connection: it sits in
Dispatcher.run) feeds N asyncio workers that answer every HTTP request with
"Hello from Cluster!\\n". wrk drives it with `Connection: close`; the primary's
utime and stime are read from /proc/<pid>/stat before and after, and divided
by the connections it accepted. The issue D harness (bench/run.py) measures
the full API beside the anchors; this isolates the C dispatcher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from fastcluster import _core

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nHello from Cluster!\n"
CLK = os.sysconf("SC_CLK_TCK")


class Hello(asyncio.Protocol):
    def __init__(self, ch: _core.WorkerChannel) -> None:
        self.ch = ch

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t.write(RESPONSE * data.count(b"\r\n\r\n"))
        if b"onnection: close" in data:
            self.t.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ch.connection_closed(1)


def worker(ch: _core.WorkerChannel) -> None:
    try:
        import uvloop  # type: ignore[import-not-found]
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()

    def intake() -> None:
        batch = ch.recv()
        if batch is None:
            loop.stop()
            return
        for _tag, fd in batch:
            sock = socket.socket(fileno=fd)
            loop.create_task(loop.connect_accepted_socket(lambda: Hello(ch), sock))

    loop.add_reader(ch.fileno(), intake)
    loop.run_forever()


def cpu_ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--policy", choices=["rr", "least"], default="rr")
    a = ap.parse_args()
    wrk = shutil.which("wrk")
    if not wrk:
        sys.exit("wrk not found: apt-get install wrk")

    table = _core.CounterTable(64)
    d = _core.Dispatcher(table, policy=_core.POLICY_LEAST if a.policy == "least" else _core.POLICY_RR)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    port = ls.getsockname()[1]
    lid = d.add_listener(ls.fileno())
    pids = []
    for slot in range(a.workers):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        d.add_worker(slot, mine.detach())
        d.subscribe(slot, lid)
        pid = os.fork()
        if pid == 0:
            try:
                d.close()
                ls.close()
                worker(_core.WorkerChannel(theirs.detach(), table, slot))
            finally:
                os._exit(0)
        theirs.close()
        pids.append(pid)

    primary = os.getpid()
    out = {}
    for mode, headers in (("close", ["-H", "Connection: close"]), ("keepalive", [])):
        before = cpu_ticks(primary)
        accepted0 = d.stats()["accepted"]
        proc = subprocess.Popen([wrk, "-t1", f"-c{a.connections}", f"-d{a.duration}s", *headers,
                                 f"http://127.0.0.1:{port}/"], stdout=subprocess.PIPE, text=True)
        while proc.poll() is None:
            d.run(0.2)
        text = proc.stdout.read() if proc.stdout else ""
        after = cpu_ticks(primary)
        conns = d.stats()["accepted"] - accepted0
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        user_s = (after[0] - before[0]) / CLK
        sys_s = (after[1] - before[1]) / CLK
        out[mode] = {
            "requests_per_s": float(m.group(1)) if m else None,
            "connections": conns,
            "primary_user_us_per_conn": user_s / conns * 1e6 if conns else None,
            "primary_sys_us_per_conn": sys_s / conns * 1e6 if conns else None,
            "errors": re.findall(r"(Socket errors:.*|Non-2xx.*)", text),
        }
    out["shares"] = [d.slot_stats(s)["dispatched"] for s in range(a.workers)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
