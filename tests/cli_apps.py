"""Apps the CLI tests serve (imported by the workers of `fastcluster run`).

A raw ASGI app (no framework) that records its lifespan events in the file
named by $CLI_TEST_EVENTS, a plain WSGI app, and an ASGI app whose lifespan
startup fails. Each response names the worker's pid.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any


def _record(event: str) -> None:
    path = os.environ.get("CLI_TEST_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {os.getpid()}\n")


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _record("startup")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                _record("shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.5)
    body = f"asgi {os.getpid()} {scope['path']}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ["PATH_INFO"] == "/slow":
        time.sleep(1.5)
    body = f"wsgi {os.getpid()} {environ['PATH_INFO']}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


async def failing_startup(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database (on purpose)"})


def make_wsgi_app() -> Any:
    """An app factory (`--factory`): called once in each worker."""
    return wsgi_app


async def hanging_startup(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A lifespan startup that never completes (a database that never answers)."""
    if scope["type"] == "lifespan":
        await receive()
        await asyncio.sleep(3600)
