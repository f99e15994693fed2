"""The fastcluster benchmark server, written against the public API only.

Node's pattern: the primary forks $WORKERS workers and runs the cluster; each
worker serves _hello.Hello (the raw asyncio protocol of the SO_REUSEPORT
anchor, uvloop when installed) on 127.0.0.1:$PORT through
fastcluster.aio.create_server. $POLICY picks rr, least, shared, reuseport or
steer; $STEER_MODE (auto, ebpf, cbpf, plain) forces steer's program.

    PORT=8000 WORKERS=2 POLICY=rr python bench/servers/fastcluster_hello.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hello

import fastcluster as cluster

# Imported at the top, as an app imports its dependencies: with fork, workers
# (replacements included) share what the primary imported before forking.
with contextlib.suppress(ImportError):
    import uvloop  # noqa: F401

PORT = int(os.environ.get("PORT", "8000"))
WORKERS = int(os.environ.get("WORKERS", "2"))
POLICY = os.environ.get("POLICY", "rr")


async def serve(stats: _hello.Stats) -> None:
    from fastcluster import aio

    server = await aio.create_server(_hello.protocol_factory(stats), ("127.0.0.1", PORT))
    stats.start_flushing(asyncio.get_running_loop())
    async with server:
        await server.serve_forever()


def worker_main() -> None:
    assert cluster.worker is not None
    loop, uv = _hello.new_loop()
    asyncio.set_event_loop(loop)
    stats = _hello.Stats(cluster.worker.id - 1, uv)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(serve(stats))


if cluster.is_primary:
    # respawn: replace a worker that dies (the harness's respawn scenario kills some)
    extra = {"steer_mode": os.environ["STEER_MODE"]} if os.environ.get("STEER_MODE") else {}
    cluster.setup_primary(policy=POLICY, respawn=True,
                          start_method=os.environ.get("FC_START_METHOD", "fork"), **extra)
    for _ in range(WORKERS):
        cluster.fork()
    cluster.run()
else:
    worker_main()
