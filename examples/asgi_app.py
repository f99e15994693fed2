"""A raw ASGI app (no framework) with lifespan events, for `fastcluster run`.

    pip install -e '.[asgi]'
    fastcluster run examples.asgi_app:app --workers 2 --bind 127.0.0.1:8000
    curl http://127.0.0.1:8000/          # Hello from Cluster! (worker <pid>)
    fastcluster status                   # workers, connections, requests, RSS
"""

import os

state = {"started": 0}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":  # runs in each worker: startup before it listens
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["started"] += 1
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = f"Hello from Cluster! (worker {os.getpid()})\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
