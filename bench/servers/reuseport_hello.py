"""Per-worker SO_REUSEPORT, the anchor's design with the harness's counting worker.

Same as ../shared/anchors/reuseport_asyncio.py (N forked processes, each its
own SO_REUSEPORT socket bound to $PORT, kernel balancing, no dispatcher) but
the workers run _hello.Hello, which also counts connections per worker, so
this is the SO_REUSEPORT baseline with worker code equal to fastcluster's.

    PORT=8000 WORKERS=2 python bench/servers/reuseport_hello.py
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hello


def serve(port: int, index: int) -> None:
    loop, uv = _hello.new_loop()
    stats = _hello.Stats(index, uv)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1024)
    loop.run_until_complete(loop.create_server(_hello.protocol_factory(stats), sock=s))
    stats.start_flushing(loop)
    loop.run_forever()


def main() -> None:
    n = int(os.environ.get("WORKERS", "2"))
    port = int(os.environ.get("PORT", "8000"))
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                serve(port, i)
            finally:
                os._exit(0)
        pids.append(pid)

    def stop(signum: int, frame: object) -> None:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    for p in pids:
        os.waitpid(p, 0)


if __name__ == "__main__":
    main()
