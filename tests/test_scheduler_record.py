"""The scheduler record every reader decodes, sans-IO: any payload a signer may publish is a
scheduler, or is skipped and reported once; nothing raises into the reader."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog import scheduler_record
from catalog.scheduler_record import (
    KIND,
    MAX_ADDR,
    MAX_ADDRS,
    MAX_LOGGED,
    MAX_NAME,
    MAX_REPORTED,
    SchedulerDirectory,
    SchedulerRecord,
    decode,
)
from node.dht_records import InvalidRecordError, Record, make_record, parse_record, peer_id_of
from node.errors import LocalProtocolError
from node.identity import Identity

NOW = 1_800_000_000.0
SIGNER = Identity.generate()
OTHER = Identity.generate()
SIGNER_ID = peer_id_of(SIGNER.public_bytes)
OTHER_ID = peer_id_of(OTHER.public_bytes)
ADDR = f"/ip4/127.0.0.1/tcp/4001/p2p/{SIGNER_ID}"
LOGGER = "vmlend.catalog.scheduler_record"


def signed(
    payload: dict[str, Any], *, by: Identity = SIGNER, kind: str = KIND, at: float = NOW
) -> Record:
    """A correctly signed record, as anyone may publish one."""
    key, value = make_record(by, kind, payload, ttl=60, now=at)
    return parse_record(key, value, now=at)


def good(**changes: Any) -> dict[str, Any]:
    return {"name": "alpha", "peer_id": SIGNER_ID, "addrs": [ADDR], **changes}


def test_a_scheduler_record_round_trips_through_its_signed_record() -> None:
    advert = SchedulerRecord(name="alpha", peer_id=SIGNER_ID, addrs=(ADDR,))
    assert advert.to_payload() == good()
    assert decode(signed(advert.to_payload())) == advert
    assert decode(signed(good(addrs=[]))).addrs == ()


HOSTILE = {
    "empty": {},
    "addrs a string": good(addrs=ADDR),
    "addrs a number": good(addrs=7),
    "addrs a map": good(addrs={"a": ADDR}),
    "an address a number": good(addrs=[7]),
    "an address of another peer": good(addrs=[f"/ip4/10.0.0.1/tcp/1/p2p/{OTHER_ID}"]),
    "an address with no peer": good(addrs=["/ip4/10.0.0.1/tcp/1"]),
    "an address not a multiaddr": good(addrs=[f"http://x/p2p/{SIGNER_ID}"]),
    "an address with a newline": good(addrs=[f"/dns4/a\nb/tcp/1/p2p/{SIGNER_ID}"]),
    "an address too long": good(addrs=["/dns4/" + "a" * MAX_ADDR + f"/p2p/{SIGNER_ID}"]),
    "too many addresses": good(addrs=[ADDR] * (MAX_ADDRS + 1)),
    "names another peer": good(peer_id=OTHER_ID),
    "peer_id not a peer ID": good(peer_id="../../etc"),
    "peer_id bytes": good(peer_id=SIGNER_ID.encode()),
    "name a list": good(name=["a"]),
    "name too long": good(name="n" * (MAX_NAME + 1)),
    "name with an escape": good(name="\x1b[2Jowned"),
    "no name": {"peer_id": SIGNER_ID, "addrs": [ADDR]},
    "an extra key": good(load=1),
}


@pytest.mark.parametrize("payload", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_signed_payload_that_is_not_a_scheduler_record_does_not_decode(
    payload: dict[str, Any],
) -> None:
    with pytest.raises(InvalidRecordError):
        decode(signed(payload))


def test_another_kind_of_record_is_not_a_scheduler_record() -> None:
    with pytest.raises(InvalidRecordError, match="not a scheduler record"):
        decode(signed(good(), kind="worker"))


def test_a_record_naming_another_peer_than_its_signer_is_refused_by_name() -> None:
    with pytest.raises(InvalidRecordError, match=f"names peer {OTHER_ID}, signed by {SIGNER_ID}"):
        decode(signed(good(peer_id=OTHER_ID, addrs=[])))


def test_we_cannot_build_a_record_no_reader_would_accept() -> None:
    with pytest.raises(LocalProtocolError):
        SchedulerRecord(name="alpha", peer_id=SIGNER_ID, addrs=(f"/ip4/1.2.3.4/p2p/{OTHER_ID}",))


def test_a_directory_skips_bad_records_keeps_good_ones_and_reports_each_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    honest = signed(good())
    bad = [signed({}, by=Identity.generate()) for _ in range(3)]
    directory = SchedulerDirectory(network=None)  # type: ignore[arg-type]
    for _ in range(3):  # as a worker re-reads them every few seconds
        found = directory.decode_all([bad[0], honest, *bad[1:]])
        assert [s.peer_id for s in found] == [SIGNER_ID]
    reports = [r for r in caplog.records if r.name == LOGGER]
    assert len(reports) == len(bad)
    assert all(r.levelno == logging.WARNING for r in reports)
    assert {r.args[0] for r in reports} == {b.owner for b in bad}  # type: ignore[index]
    # A republished bad record is a new record: reported again.
    directory.decode_all([signed({}, by=OTHER, at=NOW), signed({}, by=OTHER, at=NOW + 1)])
    assert len([r for r in caplog.records if r.name == LOGGER]) == len(bad) + 2


def test_a_reported_reason_is_cut_to_a_size_and_made_printable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    noisy = {f"\x1b[31m{i:04}" + "k" * 40: 0 for i in range(300)}  # 300 unexpected keys
    SchedulerDirectory(network=None).decode_all([signed({**good(), **noisy})])  # type: ignore[arg-type]
    (report,) = [r for r in caplog.records if r.name == LOGGER]
    text = report.getMessage()
    assert "\x1b" not in text
    assert len(text) < MAX_LOGGED + 200
    assert "blake3" in text


def test_what_a_directory_remembers_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    directory = SchedulerDirectory(network=None)  # type: ignore[arg-type]
    bad = signed({})
    republished = [dataclasses.replace(bad, issued_at=NOW + i) for i in range(MAX_REPORTED + 10)]
    directory.decode_all(republished)
    assert len(directory._reported) <= MAX_REPORTED
    assert len(caplog.records) == len(republished)


payload_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.text(max_size=12)
    | st.binary(max_size=12)
    | st.sampled_from([SIGNER_ID, OTHER_ID, ADDR]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
payloads = st.dictionaries(
    st.sampled_from(["name", "peer_id", "addrs", "load", ""]), payload_values, max_size=4
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(payloads)
def test_any_signed_payload_is_a_scheduler_or_skipped_never_an_exception(
    payload: dict[str, Any],
) -> None:
    directory = SchedulerDirectory(network=None)  # type: ignore[arg-type]
    found = directory.decode_all([signed(payload)])
    assert found == [] or found[0].peer_id == SIGNER_ID


async def test_find_asks_for_scheduler_records_and_decodes_them() -> None:
    asked: list[str] = []

    class Network:
        async def find_records(self, kind: str, *, timeout: float) -> list[Record]:  # noqa: ASYNC109
            asked.append(kind)
            return [signed({}, by=OTHER), signed(good())]

    found = await SchedulerDirectory(Network()).find(timeout=1.0)
    assert asked == [scheduler_record.KIND]
    assert [s.name for s in found] == ["alpha"]
