"""A load generator that counts failed requests exactly (for respawn and rolling
restart), where wrk cannot: with `Connection: close` wrk reuses a connection
whose response lacked a "Connection: close" header (as the raw asyncio
responder's does), so every request adds one spurious read error.

Each client does: connect, send one GET with Connection: close, read until
the body arrives. A request failed when any step raises (refused, reset,
timeout) or the connection ends before the body. Clients run as threads in a
few forked processes, so Python's GIL does not cap the rate at one core.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from collections import Counter
from typing import Any

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
BODY = b"Hello from Cluster!\n"


def _one(port: int, timeout: float) -> str | None:
    """None when the request succeeded, else the kind of failure."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(REQUEST)
            got = b""
            while BODY not in got:
                b = s.recv(4096)
                if not b:
                    return "eof"
                got += b
            return None
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    except OSError as e:
        return type(e).__name__


def _process(port: int, threads: int, stop: Any, limit: float, q: Any, timeout: float) -> None:
    ok = 0
    failed: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + limit

    def client() -> None:
        nonlocal ok
        while not stop.is_set() and time.monotonic() < deadline:
            err = _one(port, timeout)
            with lock:
                if err is None:
                    ok += 1
                else:
                    failed[err] += 1

    ts = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(limit + timeout + 5)
    q.put((ok, dict(failed)))


class Load:
    """Continuous Connection: close load from `procs` x `threads` clients, for at
    most `limit` seconds; stop() returns {"requests", "failed", "errors", "rps"}."""

    def __init__(self, port: int, limit: float, procs: int = 2, threads: int = 8,
                 timeout: float = 5.0) -> None:
        ctx = mp.get_context("fork")
        self.stop_ev = ctx.Event()
        self.q: Any = ctx.Queue()
        self.t0 = time.monotonic()
        self.limit = limit
        self.timeout = timeout
        self.ps = [ctx.Process(target=_process,
                               args=(port, threads, self.stop_ev, limit, self.q, timeout),
                               daemon=True) for _ in range(procs)]
        for p in self.ps:
            p.start()
        self.result: dict[str, Any] | None = None

    def stop(self) -> dict[str, Any]:
        if self.result is not None:
            return self.result
        self.stop_ev.set()
        ok = 0
        failed: Counter[str] = Counter()
        for _ in self.ps:
            try:
                o, f = self.q.get(timeout=self.limit + self.timeout + 10)
            except Exception:
                failed["lost_client_process"] += 1
                continue
            ok += o
            failed.update(f)
        for p in self.ps:
            p.join(5)
            if p.is_alive():
                p.kill()
        secs = time.monotonic() - self.t0
        n = sum(failed.values())
        self.result = {"requests": ok + n, "ok": ok, "failed": n, "errors": dict(failed),
                       "rps": ok / secs if secs > 0 else 0.0, "seconds": secs}
        return self.result
