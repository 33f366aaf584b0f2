"""Dispatch messages: every type round-trips through a wire frame under its request ID; garbage
and a bad field in any type are typed errors; what a worker signs is pinned byte for byte."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.caps import Caps, NetworkMode
from catalog.dispatch import (
    LOGS,
    LOGS_WIRE_LIMITS,
    MAX_REQUEST_ID,
    REPLIES,
    REQUESTS,
    WIRE_LIMITS,
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    LeaseKey,
    LogChunk,
    Lost,
    Message,
    NoWork,
    Offer,
    ResultAck,
    ResultReport,
    ResultStatus,
    Stop,
    WorkRequest,
    decode_reply,
    decode_request,
    encode_answer,
    encode_request,
    encode_stop,
    result_digest,
    signed_result_bytes,
)
from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import FrameDecoder, WireLimits, encode_frame
from tests.scheduler.conftest import image, offer, report

DETERMINISTIC = settings(derandomize=True, deadline=None)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True)
leases = st.builds(LeaseKey, ids, st.integers(0, 15), st.integers(1, 2**31 - 1))
lease_tuples = st.lists(leases, max_size=5, unique=True).map(tuple)
blobs = st.binary(min_size=32, max_size=32)
request_ids = st.integers(0, MAX_REQUEST_ID)
caps = st.builds(
    Caps,
    vcpus=st.integers(1, 8),
    cpu_share=st.sampled_from([0.25, 0.5, 1.0]),
    memory_mib=st.integers(32, 65536),
    disk_mib=st.integers(1, 10**6),
    disk_bps=st.integers(0, 10**9),
    network=st.sampled_from(NetworkMode),
    net_allow=st.lists(st.sampled_from(["example.org:443", "10.0.0.0/8"]), max_size=2).map(tuple),
)
seconds = st.floats(0.001, 3600, allow_nan=False)


def heartbeats() -> st.SearchStrategy[Heartbeat]:
    return lease_tuples.flatmap(
        lambda ls: st.builds(
            Heartbeat,
            leases=st.just(ls),
            running=st.sets(st.sampled_from(ls) if ls else st.nothing()).map(tuple),
        )
    )


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(WorkRequest, offer=st.builds(
        lambda c, i: Offer(room=c, capacity=c, images=frozenset(i)),
        caps, st.lists(blobs, max_size=3),
    )),
    st.builds(LeaseGrant, lease=leases, image_id=blobs, caps=caps, lease_timeout=seconds,
              max_runtime=seconds),
    st.builds(NoWork, retry_after=seconds, reason=st.text(max_size=50)),
    heartbeats(),
    st.builds(HeartbeatAck, stop=lease_tuples),
    st.builds(Stop, leases=lease_tuples, reason=st.text(max_size=50)),
    st.builds(Lost, leases=lease_tuples),
    st.builds(
        ResultReport, lease=leases, exit_code=st.integers(-(2**31), 2**31 - 1),
        stdout_digest=blobs, stderr_digest=blobs, stdout_blob=blobs, stderr_blob=blobs,
        archive_blob=st.none() | blobs, signature=st.binary(min_size=64, max_size=64),
    ),
    st.builds(ResultAck, lease=leases, status=st.sampled_from(ResultStatus)),
)  # fmt: skip


def framed(raw: dict[str, Any], limits: WireLimits = WIRE_LIMITS) -> dict[str, Any]:
    decoder = FrameDecoder(limits)
    decoder.feed(encode_frame(raw, limits))
    out = decoder.next_message()
    assert out is not None
    return out


def encode(request_id: int, message: Message) -> dict[str, Any]:
    """The frame map ``message`` travels as (a pushed Stop has no request ID)."""
    if isinstance(message, Stop):
        return encode_stop(message)
    if isinstance(message, WorkRequest | Heartbeat | ResultReport | Lost):
        return encode_request(request_id, message)
    return encode_answer(request_id, message)


def decode(raw: dict[str, Any]) -> tuple[int | None, Message]:
    """Whichever way ``raw`` travels: a request, an answer with its ID, or a pushed Stop."""
    if raw.get("type") in {"work_request", "heartbeat", "result", "lost"}:
        return decode_request(raw)
    reply = decode_reply(raw)
    return (None, reply) if isinstance(reply, Stop) else reply


@DETERMINISTIC
@given(messages, request_ids)
def test_round_trip(message: Message, request_id: int) -> None:
    expected = None if isinstance(message, Stop) else request_id
    assert decode(framed(encode(request_id, message))) == (expected, message)


def test_log_chunks_round_trip() -> None:
    chunk = LogChunk(lease=LeaseKey("t", 1, 2), stream="stderr", data=b"\x00" * 65536)
    assert LOGS.decode(framed(LOGS.encode(chunk), LOGS_WIRE_LIMITS)) == chunk


# ---- what a worker signs, and what results agree on, are pinned -------------------------------

PINNED_LEASE = LeaseKey("task-42.a:b", 3, 7)
PINNED_FIELDS: dict[str, Any] = {
    "lease": PINNED_LEASE,
    "exit_code": -3,
    "stdout_digest": b"\x01" * 32,
    "stderr_digest": b"\x02" * 32,
    "stdout_blob": b"\x03" * 32,
    "stderr_blob": b"\x04" * 32,
}
# The bytes the code before the typed message layer signed for this report (msgpack, in order:
# an array of 8, the context, the lease as [task, replica, attempt], the exit code, the four
# 32-byte digests and blobs, then the archive blob or nil).
SIGNED_PREFIX = (
    "98"
    "b0" + b"vmlend result v1".hex() + "93ab" + b"task-42.a:b".hex() + "0307"
    "fd"
    "c420" + "01" * 32 + "c420" + "02" * 32 + "c420" + "03" * 32 + "c420" + "04" * 32
)


def test_signed_result_bytes_are_byte_identical_to_the_format_workers_already_sign() -> None:
    with_archive = signed_result_bytes(**PINNED_FIELDS, archive_blob=b"\x05" * 32)
    without = signed_result_bytes(**PINNED_FIELDS, archive_blob=None)
    assert with_archive.hex() == SIGNED_PREFIX + "c420" + "05" * 32
    assert without.hex() == SIGNED_PREFIX + "c0"
    signed = ResultReport(**PINNED_FIELDS, archive_blob=b"\x05" * 32, signature=bytes(64))
    assert signed.signed_bytes() == with_archive
    unarchived = ResultReport(**PINNED_FIELDS, signature=bytes(64))
    assert unarchived.signed_bytes() == without


def test_result_digests_are_pinned() -> None:
    assert result_digest(-3, b"\x01" * 32, b"\x05" * 32).hex() == (
        "418fd5055eaa33b90243a9603ba37c9517c2195b04ea953a4199a29ce0762213"
    )
    assert result_digest(0, b"\x01" * 32, None).hex() == (
        "088ebe877f72666736c4a9d78b7c9e4ea6eb845b1ad863963898efce90e4b24e"
    )


def test_result_digest_and_signed_bytes_ignore_the_signature() -> None:
    a = report(LeaseKey("t", 0, 1))
    b = dataclasses.replace(a, signature=b"x" * 64)
    assert a.signed_bytes() == b.signed_bytes()
    assert a.digest == b.digest
    assert report(LeaseKey("t", 0, 1), stdout="other").digest != a.digest


def test_a_report_without_an_archive_travels_without_the_key() -> None:
    raw = encode_request(1, report(LeaseKey("t", 0, 1)))
    assert "archive_blob" not in raw
    assert decode_request(raw)[1].archive_blob is None  # type: ignore[union-attr]


# ---- request IDs --------------------------------------------------------------------------------

NO_WORK = encode_answer(5, NoWork(retry_after=1.0))
LOST = encode_request(5, Lost(leases=()))


@pytest.mark.parametrize("request_id", [-1, MAX_REQUEST_ID + 1, True, 1.0, "5", None, [5]])
def test_a_bad_request_id_is_refused_both_ways(request_id: object) -> None:
    with pytest.raises(RemoteProtocolError, match="request_id"):
        decode_request({**LOST, "request_id": request_id})
    with pytest.raises(RemoteProtocolError, match="request_id"):
        decode_reply({**NO_WORK, "request_id": request_id})
    with pytest.raises(LocalProtocolError, match="request_id"):
        encode_request(request_id, Lost(leases=()))  # type: ignore[arg-type]


def test_requests_and_answers_need_an_id_and_a_pushed_stop_has_none() -> None:
    with pytest.raises(RemoteProtocolError, match="no request_id"):
        decode_request({k: v for k, v in LOST.items() if k != "request_id"})
    with pytest.raises(RemoteProtocolError, match="no request_id"):
        decode_reply({k: v for k, v in NO_WORK.items() if k != "request_id"})
    stop = encode_stop(Stop(leases=()))
    assert "request_id" not in stop
    with pytest.raises(RemoteProtocolError, match="has no request_id"):
        decode_reply({**stop, "request_id": 1})
    with pytest.raises(LocalProtocolError):
        encode_answer(1, Stop(leases=()))  # type: ignore[arg-type]


def test_each_side_refuses_the_others_messages() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type 'no_work'"):
        decode_request(NO_WORK)
    with pytest.raises(RemoteProtocolError, match="unknown message type 'stop'"):
        decode_request(encode_stop(Stop(leases=())))
    with pytest.raises(RemoteProtocolError, match="unknown message type 'lost'"):
        decode_reply(LOST)
    with pytest.raises(LocalProtocolError):
        REQUESTS.encode(NoWork(retry_after=1.0))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        REPLIES.encode(Lost(leases=()))  # type: ignore[arg-type]


# ---- a bad field in each type -------------------------------------------------------------------

LEASE = ["t", 0, 1]
ID = b"\x07" * 32
GOOD_CAPS = Caps(memory_mib=256).to_wire()
GOOD_OFFER = {"room": GOOD_CAPS, "capacity": GOOD_CAPS, "images": [ID]}
GOOD: dict[str, dict[str, Any]] = {
    "work_request": {"offer": GOOD_OFFER},
    "heartbeat": {"leases": [LEASE], "running": [LEASE]},
    "lost": {"leases": [LEASE]},
    "result": {
        "lease": LEASE, "exit_code": 0, "stdout_digest": ID, "stderr_digest": ID,
        "stdout_blob": ID, "stderr_blob": ID, "archive_blob": ID, "signature": bytes(64),
    },
    "lease_grant": {
        "lease": LEASE, "image_id": ID, "caps": GOOD_CAPS, "lease_timeout": 30, "max_runtime": 60,
    },
    "no_work": {"retry_after": 1.0, "reason": ""},
    "heartbeat_ack": {"stop": [LEASE]},
    "result_ack": {"lease": LEASE, "status": "recorded"},
    "stop": {"leases": [LEASE], "reason": "over"},
    "log": {"lease": LEASE, "stream": "stdout", "data": b"out"},
}  # fmt: skip
BAD_FIELDS: list[tuple[str, str, object]] = [
    ("work_request", "offer", {**GOOD_OFFER, "images": [b"short"]}),
    ("work_request", "offer", {**GOOD_OFFER, "room": {**GOOD_CAPS, "cpu_share": 5.0}}),
    ("work_request", "offer", {**GOOD_OFFER, "extra": 1}),
    ("work_request", "offer", []),
    ("heartbeat", "leases", [["t", 0, 0]]),
    ("heartbeat", "running", [["t", 0, 2]]),  # not among the leases
    ("heartbeat", "fetched", [1, 2]),  # two counts for one lease
    ("heartbeat", "fetched", [-1]),
    ("heartbeat", "fetched", [True]),
    ("heartbeat", "fetched", [1 << 41]),
    ("heartbeat", "fetched", 5),
    ("lost", "leases", [["t", 99, 1]]),
    ("lost", "leases", [["bad id!", 0, 1]]),
    ("lost", "leases", [["t", 0]]),
    ("lost", "leases", "t"),
    ("lost", "leases", [LEASE] * 257),
    ("result", "lease", ["t", 0, True]),
    ("result", "exit_code", 2**31),
    ("result", "stdout_digest", b"short"),
    ("result", "archive_blob", "x" * 32),
    ("result", "signature", bytes(63)),
    ("lease_grant", "image_id", b"short"),
    ("lease_grant", "caps", {}),
    ("lease_grant", "lease_timeout", 0),
    ("lease_grant", "max_runtime", float("inf")),
    ("no_work", "retry_after", -1.0),
    ("no_work", "retry_after", float("nan")),
    ("no_work", "retry_after", True),
    ("no_work", "reason", "x" * 513),
    ("heartbeat_ack", "stop", [LEASE, "t"]),
    ("result_ack", "status", "maybe"),
    ("stop", "leases", None),
    ("stop", "reason", 7),
    ("log", "stream", "stdin"),
    ("log", "data", "text"),
    ("log", "lease", {}),
]


def _decode_any(kind: str, body: dict[str, Any]) -> object:
    if kind == "log":
        return LOGS.decode({"type": kind, **body})
    if kind == "stop":
        return decode_reply({"type": kind, **body})
    return decode({"type": kind, "request_id": 1, **body})


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_the_good_example_of_each_type_decodes(kind: str) -> None:
    _decode_any(kind, GOOD[kind])


@pytest.mark.parametrize(("kind", "key", "value"), BAD_FIELDS)
def test_a_bad_field_in_each_type_is_a_remote_protocol_error(
    kind: str, key: str, value: object
) -> None:
    with pytest.raises(RemoteProtocolError):
        _decode_any(kind, {**GOOD[kind], key: value})


@pytest.mark.parametrize("kind", sorted(GOOD))
def test_a_missing_or_an_unexpected_key_in_each_type_is_a_remote_protocol_error(
    kind: str,
) -> None:
    first = next(iter(GOOD[kind]))
    with pytest.raises(RemoteProtocolError, match=first):
        _decode_any(kind, {k: v for k, v in GOOD[kind].items() if k != first})
    with pytest.raises(RemoteProtocolError, match="unexpected"):
        _decode_any(kind, {**GOOD[kind], "extra": 1})


def test_every_message_type_has_bad_field_cases() -> None:
    assert {kind for kind, _, _ in BAD_FIELDS} == set(GOOD)


def test_building_a_bad_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        NoWork(retry_after=0)
    with pytest.raises(LocalProtocolError):
        Heartbeat(leases=(), running=(LeaseKey("t", 0, 1),))
    with pytest.raises(LocalProtocolError):
        WorkRequest(offer=offer(images=(b"short",)))


def test_bad_caps_in_an_offer_are_refused() -> None:
    good = encode_request(1, WorkRequest(offer=offer(images=(image(1),))))
    good["offer"]["room"]["cpu_share"] = 5.0  # more than its 2 vCPUs: Caps refuses
    with pytest.raises(RemoteProtocolError, match="cpu_share"):
        decode_request(good)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
junk = st.recursive(
    scalars | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@DETERMINISTIC
@given(st.sampled_from(sorted(GOOD)), st.dictionaries(st.text(max_size=14), junk, max_size=8))
def test_garbage_is_only_ever_a_remote_protocol_error(kind: str, body: dict[str, Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        _decode_any(kind, body)


@DETERMINISTIC
@given(st.sampled_from(sorted(GOOD)), st.data())
def test_a_mangled_field_is_only_ever_a_remote_protocol_error(
    kind: str, data: st.DataObject
) -> None:
    body = dict(GOOD[kind])
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(junk)
    with contextlib.suppress(RemoteProtocolError):
        _decode_any(kind, body)


@DETERMINISTIC
@given(messages, request_ids, st.data())
def test_a_mangled_field_of_any_message_is_only_ever_a_remote_protocol_error(
    message: Message, request_id: int, data: st.DataObject
) -> None:
    raw = encode(request_id, message)
    key = data.draw(st.sampled_from(sorted(k for k in raw if k != "type")))
    raw[key] = data.draw(junk)
    with contextlib.suppress(RemoteProtocolError):
        decode(raw)
