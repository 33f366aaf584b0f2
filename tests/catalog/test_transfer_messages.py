from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.chunking import MAX_CHUNK_SIZE
from catalog.transfer_messages import (
    MAX_POSITIONS,
    MESSAGES,
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
    body = encode_body(MESSAGES.encode(message), WIRE_LIMITS)
    assert MESSAGES.decode(decode_body(body, WIRE_LIMITS)) == message


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
    decoder.feed(encode_frame(MESSAGES.encode(message), WIRE_LIMITS))
    raw = decoder.next_message()
    assert raw is not None
    assert MESSAGES.decode(raw) == message


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
        MESSAGES.decode(raw)


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
        MESSAGES.decode(raw)


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
        MESSAGES.decode(raw)


# What the chunk protocol's frames held before it moved onto node.wire_message (the data channel
# and the benches read them): the same maps, key for key, in the same order.
B1, B3 = b"\x01" * 32, b"\x03" * 32
PINNED_FRAMES: list[tuple[Message, str]] = [
    (
        HaveResponse.build(request_id=2, blob_id=B1, chunk_count=1000, positions=[1, 5, 900]),
        "85a474797065ad686176655f726573706f6e7365aa726571756573745f696402a7626c6f625f6964c420"
        + "01" * 32
        + "ab6368756e6b5f636f756e74cd03e8a9706f736974696f6e73930105cd0384",
    ),
    (
        HaveResponse.build(request_id=2, blob_id=B1, chunk_count=100, positions=range(50)),
        "85a474797065ad686176655f726573706f6e7365aa726571756573745f696402a7626c6f625f6964c420"
        + "01" * 32
        + "ab6368756e6b5f636f756e7464a66269746d6170c40dffffffffffff03000000000000",
    ),
    (
        ChunkResponse(request_id=0, chunk_id=B3, data=b"x" * 100),
        "84a474797065ae6368756e6b5f726573706f6e7365aa726571756573745f696400a86368756e6b5f6964c420"
        + "03" * 32
        + "a464617461c464"
        + "78" * 100,
    ),
    (
        ChunkRequest(request_id=2**63 - 1, chunk_id=B3),
        "83a474797065ad6368756e6b5f72657175657374aa726571756573745f6964cf7fffffffffffffff"
        + "a86368756e6b5f6964c420"
        + "03" * 32,
    ),
    (
        ErrorResponse(request_id=6, code=ErrorCode.NOT_FOUND),
        "84a474797065a56572726f72aa726571756573745f696406a4636f6465a96e6f745f666f756e64"
        + "a76d657373616765a0",
    ),
    (CancelRequest(request_id=5), "82a474797065a663616e63656caa726571756573745f696405"),
]


@pytest.mark.parametrize(("message", "frame"), PINNED_FRAMES)
def test_the_wire_format_is_byte_identical_to_before(message: Message, frame: str) -> None:
    assert msgpack.packb(MESSAGES.encode(message), use_bin_type=True).hex() == frame
    assert MESSAGES.decode(msgpack.unpackb(bytes.fromhex(frame), raw=False)) == message
