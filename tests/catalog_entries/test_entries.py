"""Signed entries, sans-IO: canonical bytes, IDs, signatures, kind rules and trust."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.entries import (
    DOMAIN,
    MAX_BODY_SIZE,
    Entry,
    TrustPolicy,
    check_signature,
    decode_body,
    decode_entry,
    make_entry,
)
from catalog.errors import EntrySignatureError, InvalidEntryError, UntrustedPublisherError
from tests.catalog_entries.helpers import (
    NOW,
    OTHER_PUBLISHER,
    PUBLISHER,
    blob,
    os_entry,
    tampered,
)

meta_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Free-form meta; the keys whose shape the kind rules check ("packages", "image_id") are left out.
metas = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in ("packages", "image_id")), meta_values, max_size=6
)
names = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,20}", fullmatch=True)
versions = st.from_regex(r"[A-Za-z0-9.+~:_-]{1,20}", fullmatch=True)
hex_ids = st.binary(min_size=32, max_size=32).map(bytes.hex)

ROOT = Path(__file__).resolve().parents[2]


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    kind = draw(st.sampled_from(["os", "package", "image", "task"]))
    required = {"os": ["kernel", "initrd", "root"], "package": ["layer"], "image": ["manifest"]}
    blobs = {role: draw(hex_ids) for role in required.get(kind, [])}
    blobs.update(
        draw(
            st.dictionaries(
                st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), hex_ids, max_size=3
            )
        )
    )
    return make_entry(
        PUBLISHER,
        kind=kind,
        name=draw(names),
        version=draw(versions),
        blobs=blobs,
        meta=draw(metas),
        now=draw(st.integers(0, 2**40)),
    )


SETTINGS = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(entries())
def test_encoding_round_trips_byte_for_byte_and_the_signature_verifies(entry: Entry) -> None:
    data = entry.encode()
    again = decode_entry(data)
    assert again == entry
    assert again.encode() == data
    assert again.body == entry.body
    assert again.id == entry.id
    check_signature(again)
    TrustPolicy({PUBLISHER.public_bytes}).admit(again)


def _changes(entry: Entry) -> list[dict[str, Any]]:
    return [
        {"name": entry.name + "x"},
        {"version": entry.version + "1"},
        {"created_at": entry.created_at + 1},
        {"publisher": OTHER_PUBLISHER.public_bytes},
        {"meta": {**entry.meta, "extra": 1}},
        {"blobs": {**entry.blobs, "extra": blob("extra")}},
        {"kind": "task" if entry.kind != "task" else "image", "blobs": {"manifest": blob("m")}},
    ]


@SETTINGS
@given(entries(), st.data())
def test_any_field_change_changes_the_id_and_breaks_the_signature(
    entry: Entry, data: st.DataObject
) -> None:
    change = data.draw(st.sampled_from(_changes(entry)))
    forged = tampered(entry, **change)
    assert forged.id != entry.id
    with pytest.raises(EntrySignatureError):
        check_signature(forged)
    with pytest.raises(EntrySignatureError):
        TrustPolicy({PUBLISHER.public_bytes, OTHER_PUBLISHER.public_bytes}).admit(forged)


@SETTINGS
@given(entries(), st.integers(0, 63), st.integers(1, 255))
def test_a_flipped_signature_bit_is_refused_and_keeps_the_id(
    entry: Entry, at: int, xor: int
) -> None:
    sig = bytearray(entry.signature)
    sig[at] ^= xor
    forged = tampered(entry, signature=bytes(sig))
    assert forged.id == entry.id  # the ID names the content, not the signature
    with pytest.raises(EntrySignatureError, match="does not verify"):
        TrustPolicy({PUBLISHER.public_bytes}).admit(decode_entry(forged.encode()))


@SETTINGS
@given(entries(), st.data())
def test_a_flipped_byte_anywhere_in_the_encoding_never_passes_as_the_same_entry(
    entry: Entry, data: st.DataObject
) -> None:
    raw = bytearray(entry.encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    try:
        decoded = decode_entry(bytes(raw))
    except InvalidEntryError:
        return
    with pytest.raises(EntrySignatureError):
        TrustPolicy({PUBLISHER.public_bytes}).admit(decoded)


def test_the_body_is_sorted_msgpack_and_the_id_is_blake3_of_it() -> None:
    import blake3

    entry = os_entry(meta={"z": 1, "a": {"y": [1, 2], "b": None}})
    body = msgpack.unpackb(entry.body, raw=False)
    assert list(body) == sorted(body)
    assert list(body["meta"]) == ["a", "z"]
    assert list(body["meta"]["a"]) == ["b", "y"]
    assert entry.id == blake3.blake3(entry.body).hexdigest()
    assert PUBLISHER.private_key.public_key().verify(entry.signature, DOMAIN + entry.body) is None


def test_a_non_canonical_encoding_of_the_same_fields_is_refused() -> None:
    entry = os_entry()
    fields = msgpack.unpackb(entry.body, raw=False)
    unsorted = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    with pytest.raises(InvalidEntryError, match="canonical"):
        decode_body(unsorted, entry.signature)
    outer = msgpack.packb([entry.body, entry.signature, b""], use_bin_type=True)
    with pytest.raises(InvalidEntryError, match="array"):
        decode_entry(outer)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "vm"}, "unknown entry kind"),
        ({"name": "Tiny"}, "bad entry name"),
        ({"name": ""}, "bad entry name"),
        ({"version": "1 0"}, "bad version"),
        ({"created_at": 1.5}, "created_at"),
        ({"publisher": b"short"}, "publisher"),
        ({"blobs": {"kernel": "XYZ"}}, "64 lowercase hex"),
        ({"meta": {"ratio": 0.5}}, "float"),
        ({"meta": {"deep": [[[[[[[[[1]]]]]]]]]}}, "deeper"),
        ({"meta": {1: "x"}}, "keys must be strings"),
        ({"meta": {"big": b"x" * MAX_BODY_SIZE}}, "bytes >"),
    ],
)
def test_bad_fields_are_refused_with_a_reason(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidEntryError, match=message):
        tampered(os_entry(), **change)


def test_kind_rules_require_each_kinds_blobs_and_meta_shapes() -> None:
    with pytest.raises(InvalidEntryError, match="lacks blob"):
        make_entry(
            PUBLISHER, kind="os", name="x", version="1", blobs={"kernel": blob("k")}, now=NOW
        )
    with pytest.raises(InvalidEntryError, match="layer"):
        make_entry(PUBLISHER, kind="package", name="x", version="1", blobs={}, now=NOW)

    layer = {"layer": blob("l")}
    with pytest.raises(InvalidEntryError, match=r"meta\.packages"):
        make_entry(
            PUBLISHER, kind="package", name="x", version="1", blobs=layer,
            meta={"packages": ["not", "a", "map"]}, now=NOW,
        )  # fmt: skip
    with pytest.raises(InvalidEntryError, match=r"meta\.image_id"):
        make_entry(
            PUBLISHER, kind="image", name="x", version="1", blobs={"manifest": blob("m")},
            meta={"image_id": "xyz"}, now=NOW,
        )  # fmt: skip


def test_kind_rules_hold_without_the_image_builder_imported() -> None:
    # A node that never imports catalog.build (a worker) must refuse what a scheduler refuses.
    code = (
        "import sys; from catalog.entries import make_entry; from node.identity import Identity\n"
        "from catalog.errors import InvalidEntryError\n"
        "try:\n"
        "    make_entry(Identity.generate(), kind='image', name='x', version='1',\n"
        "               blobs={'manifest': 'a' * 64}, meta={'image_id': 'xyz'}, now=1)\n"
        "except InvalidEntryError:\n"
        "    assert 'catalog.build' not in sys.modules; print('refused')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "refused"


def test_trust_policy_refuses_an_untrusted_publisher_with_the_reason() -> None:
    entry = os_entry(identity=OTHER_PUBLISHER)
    with pytest.raises(UntrustedPublisherError) as caught:
        TrustPolicy({PUBLISHER.public_bytes}).admit(entry)
    assert str(caught.value) == (
        f"publisher {OTHER_PUBLISHER.public_bytes.hex()} is not trusted by this scheduler"
    )
    TrustPolicy({OTHER_PUBLISHER.public_bytes}).admit(entry)


def test_a_signed_entry_is_immune_to_later_changes_of_the_callers_dicts() -> None:
    meta: dict[str, Any] = {"arch": "x86_64"}
    entry = os_entry(meta=meta)
    meta["arch"] = "arm64"
    assert entry.meta == {"arch": "x86_64"}
    check_signature(entry)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.binary(max_size=300)
    | st.builds(lambda e, cut: e.encode()[:cut], entries(), st.integers(0, 400))
)
def test_decoding_arbitrary_bytes_gives_an_entry_or_invalid_entry_error(data: bytes) -> None:
    try:
        entry = decode_entry(data)
    except InvalidEntryError:
        return
    assert entry.encode() == data
