"""Catalog replication between three real schedulers (libp2p on loopback, sqlite on disk).

Each scheduler is a P2PNode + Library + ReplicationService, as the daemon composes them. No test
sleeps: they wait for the library to change (``Library.wait_for``) or for the service's state
(``ReplicationService.wait_until``), under ``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from catalog import scheduler_record
from catalog.entries import Entry, TrustPolicy
from catalog.library import Library
from catalog.replication import (
    MAX_WANTED_PER_SESSION,
    IdIndex,
    WantEntries,
    entries_reply,
    respond,
)
from catalog.replication_messages import (
    BUCKETS,
    MAX_IDS_PER_BUCKET,
    MAX_IDS_PER_REPLY,
    PROTOCOL_ID,
    REPLIES,
    REQUESTS,
    WIRE_LIMITS,
    BucketIds,
    Entries,
    Ids,
    IdsRequest,
    Summary,
    SummaryRequest,
    decode_request,
)
from catalog.replication_service import ReplicationService
from node.identity import Identity
from node.p2p import P2PNode
from node.p2p_stream import MessageStream
from tests.catalog_entries.helpers import (
    NOW,
    OTHER_PUBLISHER,
    PUBLISHER,
    os_entry,
    package_entry,
    tampered,
)
from tests.p2p_helpers import FAST, LOOPBACK

TRUSTED = TrustPolicy({PUBLISHER.public_bytes})
REPLICATE_WITHIN = 10.0  # the bound on loopback


@dataclass
class Scheduler:
    data_dir: Path
    policy: TrustPolicy = TRUSTED
    identity: Identity = field(default_factory=Identity.generate)
    p2p: P2PNode | None = None
    library: Library | None = None
    service: ReplicationService | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event = field(default_factory=trio.Event)
    request_timeout: float = 3.0
    interval: float = 0.3
    max_backoff: float = 5.0

    @property
    def lib(self) -> Library:
        assert self.library is not None
        return self.library

    @property
    def svc(self) -> ReplicationService:
        assert self.service is not None
        return self.service

    async def run(
        self, bootstrap: list[str], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.stopped = trio.Event()
        with trio.CancelScope() as self.scope:
            p2p = P2PNode(self.identity, listen=[LOOPBACK], bootstrap=bootstrap, **FAST)
            async with Library.open(self.data_dir, self.policy) as lib, trio.open_nursery() as n:
                await n.start(p2p.run)
                service = ReplicationService(
                    p2p,
                    lib,
                    interval=self.interval,
                    max_backoff=self.max_backoff,
                    request_timeout=self.request_timeout,
                    discover_interval=1.0,
                )
                await n.start(service.run)
                advert = scheduler_record.SchedulerRecord(
                    name="s", peer_id=p2p.peer_id, addrs=tuple(p2p.addrs)
                )
                await p2p.put_record(
                    scheduler_record.KIND, p2p.peer_id, advert.to_payload(), ttl=60
                )
                self.p2p, self.library, self.service = p2p, lib, service
                task_status.started()
        self.p2p = self.library = self.service = None
        self.stopped.set()

    def stop(self) -> None:
        assert self.scope is not None
        self.scope.cancel()


@asynccontextmanager
async def schedulers(
    tmp_path: Path, *policies: TrustPolicy, request_timeout: float = 3.0
) -> AsyncIterator[list[Scheduler]]:
    async with trio.open_nursery() as nursery:
        scheds = [
            Scheduler(tmp_path / f"s{i}", policy, request_timeout=request_timeout)
            for i, policy in enumerate(policies)
        ]
        await nursery.start(scheds[0].run, [])
        assert scheds[0].p2p is not None
        bootstrap = scheds[0].p2p.addrs[:1]
        for sched in scheds[1:]:
            await nursery.start(sched.run, bootstrap)
        try:
            yield scheds
        finally:
            nursery.cancel_scope.cancel()


async def wait_everywhere(scheds: list[Scheduler], entries: list[Entry]) -> None:
    with trio.fail_after(REPLICATE_WITHIN):
        for sched in scheds:
            for entry in entries:
                await sched.lib.wait_for(entry.id)


async def test_an_entry_published_on_one_scheduler_reaches_the_others_within_10s(
    tmp_path: Path,
) -> None:
    async with schedulers(tmp_path, TRUSTED, TRUSTED, TRUSTED) as (a, b, c):
        entry = os_entry("debian-12")
        start = trio.current_time()
        assert await a.lib.insert(entry)
        await wait_everywhere([b, c], [entry])
        assert trio.current_time() - start < REPLICATE_WITHIN
        for sched in (b, c):
            assert await sched.lib.get(entry.id) == entry
        # Published on another scheduler, the same holds the other way round.
        later = package_entry("python3")
        await c.lib.insert(later)
        await wait_everywhere([a, b], [later])
        assert a.lib.index.root() == b.lib.index.root() == c.lib.index.root()


async def test_an_untrusted_publishers_entry_is_refused_by_schedulers_that_do_not_trust_it(
    tmp_path: Path,
) -> None:
    # A trusts one more publisher (its node.toml says so); B and C do not.
    lenient = TrustPolicy({PUBLISHER.public_bytes, OTHER_PUBLISHER.public_bytes})
    async with schedulers(tmp_path, lenient, TRUSTED, TRUSTED) as (a, b, c):
        foreign = os_entry("foreign", identity=OTHER_PUBLISHER)
        marker = os_entry("marker")
        await a.lib.insert_many([foreign, marker])
        await wait_everywhere([b, c], [marker])
        # Each of B and C refuses it when it pulls from A (a pull from the other one, which
        # lacks it, may have brought the marker first).
        with trio.fail_after(REPLICATE_WITHIN):
            for sched in (b, c):
                await sched.svc.wait_until(lambda s: foreign.id in s.refusals())
        reason = f"publisher {OTHER_PUBLISHER.public_bytes.hex()} is not trusted by this scheduler"
        for sched in (b, c):
            assert foreign.id not in sched.lib
            assert sched.svc.refusals() == {foreign.id: reason}
            assert sched.svc.statistics()["misbehaving"] == 0  # not the peer's fault


def forging_server(
    index: IdIndex, entries: dict[str, Entry]
) -> Callable[[MessageStream], Awaitable[None]]:
    """A rogue scheduler's handler: lists real IDs, then sends the entries with a bad signature."""

    async def serve(stream: MessageStream) -> None:
        async for msg in stream:
            answer = respond(decode_request(msg), index)
            if isinstance(answer, WantEntries):
                forged = [tampered(entries[i], signature=bytes(64)).encode() for i in answer.ids]
                answer = entries_reply(forged)
            await stream.send(REPLIES.encode(answer))

    return serve


async def test_a_forged_entry_never_enters_any_catalog_and_its_sender_is_banned(
    tmp_path: Path,
) -> None:
    async with schedulers(tmp_path, TRUSTED, TRUSTED, TRUSTED) as scheds, trio.open_nursery() as n:
        victim = os_entry("victim", now=NOW + 5)  # never published by its publisher
        rogue = P2PNode(Identity.generate(), listen=[LOOPBACK], **FAST)
        rogue.set_handler(PROTOCOL_ID, forging_server(IdIndex([victim.id]), {victim.id: victim}))
        await n.start(rogue.run)
        for sched in scheds:
            assert sched.p2p is not None
            await rogue.connect(sched.p2p.addrs[0])
        with trio.fail_after(REPLICATE_WITHIN):
            for sched in scheds:
                await sched.svc.wait_until(lambda s: s.is_banned(rogue.peer_id))
        # Honest replication still works, and the forged entry is nowhere.
        honest = package_entry("honest")
        await scheds[0].lib.insert(honest)
        await wait_everywhere(scheds, [honest])
        for sched in scheds:
            assert victim.id not in sched.lib
            assert sched.svc.statistics()["misbehaving"] >= 1
        n.cancel_scope.cancel()


async def test_a_scheduler_that_was_down_catches_up_when_it_returns(tmp_path: Path) -> None:
    async with schedulers(tmp_path, TRUSTED, TRUSTED) as (a, b), trio.open_nursery() as n:
        c = Scheduler(tmp_path / "c")
        assert a.p2p is not None
        bootstrap = a.p2p.addrs[:1]
        await n.start(c.run, bootstrap)
        before = os_entry("before")
        await a.lib.insert(before)
        await wait_everywhere([b, c], [before])

        c.stop()
        with trio.fail_after(5):
            await c.stopped.wait()
        meanwhile = [package_entry(f"while-down-{i}") for i in range(40)]
        await a.lib.insert_many(meanwhile[:20])
        await b.lib.insert_many(meanwhile[20:])
        await wait_everywhere([a, b], meanwhile)

        await n.start(c.run, bootstrap)  # same identity, same data dir
        assert before.id in c.lib  # kept on disk
        await wait_everywhere([c], meanwhile)
        assert c.lib.index.root() == a.lib.index.root()
        n.cancel_scope.cancel()


async def test_a_peer_that_joins_or_returns_is_pulled_from_at_once_not_at_the_next_round(
    tmp_path: Path,
) -> None:
    # Rounds and back-offs of 10 minutes: only the arrival of a peer can explain a pull within
    # seconds.
    a = Scheduler(tmp_path / "a", interval=600.0, max_backoff=600.0)
    c = Scheduler(tmp_path / "c", interval=600.0, max_backoff=600.0)
    async with trio.open_nursery() as n:
        await n.start(a.run, [])
        assert a.p2p is not None
        bootstrap = a.p2p.addrs[:1]
        joining, returning = os_entry("joining"), os_entry("returning")
        await _insert_offline(c, joining)
        await n.start(c.run, bootstrap)
        with trio.fail_after(5):
            await a.lib.wait_for(joining.id)

        assert c.p2p is not None
        c_id = c.p2p.peer_id
        with trio.fail_after(10):
            await a.svc.wait_until(lambda svc: c_id in svc.known_schedulers)  # record read
        c.stop()
        with trio.fail_after(10):
            await c.stopped.wait()
            await a.p2p.wait_peers(lambda peers: not peers)  # c counted gone
        await a.svc.pull_round()  # fails: c is down, and is backed off for 10 minutes
        assert a.svc.statistics()["pull_failures"] == 1
        assert c_id not in a.svc.candidates()
        await _insert_offline(c, returning)
        await n.start(c.run, bootstrap)  # same identity: c is back
        with trio.fail_after(5):
            await a.lib.wait_for(returning.id)
        n.cancel_scope.cancel()


async def test_a_scheduler_still_starting_is_asked_again_soon_not_written_off(
    tmp_path: Path,
) -> None:
    # c's host answers before its replication service serves (a scheduler starting up): a
    # must ask again after its short back-off, not after not_serving_retry (a minute).
    a = Scheduler(tmp_path / "a")
    starting = os_entry("starting")
    c_dir = tmp_path / "c"
    await _insert_offline(Scheduler(c_dir), starting)
    async with trio.open_nursery() as n:
        await n.start(a.run, [])
        assert a.p2p is not None
        c = P2PNode(Identity.generate(), listen=[LOOPBACK], bootstrap=a.p2p.addrs[:1], **FAST)
        async with Library.open(c_dir, TRUSTED) as c_lib:
            await n.start(c.run)
            with trio.fail_after(10):
                await a.svc.wait_until(lambda svc: svc.statistics()["not_serving"] >= 1)
            assert a.svc.not_serving_retry >= 60
            await n.start(ReplicationService(c, c_lib, interval=0.3).run)
            with trio.fail_after(5):
                await a.lib.wait_for(starting.id)
            n.cancel_scope.cancel()


async def test_a_peer_that_did_not_serve_is_pulled_from_at_once_when_it_returns(
    tmp_path: Path,
) -> None:
    # Rounds and back-offs of 10 minutes: only c's return explains a pull within seconds.
    a = Scheduler(tmp_path / "a", interval=600.0, max_backoff=600.0)
    c_identity = Identity.generate()
    returning = os_entry("returning")
    async with trio.open_nursery() as n:
        await n.start(a.run, [])
        assert a.p2p is not None
        bootstrap = a.p2p.addrs[:1]
        c = P2PNode(c_identity, listen=[LOOPBACK], bootstrap=bootstrap, **FAST)
        async with trio.open_nursery() as worker:  # c serves no catalog: a worker, say
            await worker.start(c.run)
            with trio.fail_after(10):
                await a.svc.wait_until(lambda svc: svc.statistics()["not_serving"] >= 1)
            worker.cancel_scope.cancel()
        with trio.fail_after(10):
            await a.p2p.wait_peers(lambda peers: not peers)  # c counted gone
        assert c.peer_id not in a.svc.candidates()
        back = Scheduler(tmp_path / "c", identity=c_identity, interval=600.0, max_backoff=600.0)
        await _insert_offline(back, returning)
        await n.start(back.run, bootstrap)  # the same peer, now a scheduler
        with trio.fail_after(5):
            await a.lib.wait_for(returning.id)
        n.cancel_scope.cancel()


async def _insert_offline(sched: Scheduler, entry: Entry) -> None:
    """Put ``entry`` in ``sched``'s library on disk while the scheduler is not running."""
    sched.data_dir.mkdir(parents=True, exist_ok=True)
    async with Library.open(sched.data_dir, sched.policy) as lib:
        await lib.insert(entry)


@pytest.mark.parametrize("n_entries", [300])
async def test_a_new_scheduler_fetches_a_large_catalog_in_batches(
    tmp_path: Path, n_entries: int
) -> None:
    async with schedulers(tmp_path, TRUSTED, TRUSTED) as (a, b):
        many = [package_entry(f"p{i}") for i in range(n_entries)]
        await a.lib.insert_many(many)
        await wait_everywhere([b], many)
        assert len(b.lib) == n_entries


def slow_server() -> Callable[[MessageStream], Awaitable[None]]:
    """A slow-loris scheduler: claims every bucket differs, then lists one empty bucket per
    request, each answer just inside the stream deadline: a pull from it never ends."""

    async def serve(stream: MessageStream) -> None:
        async for msg in stream:
            await trio.sleep(1.0)  # the peer's slowness, not a wait for a condition
            if msg["type"] == "summary_request":
                await stream.send({"type": "summary", "buckets": [bytes(32)] * 256})
            else:
                await stream.send({"type": "ids", "buckets": [[msg["buckets"][0], []]]})

    return serve


async def test_a_slow_peer_does_not_hold_up_replication_between_the_others(
    tmp_path: Path,
) -> None:
    # request_timeout far above the 10 s bound: a round that waited for the slow pull would miss.
    async with (
        schedulers(tmp_path, TRUSTED, TRUSTED, request_timeout=60.0) as (a, b),
        trio.open_nursery() as n,
    ):
        slow = P2PNode(Identity.generate(), listen=[LOOPBACK], **FAST)
        slow.set_handler(PROTOCOL_ID, slow_server())
        await n.start(slow.run)
        for sched in (a, b):
            assert sched.p2p is not None
            await slow.connect(sched.p2p.addrs[0])
        with trio.fail_after(REPLICATE_WITHIN):
            for sched in (a, b):
                await sched.svc.wait_until(lambda s: slow.peer_id in s.pulling)
        entry = os_entry("while-slow")
        await a.lib.insert(entry)
        await wait_everywhere([b], [entry])
        n.cancel_scope.cancel()


@dataclass
class ListerPull:
    """What one pull from the lister asked: requests for IDs, and IDs of entries."""

    ids_requests: int = 0
    asked: int = 0


@dataclass
class Lister:
    """A hostile scheduler: says every bucket differs, lists as many made-up IDs as each reply
    may carry (a million over the 256 buckets) and never sends one entry."""

    pulls: list[ListerPull] = field(default_factory=list)
    pulled: trio.Event = field(default_factory=trio.Event)

    async def serve(self, stream: MessageStream) -> None:
        pull = ListerPull()
        async for msg in stream:
            request = REQUESTS.decode(msg)
            if isinstance(request, SummaryRequest):
                answer: Summary | Ids | Entries = Summary(buckets=(bytes(32),) * BUCKETS)
            elif isinstance(request, IdsRequest):
                pull.ids_requests += 1
                listed = request.buckets[: MAX_IDS_PER_REPLY // MAX_IDS_PER_BUCKET]
                answer = Ids(buckets=tuple(BucketIds(bucket=b, ids=made_up(b)) for b in listed))
            else:
                pull.asked += len(request.ids)
                answer = Entries(entries=())
            await stream.send(REPLIES.encode(answer))
        self.pulls.append(pull)  # the puller ended the stream: a whole pull
        self.pulled.set()


def made_up(bucket: int) -> tuple[bytes, ...]:
    return tuple(bytes([bucket]) + i.to_bytes(31, "big") for i in range(MAX_IDS_PER_BUCKET))


async def test_a_peer_listing_a_million_ids_costs_each_pull_a_bounded_want(
    tmp_path: Path,
) -> None:
    async with schedulers(tmp_path, TRUSTED, TRUSTED) as (a, b), trio.open_nursery() as n:
        lister = Lister()
        rogue = P2PNode(Identity.generate(), listen=[LOOPBACK], **FAST)
        rogue.set_handler(PROTOCOL_ID, lister.serve, limits=WIRE_LIMITS)
        await n.start(rogue.run)
        for sched in (a, b):
            assert sched.p2p is not None
            await rogue.connect(sched.p2p.addrs[0])
        with trio.fail_after(REPLICATE_WITHIN):
            await lister.pulled.wait()
        # Each whole pull asked for the IDs of one reply and for the entries it wanted, no more.
        for pull in lister.pulls:
            assert pull.ids_requests == 1
            assert pull.asked == MAX_WANTED_PER_SESSION
        # Honest replication between the two goes on, and listing is not misbehaviour.
        entry = os_entry("beside-the-lister")
        await a.lib.insert(entry)
        await wait_everywhere([b], [entry])
        assert not any(s.svc.is_banned(rogue.peer_id) for s in (a, b))
        n.cancel_scope.cancel()
