"""gunicorn's request limits (--limit-request-line, --limit-request-fields,
--limit-request-field-size) on uvicorn's httptools protocol.

Theory of operation: uvicorn has no such limits, so a subclass of its
HttpToolsProtocol checks them in the parser callbacks it already has (the
URL as it arrives, each header field): past a limit the callback raises,
httptools stops parsing (HttpParserError), and uvicorn's error path calls
send_400_response, which here answers with gunicorn's status for the limit
(400 for the request line, 431 Request Header Fields Too Large for the
fields) and closes the connection. Nothing is added to a request within
the limits but a length check per callback.
"""

from __future__ import annotations

from typing import Any

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class _Limit(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def limited_protocol(line: int, fields: int, field_size: int) -> type[Any]:
    """An HttpToolsProtocol class that enforces the limits (0: none)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _fc_limit: _Limit | None = None

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            # "METHOD URL HTTP/1.1", as gunicorn counts it (without the CRLF)
            if line and len(self.parser.get_method()) + len(self.url) + 10 > line:
                self._fc_limit = _Limit(400, f"the request line is longer than {line} bytes "
                                        "(--limit-request-line)")
                raise self._fc_limit

        def on_header(self, name: bytes, value: bytes) -> None:
            if field_size and len(name) + 2 + len(value) > field_size:
                self._fc_limit = _Limit(431, f"a header field is longer than {field_size} "
                                        "bytes (--limit-request-field-size)")
                raise self._fc_limit
            super().on_header(name, value)
            if fields and len(self.headers) > fields:
                self._fc_limit = _Limit(431, f"more than {fields} header fields "
                                        "(--limit-request-fields)")
                raise self._fc_limit

        def send_400_response(self, msg: str) -> None:
            limit, self._fc_limit = self._fc_limit, None
            if limit is None:
                super().send_400_response(msg)
                return
            body = limit.message.encode()
            head = [b"HTTP/1.1 %d %s\r\n" % (limit.status, _REASONS[limit.status])]
            head += [name + b": " + value + b"\r\n"
                     for name, value in self.server_state.default_headers]
            head += [b"content-type: text/plain; charset=utf-8\r\n",
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return LimitedHttpToolsProtocol
