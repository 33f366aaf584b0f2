from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.chunking import MAX_CHUNK_SIZE
from catalog.transfer_messages import (
    MAX_POSITIONS,
    WIRE_LIMITS,
    CancelRequest,
    ChunkRequest,
    ChunkResponse,
    ErrorCode,
    ErrorResponse,
    HaveRequest,
    HaveResponse,
    ManifestRequest,
    ManifestResponse,
    Message,
    decode_message,
    to_dict,
)
from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import FrameDecoder, decode_body, encode_body, encode_frame

ids = st.binary(min_size=32, max_size=32)
rid = st.integers(0, 2**63 - 1)


@st.composite
def have_responses(draw: st.DrawFn) -> HaveResponse:
    count = draw(st.integers(0, 5000))
    held = draw(st.sets(st.integers(0, max(count - 1, 0)), max_size=300)) if count else set()
    return HaveResponse.build(
        request_id=draw(rid), blob_id=draw(ids), chunk_count=count, positions=held
    )


messages = st.one_of(
    st.builds(HaveRequest, request_id=rid, blob_id=ids),
    have_responses(),
    st.builds(ManifestRequest, request_id=rid, blob_id=ids),
    st.builds(ManifestResponse, request_id=rid, blob_id=ids, manifest=st.binary(min_size=1)),
    st.builds(ChunkRequest, request_id=rid, chunk_id=ids),
    st.builds(ChunkResponse, request_id=rid, chunk_id=ids, data=st.binary(min_size=1)),
    st.builds(CancelRequest, request_id=rid),
    st.builds(
        ErrorResponse,
        request_id=rid,
        code=st.sampled_from(ErrorCode),
        message=st.text(max_size=100),
    ),
)


@settings(derandomize=True, deadline=None)  # same examples every run, no timing
@given(messages)
def test_roundtrip_through_wire_frames(message: Message) -> None:
    body = encode_body(to_dict(message), WIRE_LIMITS)
    assert decode_message(decode_body(body, WIRE_LIMITS)) == message


@settings(derandomize=True, deadline=None)  # same examples every run, no timing
@given(have_responses())
def test_have_response_encodings_agree(message: HaveResponse) -> None:
    again = HaveResponse.build(
        request_id=0,
        blob_id=message.blob_id,
        chunk_count=message.chunk_count,
        positions=message.held(),
    )
    assert again.held() == message.held()
    if message.positions is not None:
        assert len(message.positions) <= MAX_POSITIONS


def test_a_max_size_chunk_fits_one_frame() -> None:
    message = ChunkResponse(request_id=1, chunk_id=b"x" * 32, data=b"\xab" * MAX_CHUNK_SIZE)
    decoder = FrameDecoder(WIRE_LIMITS)
    decoder.feed(encode_frame(to_dict(message), WIRE_LIMITS))
    raw = decoder.next_message()
    assert raw is not None
    assert decode_message(raw) == message


def test_oversized_chunk_is_refused_both_ways() -> None:
    with pytest.raises(LocalProtocolError):
        ChunkResponse(request_id=1, chunk_id=b"x" * 32, data=b"a" * (MAX_CHUNK_SIZE + 1))
    raw = {
        "type": "chunk_response",
        "request_id": 1,
        "chunk_id": b"x" * 32,
        "data": b"a" * (MAX_CHUNK_SIZE + 1),
    }
    with pytest.raises(RemoteProtocolError):
        decode_message(raw)


GOOD: dict[str, Any] = {"type": "chunk_request", "request_id": 7, "chunk_id": b"c" * 32}


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "nope"},
        {"request_id": 1},
        {**GOOD, "extra": 1},
        {k: v for k, v in GOOD.items() if k != "chunk_id"},
        {**GOOD, "chunk_id": b"short"},
        {**GOOD, "chunk_id": "c" * 32},
        {**GOOD, "request_id": -1},
        {**GOOD, "request_id": True},
        {**GOOD, "request_id": 2**64},
        {"type": "chunk_response", "request_id": 1, "chunk_id": b"c" * 32, "data": b""},
        {"type": "error", "request_id": 1, "code": "teapot", "message": ""},
        {"type": "error", "request_id": 1, "code": "busy", "message": "x" * 10_000},
        {"type": "have_response", "request_id": 1, "blob_id": b"b" * 32, "chunk_count": 3},
        {
            "type": "have_response",
            "request_id": 1,
            "blob_id": b"b" * 32,
            "chunk_count": 3,
            "bitmap": b"\x08",
        },  # bit 3 set past chunk_count
        {
            "type": "have_response",
            "request_id": 1,
            "blob_id": b"b" * 32,
            "chunk_count": 3,
            "bitmap": b"\x01\x00",
        },  # wrong length
        {
            "type": "have_response",
            "request_id": 1,
            "blob_id": b"b" * 32,
            "chunk_count": 3,
            "positions": [2, 1],
        },  # not sorted
        {
            "type": "have_response",
            "request_id": 1,
            "blob_id": b"b" * 32,
            "chunk_count": 3,
            "positions": [3],
        },  # out of range
        {
            "type": "have_response",
            "request_id": 1,
            "blob_id": b"b" * 32,
            "chunk_count": 3,
            "positions": [0],
            "bitmap": b"\x01",
        },  # both
        {
            "type": "have_response",
            "request_id": 1,
            "blob_id": b"b" * 32,
            "chunk_count": 3,
            "positions": {"a": 1},
        },
    ],
)
def test_malformed_messages_are_remote_protocol_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(raw)


@settings(derandomize=True, deadline=None)  # same examples every run, no timing
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "type",
                "request_id",
                "chunk_id",
                "data",
                "code",
                "positions",
                "bitmap",
                "blob_id",
                "chunk_count",
            ]
        ),
        st.one_of(
            st.none(),
            st.integers(),
            st.binary(max_size=40),
            st.text(max_size=20),
            st.lists(st.integers(), max_size=4),
        ),
    )
)
def test_garbage_never_escapes_as_anything_but_remote_protocol_error(raw: dict[str, Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message(raw)
