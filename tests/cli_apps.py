"""Apps the CLI tests serve (imported by the workers of `fastcluster run`).

A raw ASGI app (no framework) that records its lifespan events (and how
its WebSockets ended) in the file named by $CLI_TEST_EVENTS, echoes on a
WebSocket, a plain WSGI app, and an ASGI app whose lifespan
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
    if scope["type"] == "websocket":
        await _echo_websocket(receive, send)
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


async def _echo_websocket(receive: Any, send: Any) -> None:
    """Echoes text messages; records how the WebSocket ended."""
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            _record(f"ws-disconnect-{message.get('code')}")
            return
        await send({"type": "websocket.send", "text": f"{os.getpid()} {message.get('text')}"})


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


def wsgi_probe(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Reports what the app was given (as JSON); /hop sets hop-by-hop headers."""
    import json

    body = environ["wsgi.input"].read()
    headers = [("Content-Type", "application/json"), ("X-App", "probe")]
    if environ["PATH_INFO"] == "/hop":  # the server's to set (PEP 3333), not the app's
        headers += [("Keep-Alive", "timeout=99"), ("Upgrade", "h2c")]
    secret = os.environ.get("CLI_TEST_SECRET", "")
    out = json.dumps({
        "pid": os.getpid(), "method": environ["REQUEST_METHOD"],
        "script_name": environ["SCRIPT_NAME"], "path_info": environ["PATH_INFO"],
        "scheme": environ["wsgi.url_scheme"], "remote_addr": environ.get("REMOTE_ADDR"),
        "protocol": environ["SERVER_PROTOCOL"], "body": body.decode("latin1"),
        "input_terminated": environ.get("wsgi.input_terminated", False),
        "secret_seen": (bool(secret) and any(secret in str(v) for v in environ.values()))
        or "CLI_TEST_SECRET" in environ,
    }).encode()
    start_response("200 OK", [*headers, ("Content-Length", str(len(out)))])
    return [out]


async def hanging_startup(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A lifespan startup that never completes (a database that never answers)."""
    if scope["type"] == "lifespan":
        await receive()
        await asyncio.sleep(3600)
