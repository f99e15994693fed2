"""gunicorn's request limits (--limit-request-line, --limit-request-fields,
--limit-request-field-size) on uvicorn's HTTP protocols.

Theory of operation: uvicorn has no such limits, so a subclass of its
protocol checks them where it parses. HttpToolsProtocol: in the parser
callbacks it already has (the URL as it arrives, each header field); past a
limit the callback raises, httptools stops parsing (HttpParserError).
H11Protocol: its h11 Connection is one whose next_event() checks a Request
event before handing it over, raising h11's RemoteProtocolError past a
limit (h11 itself already bounds the whole head at
h11_max_incomplete_event_size, 16 KiB). Either way uvicorn's error path
calls send_400_response, which here answers with gunicorn's status for the
limit (400 for the request line, 431 Request Header Fields Too Large for
the fields) and closes the connection. A request within the limits costs
a length check or two.
"""

from __future__ import annotations

from typing import Any

_REASONS = {400: b"Bad Request", 431: b"Request Header Fields Too Large"}


class _Limit(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def limited_protocol(http: str, line: int, fields: int, field_size: int) -> type[Any]:
    """uvicorn's protocol class `http` ("httptools" or "h11") enforcing the
    limits (0: none)."""
    if http == "h11":
        return _limited_h11(line, fields, field_size)
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


def _limited_h11(line: int, fields: int, field_size: int) -> type[Any]:
    import h11
    from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE  # (as uvicorn imports it)
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def check(event: Any) -> _Limit | None:
        if line and len(event.method) + len(event.target) + 10 > line:
            return _Limit(400, f"the request line is longer than {line} bytes "
                          "(--limit-request-line)")
        if fields and len(event.headers) > fields:
            return _Limit(431, f"more than {fields} header fields (--limit-request-fields)")
        if field_size and any(len(n) + 2 + len(v) > field_size for n, v in event.headers):
            return _Limit(431, f"a header field is longer than {field_size} bytes "
                          "(--limit-request-field-size)")
        return None

    class LimitedConnection(h11.Connection):
        fc_limit: _Limit | None = None

        def next_event(self) -> Any:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self.fc_limit = check(event)
                if self.fc_limit is not None:
                    raise h11.RemoteProtocolError(self.fc_limit.message)
            return event

    class LimitedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            size = self.config.h11_max_incomplete_event_size
            self.conn = LimitedConnection(  # as uvicorn's, with the checks
                h11.SERVER, DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if size is None else size)

        def send_400_response(self, msg: str) -> None:
            limit = getattr(self.conn, "fc_limit", None)
            if limit is None:
                super().send_400_response(msg)
                return
            headers = [(b"content-type", b"text/plain; charset=utf-8"),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=limit.status, headers=headers,
                                       reason=_REASONS[limit.status]),
                          h11.Data(data=limit.message.encode()), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return LimitedH11Protocol
