"""Dispatch messages: every type round-trips through a wire frame; garbage is a typed error."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.caps import Caps, NetworkMode
from catalog.dispatch import (
    WIRE_LIMITS,
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    LeaseKey,
    Lost,
    Message,
    NoWork,
    Offer,
    ResultAck,
    ResultReport,
    ResultStatus,
    Stop,
    WorkRequest,
    decode_message,
    to_dict,
)
from node.errors import LocalProtocolError, RemoteProtocolError
from node.wire import FrameDecoder, encode_frame
from tests.scheduler.conftest import image, offer, report

DETERMINISTIC = settings(derandomize=True, deadline=None)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True)
leases = st.builds(LeaseKey, ids, st.integers(0, 15), st.integers(1, 2**31 - 1))
lease_tuples = st.lists(leases, max_size=5, unique=True).map(tuple)
blobs = st.binary(min_size=32, max_size=32)
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


def through_the_wire(message: Message) -> Message:
    decoder = FrameDecoder(WIRE_LIMITS)
    decoder.feed(encode_frame(to_dict(message), WIRE_LIMITS))
    raw = decoder.next_message()
    assert raw is not None
    return decode_message(raw)


@DETERMINISTIC
@given(messages)
def test_round_trip(message: Message) -> None:
    assert through_the_wire(message) == message


def test_result_digest_and_signed_bytes_ignore_the_signature() -> None:
    a = report(LeaseKey("t", 0, 1))
    b = dataclasses.replace(a, signature=b"x" * 64)
    assert a.signed_bytes() == b.signed_bytes()
    assert a.digest == b.digest
    assert report(LeaseKey("t", 0, 1), stdout="other").digest != a.digest


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "nope"},
        {"type": "no_work", "retry_after": 1.0},
        {"type": "no_work", "retry_after": 1.0, "reason": "", "extra": 1},
        {"type": "no_work", "retry_after": -1.0, "reason": ""},
        {"type": "no_work", "retry_after": float("nan"), "reason": ""},
        {"type": "no_work", "retry_after": True, "reason": ""},
        {"type": "lost", "leases": [["t", 0, 0]]},
        {"type": "lost", "leases": [["t", 99, 1]]},
        {"type": "lost", "leases": [["bad id!", 0, 1]]},
        {"type": "lost", "leases": [["t", 0]]},
        {"type": "lost", "leases": "t"},
        {"type": "heartbeat", "leases": [], "running": [["t", 0, 1]]},
        {"type": "result_ack", "lease": ["t", 0, 1], "status": "maybe"},
        {"type": "work_request", "offer": {"room": {}, "capacity": {}, "images": []}},
        {"type": "work_request", "offer": []},
        {"type": "lease_grant", "lease": ["t", 0, 1], "image_id": b"short", "caps": {},
         "lease_timeout": 1, "max_runtime": 1},
    ],
)  # fmt: skip
def test_malformed_messages_are_remote_protocol_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(raw)


def test_bad_caps_in_an_offer_are_refused() -> None:
    good = to_dict(WorkRequest(offer=offer(images=(image(1),))))
    good["offer"]["room"]["cpu_share"] = 5.0  # more than its 2 vCPUs: Caps refuses
    with pytest.raises(RemoteProtocolError, match="cpu_share"):
        decode_message(good)


def test_building_a_bad_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        NoWork(retry_after=0)
    with pytest.raises(LocalProtocolError):
        Heartbeat(leases=(), running=(LeaseKey("t", 0, 1),))


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
junk = st.recursive(
    scalars | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KINDS = ["work_request", "lease_grant", "no_work", "heartbeat", "heartbeat_ack", "stop", "lost"]
KINDS += ["result", "result_ack"]


@DETERMINISTIC
@given(st.sampled_from(KINDS), st.dictionaries(st.text(max_size=14), junk, max_size=8))
def test_garbage_is_only_ever_a_remote_protocol_error(kind: str, body: dict[str, Any]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode_message({**body, "type": kind})


@DETERMINISTIC
@given(messages, st.data())
def test_a_mangled_field_is_a_remote_protocol_error(message: Message, data: st.DataObject) -> None:
    raw = to_dict(message)
    keys = sorted(k for k in raw if k != "type")
    if not keys:
        return
    key = data.draw(st.sampled_from(keys))
    raw[key] = data.draw(junk)
    with contextlib.suppress(RemoteProtocolError):
        decode_message(raw)
