"""The access log of `fastcluster run`: one line per request in gunicorn's
--access-log-format, for ASGI and WSGI apps alike.

Theory of operation: a middleware around the app (ASGI or WSGI) notes the
request, the response's status, headers and body bytes and the time taken,
and logs the line through the "fastcluster.access" logger with the format
applied to a mapping of gunicorn's atoms (Atoms): `format % atoms`, as
gunicorn's glogging does. Only with --access-log: without it the app is
not wrapped and nothing runs per request.

Atoms: h remote address, l '-', u user (HTTP basic auth) or '-', t [date],
r request line, m method, U path, q query, H protocol, s status, B body
bytes, b body bytes or '-', f referer, a user agent, T seconds, M ms, D µs,
L seconds (decimal), p <pid>, {name}i a request header, {name}o a response
header, {name}e an environment variable (WSGI environ / worker env).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("fastcluster.access")


class Atoms(dict[str, str]):
    """gunicorn's SafeAtoms: {name}i/o/e keys are looked up case-insensitively,
    and a missing atom is '-'."""

    def __init__(self, atoms: dict[str, str], request: dict[str, str],
                 response: dict[str, str], environ: Any) -> None:
        super().__init__(atoms)
        self._request, self._response, self._environ = request, response, environ

    def __missing__(self, key: str) -> str:
        if key.startswith("{") and len(key) > 3 and key[-2] == "}":
            name, kind = key[1:-2], key[-1]
            if kind == "i":
                return self._request.get(name.lower(), "-")
            if kind == "o":
                return self._response.get(name.lower(), "-")
            if kind == "e":
                return str(self._environ.get(name, "-"))
        return "-"


def _user(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return "-"
    try:
        return base64.b64decode(token, validate=True).decode("latin-1").partition(":")[0]
    except (binascii.Error, ValueError):
        return "-"


def atoms(*, client: str, method: str, path: str, query: str, protocol: str, status: str,
          size: int, elapsed: float, started: float, request: dict[str, str],
          response: dict[str, str], environ: Any) -> Atoms:
    target = path + ("?" + query if query else "")
    return Atoms({
        "h": client or "-", "l": "-", "u": _user(request.get("authorization", "")),
        "t": time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(started)),
        "r": f"{method} {target} {protocol}", "m": method, "U": path, "q": query,
        "H": protocol, "s": status, "B": str(size), "b": str(size) if size else "-",
        "f": request.get("referer", "-"), "a": request.get("user-agent", "-"),
        "T": str(int(elapsed)), "M": str(int(elapsed * 1000)),
        "D": str(int(elapsed * 1_000_000)), "L": f"{elapsed:.6f}", "p": f"<{os.getpid()}>",
    }, request, response, environ)


def emit(fmt: str, values: Atoms) -> None:
    try:
        log.info(fmt, values)
    except Exception:  # a bad format: say it, never fail the request
        log.exception("fastcluster: the access log format %r failed", fmt)


def check_format(fmt: str) -> None:
    """Raises ValueError if fmt cannot be applied to the atoms."""
    sample = atoms(client="127.0.0.1", method="GET", path="/", query="", protocol="HTTP/1.1",
                   status="200", size=0, elapsed=0.0, started=time.time(), request={},
                   response={}, environ={})
    try:
        fmt % sample
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"a %-format of gunicorn's atoms, e.g. '%(h)s \"%(r)s\" %(s)s' "
                         f"({e})") from None


def _decode(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}


class AsgiAccessLog:
    """ASGI middleware: logs each HTTP request when its response is done."""

    def __init__(self, app: Any, fmt: str) -> None:
        self.app, self.fmt = app, fmt

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, t0 = time.time(), time.perf_counter()
        seen: dict[str, Any] = {"status": "500", "headers": [], "size": 0}

        async def logged_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = str(message["status"])
                seen["headers"] = message.get("headers", [])
            elif message["type"] == "http.response.body":
                seen["size"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client")
            emit(self.fmt, atoms(
                client=str(client[0]) if client else "", method=scope["method"],
                path=scope.get("raw_path", b"").decode("latin-1") or scope["path"],
                query=scope.get("query_string", b"").decode("latin-1"),
                protocol="HTTP/" + scope.get("http_version", "1.1"), status=seen["status"],
                size=seen["size"], elapsed=time.perf_counter() - t0, started=started,
                request=_decode(scope.get("headers", [])),
                response=_decode(seen["headers"]), environ=os.environ))


def wsgi_access_log(app: Callable[..., Any], fmt: str) -> Callable[..., Any]:
    """WSGI middleware: logs each request when its response iterable is closed."""

    def logged_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started, t0 = time.time(), time.perf_counter()
        seen: dict[str, Any] = {"status": "500", "headers": []}

        def logged_start(status: str, headers: list[tuple[str, str]],
                         exc_info: Any = None) -> Any:
            seen["status"], seen["headers"] = status.split(" ", 1)[0], headers
            return start_response(status, headers, exc_info)

        def done(size: int) -> None:
            request = {k[5:].replace("_", "-").lower(): str(v) for k, v in environ.items()
                       if k.startswith("HTTP_")}
            emit(fmt, atoms(
                client=environ.get("REMOTE_ADDR", ""), method=environ.get("REQUEST_METHOD", ""),
                path=environ.get("PATH_INFO", ""), query=environ.get("QUERY_STRING", ""),
                protocol=environ.get("SERVER_PROTOCOL", "HTTP/1.1"), status=seen["status"],
                size=size, elapsed=time.perf_counter() - t0, started=started, request=request,
                response={k.lower(): v for k, v in seen["headers"]}, environ=environ))

        try:
            body = app(environ, logged_start)
        except BaseException:
            done(0)
            raise
        return _Counted(body, done)

    return logged_app


class _Counted:
    """A WSGI response iterable that counts its bytes and logs when closed."""

    def __init__(self, body: Iterable[bytes], done: Callable[[int], None]) -> None:
        self._body, self._done, self._size = body, done, 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._size += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._done(self._size)
