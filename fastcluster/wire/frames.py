"""Control-channel framing: 4-byte big-endian length, then a UTF-8 JSON object.

Theory of operation: pure bytes in, frames out (h11's shape: no I/O here).
Every frame is a JSON object with a "t" (type) key. User messages are
{"t": "msg", "d": obj}; the other types are the runtime's own (listen
requests and replies, online, listening, disconnect...). Frames larger than
MAX_FRAME are refused by the encoder (ValueError) and by the decoder
(ProtocolError, fatal: the stream cannot be resynchronised). A well-delimited
frame that does not decode is a non-fatal ProtocolError. JSON only (strict:
no NaN or Infinity): nothing a worker sends can make the primary run code
(no pickle, no object hooks); a frame decodes to dicts, lists, str, int,
float, bool and None, nothing else.

File descriptors (the listening socket, for the `shared` policy) travel as
SCM_RIGHTS data on the frame's first bytes; a frame that carries fds says how
many in its "nfds" key, and the receiver takes that many from the queue of
fds received so far (they always arrive no later than their frame's bytes).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from .errors import ProtocolError

MAX_FRAME = 1 << 20  # bytes of JSON in one frame, by default (setting max_frame)
HEADER = struct.Struct(">I")

Frame = dict[str, Any]


ALLOWED = ("dict (str keys), list, tuple, str, int, float (finite), bool or None, "
           "nested")


def encode(frame: Frame, max_frame: int = MAX_FRAME) -> bytes:
    """One frame as bytes. TypeError if it is not JSON-serialisable;
    ValueError if it is larger than max_frame."""
    try:
        body = json.dumps(frame, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        if isinstance(e, RecursionError):
            e = RecursionError("nested too deeply (or it contains itself)")
        raise TypeError(f"message is not JSON-serialisable ({e}); allowed: {ALLOWED}; "
                        f"got {_short(frame.get('d', frame))}") from None
    if len(body) > max_frame:
        raise ValueError(f"message is too large: {len(body)} bytes of JSON; "
                         f"allowed: up to {max_frame}")
    return HEADER.pack(len(body)) + body


def _short(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # a user's __repr__ may raise
        text = f"<{type(obj).__name__} object>"
    return text if len(text) <= 80 else text[:77] + "..."


def encode_message(obj: Any, max_frame: int = MAX_FRAME) -> bytes:
    """A user message (anything JSON can carry: dict, list, str, numbers,
    bool, None; tuples arrive as lists)."""
    return encode({"t": "msg", "d": obj}, max_frame)


class FrameDecoder:
    """Incremental decoder: feed() bytes, then iterate frames()."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        self._broken: str | None = None
        self.completed = 0  # frames decoded so far (a stalled partial frame leaves it be)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet decoded."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._broken is None:
            self._buf += data

    def frames(self) -> Iterator[Frame]:
        """Yields each complete frame. Raises ProtocolError for a bad one:
        non-fatal ones are consumed, so iterating again continues after it."""
        if self._broken is not None:
            raise ProtocolError(self._broken, fatal=True)
        try:
            while True:
                avail = len(self._buf) - self._pos
                if avail < HEADER.size:
                    return
                (size,) = HEADER.unpack_from(self._buf, self._pos)
                if size > self.max_frame:
                    self._broken = f"frame of {size} bytes is over the limit ({self.max_frame})"
                    self._buf.clear()
                    self._pos = 0
                    raise ProtocolError(self._broken, fatal=True)
                if avail < HEADER.size + size:
                    return
                start = self._pos + HEADER.size
                body = bytes(self._buf[start:start + size])
                self._pos = start + size
                self.completed += 1
                yield _decode_body(body)
        finally:
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_body(body: bytes) -> Frame:
    try:
        # NaN and Infinity are Python's extensions: the encoder never makes them
        obj = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"frame is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ProtocolError(f"frame is not an object with a 't' key: {str(obj)[:80]!r}")
    return obj
