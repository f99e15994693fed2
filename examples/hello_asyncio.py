"""The hello server on asyncio: fastcluster.aio.start_server in each worker.

    python examples/hello_asyncio.py        # then: curl http://127.0.0.1:8000/

Each worker runs one asyncio loop (uvloop's if it is installed and
USE_UVLOOP=1); connections arrive from the primary in batches of fds. The
worker's message channel is served by the same loop: the primary's
"disconnect" (Ctrl-C, SIGTERM) stops the server, lets open connections
finish, and serve_forever() returns.
"""

import asyncio
import os

import fastcluster as cluster
import fastcluster.aio

port = int(os.environ.get("PORT", "8000"))
workers = int(os.environ.get("WORKERS", str(os.cpu_count() or 1)))
BODY = b"Hello from Cluster!\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            keep_alive = b"connection: close" not in head.lower()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Worker-Pid: %d\r\n%s\r\n"
                         % (len(BODY), os.getpid(),
                            b"" if keep_alive else b"Connection: close\r\n") + BODY)
            await writer.drain()
            if not keep_alive:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await fastcluster.aio.start_server(handle, ("127.0.0.1", port))
    print(f"Worker {os.getpid()} serving on {server.getsockname()}", flush=True)
    await server.serve_forever()


if cluster.is_primary:
    print(f"Primary {os.getpid()} is running", flush=True)
    for _ in range(workers):
        cluster.fork()
    cluster.on("exit", lambda w, code, sig: print(f"Worker {w.pid} exited ({code}, {sig})"))
    cluster.run()
else:
    if os.environ.get("USE_UVLOOP") == "1":
        import uvloop

        uvloop.install()
    asyncio.run(main())
