"""The DHT record validator, sans-IO: forged, tampered, expired, misplaced records are rejected."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.dht_records import (
    MAX_CLOCK_SKEW,
    InvalidRecordError,
    RecordValidator,
    make_record,
    parse_record,
    peer_id_of,
    public_key_of,
    record_key,
)
from node.identity import Identity

ALICE = Identity.generate()
MALLORY = Identity.generate()
NOW = 1_800_000_000.0

payloads = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=20), st.binary(max_size=20)),
    max_size=5,
)


def _fields(value: bytes) -> dict[str, object]:
    obj = msgpack.unpackb(value, raw=False)
    assert isinstance(obj, dict)
    return obj


def _pack(obj: dict[str, object]) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


@given(payload=payloads, ttl=st.floats(1.0, 86_400.0), age=st.floats(0.0, 0.99))
def test_a_signed_record_round_trips_until_it_expires(
    payload: dict[str, object], ttl: float, age: float
) -> None:
    key, value = make_record(ALICE, "scheduler", payload, ttl=ttl, now=NOW)
    assert key == record_key("scheduler", peer_id_of(ALICE.public_bytes))
    record = parse_record(key, value, now=NOW + age * ttl)
    assert record.payload == payload
    assert record.publisher == ALICE.public_bytes
    assert record.key == key
    with pytest.raises(InvalidRecordError, match="expired"):
        parse_record(key, value, now=NOW + ttl)


@given(data=st.data())
def test_flipping_any_byte_is_rejected(data: st.DataObject) -> None:
    key, value = make_record(ALICE, "scheduler", {"name": "s1"}, ttl=60, now=NOW)
    index = data.draw(st.integers(0, len(value) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(value)
    tampered[index] ^= 1 << bit
    with pytest.raises(InvalidRecordError):
        parse_record(key, bytes(tampered), now=NOW)


@given(field=st.sampled_from(["payload", "issued_at", "expires_at", "key", "publisher", "sig"]))
def test_rewriting_a_field_is_rejected(field: str) -> None:
    key, value = make_record(ALICE, "scheduler", {"name": "s1"}, ttl=60, now=NOW)
    obj = _fields(value)
    replacement: dict[str, object] = {
        "payload": _pack({"name": "evil"}),
        "issued_at": NOW + 1,
        "expires_at": NOW + 10_000,
        "key": record_key("scheduler", peer_id_of(MALLORY.public_bytes)),
        "publisher": MALLORY.public_bytes,
        "sig": bytes(64),
    }
    obj[field] = replacement[field]
    with pytest.raises(InvalidRecordError):
        parse_record(key, _pack(obj), now=NOW)


def test_a_record_signed_by_another_key_is_rejected_under_the_owners_key() -> None:
    alice_key, _ = make_record(ALICE, "scheduler", {"name": "a"}, ttl=60, now=NOW)
    _, forged = make_record(MALLORY, "scheduler", {"name": "a"}, ttl=60, now=NOW)
    with pytest.raises(InvalidRecordError):
        parse_record(alice_key, forged, now=NOW)
    obj = _fields(forged)  # Mallory re-signs claiming Alice's key: the owner check still fails
    obj["key"] = alice_key
    with pytest.raises(InvalidRecordError, match="own"):
        parse_record(alice_key, _pack(obj), now=NOW)


def test_a_record_cannot_be_moved_to_another_kind() -> None:
    key, value = make_record(ALICE, "scheduler", {}, ttl=60, now=NOW)
    with pytest.raises(InvalidRecordError):
        parse_record(key.replace("scheduler", "worker"), value, now=NOW)


def test_a_record_from_the_future_is_rejected() -> None:
    key, value = make_record(ALICE, "scheduler", {}, ttl=60, now=NOW + 2 * MAX_CLOCK_SKEW)
    with pytest.raises(InvalidRecordError, match="future"):
        parse_record(key, value, now=NOW)


@given(garbage=st.binary(max_size=300))
@settings(max_examples=300)
def test_garbage_never_validates(garbage: bytes) -> None:
    key = record_key("scheduler", peer_id_of(ALICE.public_bytes))
    with pytest.raises(InvalidRecordError):
        parse_record(key, garbage, now=NOW)


@given(key=st.text(max_size=60))
def test_keys_outside_the_namespace_are_rejected(key: str) -> None:
    _, value = make_record(ALICE, "scheduler", {}, ttl=60, now=NOW)
    if key == record_key("scheduler", peer_id_of(ALICE.public_bytes)):
        return
    with pytest.raises(InvalidRecordError):
        parse_record(key, value, now=NOW)


@given(times=st.lists(st.floats(0, 1000), min_size=1, max_size=6))
def test_select_prefers_the_last_issued_valid_record(times: list[float]) -> None:
    validator = RecordValidator(lambda: NOW + 1000)
    values = [make_record(ALICE, "scheduler", {"t": t}, ttl=3600, now=NOW + t)[1] for t in times]
    key = record_key("scheduler", peer_id_of(ALICE.public_bytes))
    garbage_first = [b"\x00garbage", *values]
    best = validator.select(key, garbage_first)
    assert best != 0
    assert parse_record(key, garbage_first[best], now=NOW + 1000).issued_at == NOW + max(times)
    validator.validate(key, values[0])
    with pytest.raises(InvalidRecordError):
        validator.validate(key, b"\x00garbage")


def test_make_record_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ttl"):
        make_record(ALICE, "scheduler", {}, ttl=0, now=NOW)
    with pytest.raises(ValueError, match="kind"):
        make_record(ALICE, "Bad/Kind", {}, ttl=10, now=NOW)
    with pytest.raises(ValueError, match="exceeds"):
        make_record(ALICE, "scheduler", {"x": b"0" * 20_000}, ttl=10, now=NOW)


@given(st.binary(min_size=32, max_size=32))
def test_public_key_of_inverts_peer_id_of(key: bytes) -> None:
    assert public_key_of(peer_id_of(key)) == key


@pytest.mark.parametrize(
    "bad",
    ["", "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "1" + peer_id_of(b"k" * 32)],
)
def test_public_key_of_refuses_an_id_without_an_ed25519_key(bad: str) -> None:
    with pytest.raises(ValueError, match=r"base58|Ed25519"):
        public_key_of(bad)
