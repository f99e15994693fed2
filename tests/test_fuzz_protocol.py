"""Fuzz the control-channel decoder (fastcluster/_protocol.py) with
hypothesis, bounded in examples: whatever bytes a worker writes, in whatever
pieces they arrive, the decoder yields exactly what a plain reference
reading of the stream says (frames, non-fatal errors, one fatal error),
raises nothing but ProtocolError, holds no more than one frame's bytes, and
never makes anything but JSON's own types."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcluster.wire.errors import ProtocolError
from fastcluster.wire.frames import HEADER, FrameDecoder, encode, encode_message

MAX = 256  # a small frame limit, so oversized frames come up often

JSON_TYPES = (dict, list, str, int, float, bool, type(None))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20,
)


def reference(stream: bytes, max_frame: int) -> list[Any]:
    """What the stream means, read naively: frames, "soft" for a delimited
    frame that does not decode, "fatal" (and nothing after) for an
    oversized length."""
    out: list[Any] = []
    pos = 0
    while len(stream) - pos >= HEADER.size:
        (size,) = HEADER.unpack_from(stream, pos)
        if size > max_frame:
            out.append("fatal")
            return out
        if len(stream) - pos - HEADER.size < size:
            break
        body = stream[pos + HEADER.size:pos + HEADER.size + size]
        pos += HEADER.size + size
        try:
            obj = json.loads(body, parse_constant=lambda c: 1 / 0)
        except (ValueError, RecursionError, ZeroDivisionError):
            out.append("soft")
            continue
        out.append(obj if isinstance(obj, dict) and isinstance(obj.get("t"), str) else "soft")
    return out


def decode(chunks: list[bytes], max_frame: int) -> tuple[list[Any], FrameDecoder]:
    dec = FrameDecoder(max_frame)
    out: list[Any] = []
    for chunk in chunks:
        dec.feed(chunk)
        for _ in range(len(chunk) + 2):  # each pass consumes a frame or ends
            try:
                out.extend(dec.frames())
                break
            except ProtocolError as e:
                out.append("fatal" if e.fatal else "soft")
                if e.fatal:
                    break
        else:
            raise AssertionError("the decoder did not make progress")
        if out and out[-1] == "fatal":
            break
        assert dec.buffered < HEADER.size + max_frame
    return out, dec


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


def only_json_types(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and only_json_types(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(only_json_types(v) for v in obj)
    return type(obj) in JSON_TYPES


# a stream: pieces that are whole frames (good or bad bodies), raw bytes, or headers
body = st.one_of(
    json_values.map(lambda v: json.dumps({"t": "msg", "d": v}).encode()),
    st.sampled_from([b"{not json", b"[1, 2]", b'{"t": 5}', b"\xff\xfe", b'{"t": "x", "d": NaN}',
                     b'{"t": "x", "d": -Infinity}', b"1" * 5000, b"[" * 3000, b"",
                     b'{"t": "msg", "__reduce__": ["os.system", ["true"]]}']),
    st.binary(max_size=40),
)
piece = st.one_of(
    body.map(lambda b: HEADER.pack(len(b)) + b),
    st.binary(max_size=12),
    st.integers(0, 2 ** 32 - 1).map(HEADER.pack),
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(piece, max_size=8), cuts=st.lists(st.integers(0, 10 ** 6), max_size=12))
def test_decoder_matches_a_plain_reading_whatever_the_pieces(pieces: list[bytes],
                                                              cuts: list[int]) -> None:
    stream = b"".join(pieces)
    want = reference(stream, MAX)
    got, dec = decode(split(stream, cuts), MAX)
    assert got == want
    frames = [f for f in got if isinstance(f, dict)]
    assert all(only_json_types(f) for f in frames)
    if want and want[-1] == "fatal":
        assert dec.buffered == 0
        dec.feed(b"more")  # a broken stream stays broken
        with pytest.raises(ProtocolError) as e:
            list(dec.frames())
        assert e.value.fatal


@settings(max_examples=200, deadline=None)
@given(values=st.lists(json_values, min_size=1, max_size=5),
       cuts=st.lists(st.integers(0, 10 ** 6), max_size=10))
def test_messages_round_trip_in_any_pieces(values: list[Any], cuts: list[int]) -> None:
    stream = b"".join(encode_message(v) for v in values)
    got, _dec = decode(split(stream, cuts), 1 << 20)
    assert got == [{"t": "msg", "d": json.loads(json.dumps(v))} for v in values]


@settings(max_examples=100, deadline=None)
@given(value=json_values)
def test_encoder_limit_is_the_decoder_limit(value: Any) -> None:
    data = encode_message(value)
    size = len(data) - HEADER.size
    assert encode_message(value, max_frame=size) == data
    with pytest.raises(ValueError, match="too large"):
        encode_message(value, max_frame=size - 1)
    got, _dec = decode([data], size)
    assert got == [{"t": "msg", "d": json.loads(json.dumps(value))}]
    assert decode([data], size - 1)[0] == ["fatal"]


def test_unserialisable_messages_name_what_is_wrong() -> None:
    loop: list[Any] = []
    loop.append(loop)
    for bad, why in ((object(), "Object of type object"), ({1, 2}, "type set"),
                     (b"raw", "type bytes"), ({"x": float("nan")}, "Out of range float"),
                     (loop, "Circular reference")):
        with pytest.raises(TypeError) as e:
            encode_message(bad)
        text = str(e.value)
        assert why in text and "allowed: dict" in text and "got " in text, text
    with pytest.raises(TypeError, match="nested too deeply"):
        deep: Any = "x"
        for _ in range(100_000):
            deep = [deep]
        encode({"t": "msg", "d": deep})
