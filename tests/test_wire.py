"""node.wire: round trips survive any split of the byte stream; garbage only ever raises
RemoteProtocolError, never hangs, and never makes the decoder allocate what a header claims."""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import (
    HEADER_SIZE,
    FrameDecoder,
    Message,
    WireLimits,
    decode_body,
    encode_body,
    encode_frame,
)

SMALL = WireLimits(max_frame_size=4096, max_depth=4, max_items=16, max_str=64, max_bin=64)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=30),
)
keys = st.one_of(st.text(max_size=10), st.binary(max_size=10))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=5)
    ),
    max_leaves=20,
)
messages = st.builds(
    lambda type_, rest: {**rest, "type": type_},
    st.text(max_size=20),
    st.dictionaries(keys, values, max_size=6),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _drain(decoder: FrameDecoder, chunks: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    return out


def _decode_all(data: bytes, limits: WireLimits = SMALL) -> list[Message]:
    """Feed garbage; return what decodes. Anything but RemoteProtocolError fails the test."""
    decoder = FrameDecoder(limits)
    try:
        return _drain(decoder, [data])
    except RemoteProtocolError:
        # A poisoned decoder stays poisoned: the stream is out of sync for good.
        with pytest.raises(RemoteProtocolError):
            decoder.next_message()
        return []


@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_in_any_split(msgs: list[Message], cuts: list[int]) -> None:
    data = b"".join(encode_frame(m) for m in msgs)
    decoder = FrameDecoder()
    assert _drain(decoder, _split(data, cuts)) == msgs
    assert decoder.at_boundary
    assert decoder.buffered == 0


@given(messages)
def test_round_trip_byte_by_byte(msg: Message) -> None:
    data = encode_frame(msg)
    decoder = FrameDecoder()
    got = _drain(decoder, [data[i : i + 1] for i in range(len(data))])
    assert got == [msg]


@given(st.binary(max_size=2000))
def test_random_bytes_never_crash(data: bytes) -> None:
    for msg in _decode_all(data):
        assert isinstance(msg["type"], str)


@given(st.binary(max_size=300))
def test_random_body_behind_valid_header(body: bytes) -> None:
    for msg in _decode_all(struct.pack(">I", len(body)) + body):
        assert isinstance(msg["type"], str)


@given(messages, st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_corrupted_valid_frames_never_crash(msg: Message, flips: list[tuple[int, int]]) -> None:
    data = bytearray(encode_frame(msg))
    for at, byte in flips:
        data[at % len(data)] = byte
    for got in _decode_all(bytes(data), WireLimits()):
        assert isinstance(got["type"], str)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_truncation_at_every_offset_waits_for_more(msg: Message) -> None:
    data = encode_frame(msg)
    for cut in range(len(data)):
        decoder = FrameDecoder()
        decoder.feed(data[:cut])
        assert decoder.next_message() is None
        assert decoder.at_boundary == (cut == 0)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_truncated_body_with_honest_length_is_rejected(msg: Message) -> None:
    # The header agrees with the cut body, so the decoder must judge the partial msgpack itself.
    body = encode_body(msg)
    for cut in range(1, len(body)):
        with pytest.raises(RemoteProtocolError):
            decode_body(body[:cut])


@pytest.mark.parametrize("length", [SMALL.max_frame_size + 1, 2**31, 2**32 - 1])
def test_huge_length_prefix_is_rejected_at_once(length: int) -> None:
    decoder = FrameDecoder(SMALL)
    decoder.feed(struct.pack(">I", length))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.next_message()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"more")


def test_claimed_length_is_never_allocated() -> None:
    # A length within the limit but never delivered: the decoder holds only what arrived.
    limits = WireLimits(max_frame_size=2**31)
    decoder = FrameDecoder(limits)
    tracemalloc.start()
    try:
        decoder.feed(struct.pack(">I", 2**31 - 1) + b"\x80" * 100)
        assert decoder.next_message() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert decoder.buffered == HEADER_SIZE + 100


def test_zero_length_frame_is_rejected() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError, match="empty"):
        decoder.next_message()


def _frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _nested(depth: int) -> Any:
    obj: Any = {"type": "x"}
    for _ in range(depth):
        obj = [obj]
    return {"type": "deep", "v": obj}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (_frame([1, 2, 3]), "expected a map"),
        (_frame("type"), "expected a map"),
        (_frame(None), "expected a map"),
        (_frame({"kind": "x"}), "type"),
        (_frame({"type": 7}), "type"),
        (_frame({"type": b"bytes"}), "type"),
        (_frame(_nested(SMALL.max_depth)), "deeper"),
        (_frame({"type": "x", "v": msgpack.ExtType(5, b"abc")}), "malformed"),
        # A msgpack timestamp (ext type -1), packed by hand since ExtType refuses negative codes.
        (_raw(b"\x82\xa4type\xa1x\xa1v\xd6\xff" + b"\x00" * 4), "max_ext_len"),
        (_frame({"type": "x", "v": "s" * (SMALL.max_str + 1)}), "malformed"),
        (_frame({"type": "x", "v": b"b" * (SMALL.max_bin + 1)}), "malformed"),
        (_frame({"type": "x", "v": list(range(SMALL.max_items + 1))}), "malformed"),
        (_frame({"type": "x", "v": {str(i): i for i in range(SMALL.max_items + 1)}}), "malformed"),
        (_frame({1: "int key", "type": "x"}), "malformed"),
        (_raw(b"\x81\xa4type\xa1x\xc0"), "malformed"),  # extra data after the map
        (_raw(b"\xc1\xc1\xc1\xc1\xc1"), "malformed"),  # reserved byte
        (_raw(b"\x81\xa4t"), "malformed"),  # truncated inside the body
        (_raw(b"\x81\xa4type\xa2\xff\xfe"), "malformed"),  # invalid UTF-8
    ],
)
def test_bad_frames_are_remote_protocol_errors(body: bytes, match: str) -> None:
    decoder = FrameDecoder(SMALL)
    decoder.feed(body)
    with pytest.raises(RemoteProtocolError, match=match):
        decoder.next_message()


def test_depth_at_the_limit_is_accepted() -> None:
    msg = _nested(SMALL.max_depth - 2)
    decoder = FrameDecoder(SMALL)
    decoder.feed(_frame(msg))
    assert decoder.next_message() == msg


def test_nesting_past_msgpack_stack_is_a_protocol_error() -> None:
    body = b"\x91" * 5000 + b"\xc0"
    decoder = FrameDecoder(WireLimits(max_frame_size=1 << 20))
    decoder.feed(struct.pack(">I", len(body)) + body)
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_encode_refuses_what_the_peer_would_refuse() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame({"no": "type"})
    with pytest.raises(LocalProtocolError):
        encode_frame({"type": "x", "v": object()})
    with pytest.raises(LocalProtocolError):
        encode_frame({"type": "x", "v": "s" * 5000}, SMALL)


def test_good_frame_after_good_frame_then_garbage() -> None:
    decoder = FrameDecoder(SMALL)
    decoder.feed(encode_frame({"type": "a"}) + encode_frame({"type": "b"}) + b"\x00\x00\x00\x00")
    assert decoder.next_message() == {"type": "a"}
    assert decoder.next_message() == {"type": "b"}
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()
