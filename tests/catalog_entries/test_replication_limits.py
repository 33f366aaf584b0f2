"""What one catalog-sync peer can make a puller hold, sans-IO: IDs per bucket, per reply and
wanted per pull are bounded, and a gap larger than one pull is closed by the next pulls."""

from __future__ import annotations

import pytest

from catalog.entries import TrustPolicy
from catalog.replication import (
    MAX_WANTED_PER_SESSION,
    IdIndex,
    PullSession,
    WantEntries,
    respond,
)
from catalog.replication_messages import (
    BUCKETS,
    MAX_IDS_PER_BUCKET,
    MAX_IDS_PER_REPLY,
    REPLIES,
    REQUESTS,
    BucketIds,
    Entries,
    Ids,
    IdsRequest,
    MisbehavingPeerError,
    Reply,
    Request,
    Summary,
    SummaryRequest,
    decode_reply,
    decode_request,
)
from tests.catalog_entries.helpers import PUBLISHER
from tests.catalog_entries.test_replication import POOL, Side, wire

POLICY = TrustPolicy({PUBLISHER.public_bytes})


def fake_ids(bucket: int, count: int = MAX_IDS_PER_BUCKET, start: int = 0) -> tuple[bytes, ...]:
    return tuple(bytes([bucket]) + i.to_bytes(31, "big") for i in range(start, start + count))


class Lister:
    """A hostile server: every bucket differs, each lists as many IDs as a reply may carry (a
    million in all over the 256 buckets), and it never sends one entry."""

    def __init__(self) -> None:
        self.ids_requests = 0
        self.asked = 0

    def serve(self, request: Request) -> Reply:
        request = decode_request(wire(REQUESTS.encode(request)))
        answer: Reply
        if isinstance(request, SummaryRequest):
            answer = Summary(buckets=(bytes(32),) * BUCKETS)
        elif isinstance(request, IdsRequest):
            self.ids_requests += 1
            listed = request.buckets[: MAX_IDS_PER_REPLY // MAX_IDS_PER_BUCKET]
            answer = Ids(buckets=tuple(BucketIds(bucket=b, ids=fake_ids(b)) for b in listed))
        else:
            self.asked += len(request.ids)
            answer = Entries(entries=())
        return decode_reply(wire(REPLIES.encode(answer)))


def test_a_peer_listing_a_million_ids_makes_a_pull_want_at_most_its_limit() -> None:
    server = Lister()
    session = PullSession(IdIndex(), POLICY)
    request: Request | None = session.start()
    exchanges = 0
    while request is not None:
        exchanges += 1
        assert exchanges <= 2 + MAX_WANTED_PER_SESSION, "the pull does not end"
        request = session.receive(server.serve(request))
        assert session.wanted <= MAX_WANTED_PER_SESSION
    # The first listing filled the want; no other bucket was asked for, every wanted ID was.
    assert server.ids_requests == 1
    assert server.asked == session.wanted == MAX_WANTED_PER_SESSION
    assert session.admitted == []


def test_a_gap_larger_than_one_pull_is_closed_by_the_next_pulls() -> None:
    server = Side(POOL)
    puller = Side([])
    for _ in range(3):
        session, _ = puller.pull(server, max_wanted=40)
        assert len(session.admitted) == 40
    assert set(puller.entries) == set(server.entries)
    assert puller.pull(server, max_wanted=40)[1] == 1  # in sync


@pytest.mark.parametrize(
    "buckets",
    [
        [[3, list(fake_ids(3, MAX_IDS_PER_BUCKET + 1))]],
        [[b, list(fake_ids(b))] for b in range(MAX_IDS_PER_REPLY // MAX_IDS_PER_BUCKET + 1)],
        [[3, list(fake_ids(3, 1))], [3, list(fake_ids(3, 1, start=1))]],
        [[b, []] for b in range(BUCKETS + 1)],
    ],
    ids=["one bucket too long", "reply too long", "a bucket twice", "too many buckets"],
)
def test_a_listing_beyond_the_limits_is_misbehaviour(buckets: list[object]) -> None:
    with pytest.raises(MisbehavingPeerError):
        decode_reply({"type": "ids", "buckets": buckets})


def test_an_honest_server_lists_within_the_limits_a_bucket_it_holds_more_of() -> None:
    crowded = [i.hex() for i in fake_ids(7, MAX_IDS_PER_BUCKET + 100)]
    others = [i.hex() for b in (8, 9, 10, 11) for i in fake_ids(b)]
    index = IdIndex([*crowded, *others])
    answer = respond(IdsRequest(buckets=(7, 8, 9, 10, 11)), index)
    assert not isinstance(answer, WantEntries)
    listed = decode_reply(wire(REPLIES.encode(answer)))
    assert isinstance(listed, Ids)
    full_buckets = MAX_IDS_PER_REPLY // MAX_IDS_PER_BUCKET  # per reply; the rest wait
    assert full_buckets < 5
    assert [b.bucket for b in listed.buckets] == [7, 8, 9, 10, 11][:full_buckets]
    assert [len(b.ids) for b in listed.buckets] == [MAX_IDS_PER_BUCKET] * full_buckets
    lowest = sorted(bytes.fromhex(i) for i in crowded)[:MAX_IDS_PER_BUCKET]
    assert list(listed.buckets[0].ids) == lowest
