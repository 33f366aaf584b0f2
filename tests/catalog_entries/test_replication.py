"""Anti-entropy, sans-IO: a puller and a server wired back to back through real frames."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog import entries as entries_module
from catalog.entries import Entry, TrustPolicy
from catalog.errors import InvalidEntryError
from catalog.replication import IdIndex, PullSession, WantEntries, entries_reply, respond
from catalog.replication_messages import (
    BUCKETS,
    MAX_ENTRIES_PER_REQUEST,
    REPLIES,
    REQUESTS,
    IdsRequest,
    MisbehavingPeerError,
    Reply,
    Request,
    SummaryRequest,
    decode_reply,
    decode_request,
)
from node.wire import FrameDecoder, Message, encode_frame
from tests.catalog_entries.helpers import OTHER_PUBLISHER, PUBLISHER, package_entry, tampered

POLICY = TrustPolicy({PUBLISHER.public_bytes})
POOL = [package_entry(f"pkg{i}") for i in range(120)]


def wire(msg: Message) -> Message:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(msg))
    out = decoder.next_message()
    assert out is not None
    return out


class Side:
    """One library's worth of state: its entries and their ID index."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = {e.id: e for e in entries}
        self.index = IdIndex(self.entries)

    def serve(self, request: Request) -> Reply:
        answer = respond(decode_request(wire(REQUESTS.encode(request))), self.index)
        if isinstance(answer, WantEntries):
            answer = entries_reply([self.entries[i].encode() for i in answer.ids])
        return decode_reply(wire(REPLIES.encode(answer)))

    def pull(
        self, server: Side, *, skip: set[str] | None = None, **options: Any
    ) -> tuple[PullSession, int]:
        session = PullSession(self.index, POLICY, skip=skip or set(), **options)
        request: Request | None = session.start()
        rounds = 0
        while request is not None:
            rounds += 1
            request = session.receive(server.serve(request))
        for entry in session.admitted:
            self.entries[entry.id] = entry
            self.index.add(entry.id)
        return session, rounds


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.sets(st.integers(0, len(POOL) - 1)), st.sets(st.integers(0, len(POOL) - 1)))
def test_a_pull_makes_the_puller_a_superset_of_the_server(mine: set[int], theirs: set[int]) -> None:
    puller = Side([POOL[i] for i in mine])
    server = Side([POOL[i] for i in theirs])
    session, _ = puller.pull(server)
    assert set(puller.entries) == {POOL[i].id for i in mine | theirs}
    assert {e.id for e in session.admitted} == {POOL[i].id for i in theirs - mine}
    # A second pull finds nothing to do; after pulling the other way both are equal.
    again, _ = puller.pull(server)
    assert again.admitted == []
    server.pull(puller)
    assert server.index.root() == puller.index.root()
    assert puller.pull(server)[1] == 1  # in sync: one round trip


def test_in_sync_is_one_round_trip_and_a_big_gap_is_batched() -> None:
    server = Side(POOL)
    puller = Side([])
    _, rounds = puller.pull(server)
    batches = -(-len(POOL) // MAX_ENTRIES_PER_REQUEST)
    assert rounds == 1 + 1 + batches  # summary, one ids request, the entry batches
    assert len(puller.entries) == len(POOL)
    assert puller.pull(server)[1] == 1


def test_untrusted_entries_are_refused_with_the_reason_and_not_fetched_again() -> None:
    foreign = package_entry("foreign", identity=OTHER_PUBLISHER)
    server = Side([*POOL[:3], foreign])
    puller = Side([])
    session, _ = puller.pull(server)
    assert foreign.id not in puller.entries
    reason = f"publisher {OTHER_PUBLISHER.public_bytes.hex()} is not trusted by this scheduler"
    assert session.refused == {foreign.id: reason}
    again, _ = puller.pull(server, skip=set(session.refused))
    assert again.refused == {}


class Forger(Side):
    """A server that rewrites the entries it sends."""

    def __init__(self, entries: list[Entry], forge: Any) -> None:
        super().__init__(entries)
        self.forge = forge

    def serve(self, request: Request) -> Reply:
        answer = respond(decode_request(wire(REQUESTS.encode(request))), self.index)
        if isinstance(answer, WantEntries):
            answer = entries_reply([self.forge(self.entries[i]).encode() for i in answer.ids])
        return decode_reply(wire(REPLIES.encode(answer)))


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        # Same body (same ID) with a signature that no longer verifies.
        (lambda e: tampered(e, signature=bytes(64)), "forged"),
        # A changed body keeping the old signature: a different ID than the one asked for.
        (lambda e: tampered(e, version="6.6.6"), "not asked for"),
        # A correctly signed entry by someone else, sent in place of the one asked for.
        (lambda e: package_entry(e.name, identity=OTHER_PUBLISHER), "not asked for"),
    ],
)
def test_a_forged_or_tampered_entry_never_enters_and_the_peer_is_misbehaving(
    forge: Any, reason: str
) -> None:
    server = Forger(POOL[:5], forge)
    puller = Side([])
    with pytest.raises(MisbehavingPeerError, match=reason):
        puller.pull(server)
    assert puller.entries == {}


@pytest.mark.parametrize(
    "reply",
    [
        {"type": "summary", "buckets": []},
        {"type": "summary", "buckets": [b"x"] * BUCKETS, "extra": 1},
        {"type": "summary", "buckets": [b"x"] * BUCKETS},
        {"type": "entries", "entries": []},
        {"type": "ids", "buckets": [[1, [b"\x01" * 32]]]},  # before the summary
        {"type": "ids", "buckets": [[0, [b"\x01" * 32]]]},  # an ID outside its bucket
        {"type": "in_sync", "buckets": []},
        {"type": "everything_you_want"},
    ],
)
def test_malformed_or_out_of_order_replies_are_misbehaviour(reply: Message) -> None:
    session = PullSession(IdIndex(), POLICY)
    session.start()
    with pytest.raises(MisbehavingPeerError):
        session.receive(decode_reply(reply))


def test_an_id_listed_under_the_wrong_bucket_is_misbehaviour() -> None:
    session = PullSession(IdIndex(), POLICY)
    session.start()
    other = IdIndex([POOL[0].id])
    summary = respond(SummaryRequest(root=bytes(32)), other)
    assert not isinstance(summary, WantEntries)
    request = session.receive(summary)
    assert isinstance(request, IdsRequest)
    bucket = request.buckets[0]
    wrong = bytes([(bucket + 1) % 256]) + bytes(31)
    with pytest.raises(MisbehavingPeerError, match="not in bucket"):
        session.receive(decode_reply({"type": "ids", "buckets": [[bucket, [wrong]]]}))


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "summary_request"},
        {"type": "summary_request", "root": b"short"},
        {"type": "ids_request", "buckets": []},
        {"type": "ids_request", "buckets": [300]},
        {"type": "ids_request", "buckets": [1, 1]},
        {"type": "entries_request", "ids": [b"short"]},
        {"type": "entries_request", "ids": [bytes(32)] * (MAX_ENTRIES_PER_REQUEST + 1)},
        {"type": "entries_request", "ids": []},
        {"type": "gimme_everything"},
    ],
)
def test_the_server_refuses_malformed_requests(request_: Message) -> None:
    with pytest.raises(MisbehavingPeerError):
        respond(decode_request(request_), IdIndex())


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=40)
    | st.sampled_from([bytes(32), POOL[0].encode(), b"\x01" * 32]),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
TYPES = [
    "summary_request",
    "summary",
    "in_sync",
    "ids_request",
    "ids",
    "entries_request",
    "entries",
]
KEYS = ["root", "buckets", "ids", "entries"]
messages = st.builds(
    lambda t, fields: {**fields, "type": t},
    st.sampled_from(TYPES),
    st.dictionaries(st.sampled_from(KEYS), wire_values, max_size=2),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(messages, min_size=1, max_size=4), st.integers(0, 2))
def test_any_reply_sequence_is_progress_or_misbehaviour_never_a_crash(
    replies: list[Message], warmup: int
) -> None:
    # Bring a real session part-way (0: waiting for the summary, 1: for ids, 2: for entries).
    session = PullSession(IdIndex(), POLICY)
    server = Side(POOL[:3])
    request: Request | None = session.start()
    for _ in range(warmup):
        assert request is not None
        request = session.receive(server.serve(request))
    for reply in replies:
        if session.done:
            break
        try:
            session.receive(decode_reply(reply))
        except MisbehavingPeerError:
            break
    assert all(e.id in {p.id for p in POOL[:3]} for e in session.admitted)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(messages)
def test_any_request_is_answered_or_refused_as_misbehaviour(request_: Message) -> None:
    try:
        answer = respond(decode_request(request_), IdIndex(e.id for e in POOL[:10]))
    except MisbehavingPeerError:
        return
    assert isinstance(answer, WantEntries) or REPLIES.decode(REPLIES.encode(answer)) == answer


def test_an_entry_breaking_only_our_kind_rules_is_refused_not_misbehaviour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = Side(POOL[:2])  # built before our stricter rule exists (another version's rules)

    def strict(entry: Entry) -> None:
        if entry.name == "pkg1":
            raise InvalidEntryError("pkg1 is not allowed here")

    monkeypatch.setitem(entries_module._VALIDATORS, "package", [strict])
    puller = Side([])
    session, _ = puller.pull(server)
    assert set(puller.entries) == {POOL[0].id}
    assert session.refused == {POOL[1].id: "pkg1 is not allowed here"}
