"""A primary made of fastcluster._core alone (no public API, no supervisor).

The fallback for the harness's `core-rr` / `core-least` servers, for when the
public API (cluster.fork / cluster.run / fastcluster.aio) is not importable,
and a reference that isolates the C dispatcher from the Python layer above it.
The primary binds 127.0.0.1:$PORT, forks $WORKERS workers, each with a
SOCK_SEQPACKET data channel, and sits in Dispatcher.run (C, GIL released) until
SIGTERM/SIGINT. Workers receive fd batches and run _hello.Hello through
loop.connect_accepted_socket; with `least` they report closed connections to
the shared counters. No respawn: a killed worker stays dead.

    PORT=8000 WORKERS=2 POLICY=rr python bench/servers/core_hello.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hello

from fastcluster import _core


def worker(ch: _core.WorkerChannel, index: int, least: bool) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop, uv = _hello.new_loop()
    stats = _hello.Stats(index, uv)

    def closed() -> None:
        ch.connection_closed(1)

    factory = _hello.protocol_factory(stats, closed if least else None)

    def intake() -> None:
        batch = ch.recv()
        if batch is None:  # the primary hung up
            loop.stop()
            return
        for _tag, fd in batch:
            sock = socket.socket(fileno=fd)
            loop.create_task(loop.connect_accepted_socket(factory, sock))

    loop.add_reader(ch.fileno(), intake)
    stats.start_flushing(loop)
    asyncio.set_event_loop(loop)
    loop.run_forever()


def main() -> None:
    n = int(os.environ.get("WORKERS", "2"))
    port = int(os.environ.get("PORT", "8000"))
    least = os.environ.get("POLICY", "rr") == "least"
    table = _core.CounterTable(max(n, 1))
    d = _core.Dispatcher(table, policy=_core.POLICY_LEAST if least else _core.POLICY_RR)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    lid = d.add_listener(ls.fileno())
    pids = []
    for slot in range(n):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        d.add_worker(slot, mine.detach())
        d.subscribe(slot, lid)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                d.close()
                ls.close()
                worker(_core.WorkerChannel(theirs.detach(), table, slot), slot, least)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        pids.append(pid)

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        for kind, slot, _ in d.run(1.0):
            if kind == _core.EV_WORKER_GONE:
                d.remove_worker(slot)
    d.close()  # hangs up every channel: workers stop
    for p in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p, 0)


if __name__ == "__main__":
    main()
