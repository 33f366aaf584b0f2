"""The transfer plan driven by a deterministic fake network in virtual time (no I/O, no sleeps).

Each fake provider serves one request at a time over a link of fixed rate; faults are per provider:
wrong bytes, vanishing after N chunks, claiming chunks it then does not have.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.blob import ChunkRef, Manifest
from catalog.chunking import ChunkId, hash_chunk
from catalog.errors import NoProviderError, TransferCancelledError
from catalog.transfer_plan import (
    CancelFetch,
    Completed,
    Event,
    Failed,
    FetchChunk,
    PeerDropped,
    PeerMisbehaved,
    Progress,
    State,
    TransferPlan,
    Verdict,
)
from tests.catalog.conftest import random_bytes


def make_blob(n: int, size: int = 1000, seed: int = 0) -> tuple[Manifest, dict[ChunkId, bytes]]:
    chunks = [random_bytes(size + i % 7, seed * 100_000 + i) for i in range(n)]
    manifest = Manifest(tuple(ChunkRef(hash_chunk(c), len(c)) for c in chunks))
    return manifest, {hash_chunk(c): c for c in chunks}


@dataclass
class FakeProvider:
    peer: str
    positions: list[int]
    rate: float = 100_000.0  # bytes per virtual second
    latency: float = 0.001
    corrupt: bool = False
    vanish_after: int | None = None  # chunks served before it disappears
    lies_about: set[int] = field(default_factory=set)  # positions it claims but cannot serve
    served: int = 0
    vanished: bool = False
    link_free: float = 0.0


@dataclass
class FakeNet:
    manifest: Manifest
    data: dict[ChunkId, bytes]
    providers: list[FakeProvider]
    plan: TransferPlan
    now: float = 0.0
    stored: dict[ChunkId, bytes] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    sent: list[FetchChunk] = field(default_factory=list)
    cancels: list[CancelFetch] = field(default_factory=list)
    max_outstanding: dict[str, int] = field(default_factory=dict)
    _heap: list[tuple[float, int, str, ChunkId]] = field(default_factory=list)
    _seq: int = 0

    @classmethod
    def start(
        cls,
        manifest: Manifest,
        data: dict[ChunkId, bytes],
        providers: list[FakeProvider],
        present: set[ChunkId] | None = None,
        **limits: int,
    ) -> FakeNet:
        plan = TransferPlan(manifest, present=present or set(), now=0.0, **limits)
        for p in providers:
            plan.add_provider(p.peer, p.positions)
        return cls(manifest, data, providers, plan)

    def provider(self, peer: str) -> FakeProvider:
        return next(p for p in self.providers if p.peer == peer)

    def pump(self) -> None:
        excluded = self.plan.excluded()
        for action in self.plan.next_actions(self.now):
            if isinstance(action, CancelFetch):
                # The provider honours the cancel: the answer never comes.
                self.cancels.append(action)
                self._heap = [
                    e for e in self._heap if (e[2], e[3]) != (action.peer, action.chunk_id)
                ]
                heapq.heapify(self._heap)
                continue
            assert action.peer not in excluded, "asked an excluded peer"
            self.sent.append(action)
            prov = self.provider(action.peer)
            prov.link_free = max(self.now, prov.link_free) + action.size / prov.rate
            heapq.heappush(
                self._heap, (prov.link_free + prov.latency, self._seq, prov.peer, action.chunk_id)
            )
            self._seq += 1
            outstanding = sum(1 for _, _, p, _ in self._heap if p == action.peer)
            self.max_outstanding[action.peer] = max(
                self.max_outstanding.get(action.peer, 0), outstanding
            )
        self.events.extend(self.plan.take_events())

    def step(self) -> bool:
        """Deliver the next answer; False when nothing is left to deliver."""
        self.pump()
        if self.plan.state is not State.RUNNING or not self._heap:
            return False
        self.now, _, peer, chunk_id = heapq.heappop(self._heap)
        prov = self.provider(peer)
        if prov.vanished:
            return True
        if prov.vanish_after is not None and prov.served >= prov.vanish_after:
            prov.vanished = True
            self.plan.provider_gone(peer, self.now)
            return True
        position = self.manifest.distinct_ids().index(chunk_id) if prov.lies_about else -1
        if position in prov.lies_about:
            self.plan.on_not_found(peer, chunk_id, self.now)
            return True
        data = self.data[chunk_id]
        if prov.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        prov.served += 1
        if self.plan.on_chunk(peer, chunk_id, data, self.now) is Verdict.ACCEPTED:
            assert hash_chunk(data) == chunk_id
            self.stored[chunk_id] = data
        return True

    def run(self, max_steps: int = 100_000) -> State:
        for _ in range(max_steps):
            if not self.step():
                break
        self.pump()
        return self.plan.state


def everything(manifest: Manifest) -> list[int]:
    return list(range(len(manifest.chunks)))


def test_one_provider() -> None:
    manifest, data = make_blob(40)
    net = FakeNet.start(manifest, data, [FakeProvider("a", everything(manifest))])
    assert net.run() is State.COMPLETE
    assert net.stored == data
    assert len(net.sent) == 40  # each chunk asked once
    assert net.max_outstanding["a"] == 4
    assert isinstance(net.events[-1], Completed)


def test_three_providers_share_the_work() -> None:
    manifest, data = make_blob(60)
    providers = [
        FakeProvider(p, everything(manifest), rate=r)
        for p, r in (("a", 100_000), ("b", 50_000), ("c", 25_000))
    ]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.COMPLETE
    assert net.stored == data
    received = {p.peer: p.bytes_received for p in net.plan.progress(net.now).peers}
    assert all(received[p] > 0 for p in "abc")
    assert received["a"] > received["c"]  # the fast peer did more
    assert all(n <= 4 for n in net.max_outstanding.values())


def test_rarest_chunks_are_asked_first() -> None:
    manifest, data = make_blob(20)
    providers = [FakeProvider("a", everything(manifest)), FakeProvider("b", list(range(10)))]
    net = FakeNet.start(manifest, data, providers, max_in_flight=2)
    first = net.plan.next_actions(0.0)
    rare = {manifest.chunks[i].chunk_id for i in range(10, 20)}
    to_a = [a.chunk_id for a in first if isinstance(a, FetchChunk) and a.peer == "a"]
    assert len(to_a) == 2
    assert set(to_a) <= rare


def test_provider_serving_wrong_bytes_is_excluded() -> None:
    manifest, data = make_blob(30)
    providers = [
        FakeProvider("bad", everything(manifest), rate=1e6, corrupt=True),
        FakeProvider("good1", everything(manifest)),
        FakeProvider("good2", everything(manifest)),
    ]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.COMPLETE
    assert net.stored == data  # nothing corrupt was ever accepted
    bad = [e for e in net.events if isinstance(e, PeerMisbehaved)]
    assert [e.peer for e in bad] == ["bad"]
    assert "do not hash" in bad[0].reason
    assert net.plan.excluded() == {"bad": "misbehaving"}
    # Never asked again once caught: only the first window of requests went to it.
    assert sum(1 for a in net.sent if a.peer == "bad") <= 4


def test_provider_vanishing_mid_transfer() -> None:
    manifest, data = make_blob(50)
    providers = [
        FakeProvider("flaky", everything(manifest), rate=1e6, vanish_after=10),
        FakeProvider("steady", everything(manifest)),
    ]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.COMPLETE
    assert net.stored == data
    assert any(isinstance(e, PeerDropped) and e.peer == "flaky" for e in net.events)
    dropped_after = len([a for a in net.sent if a.peer == "flaky"])
    assert dropped_after <= 10 + 4


def test_only_holder_vanishing_fails_with_clear_error() -> None:
    manifest, data = make_blob(20)
    providers = [
        FakeProvider("a", everything(manifest), vanish_after=5),
        FakeProvider("b", list(range(10))),
    ]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.FAILED
    error = net.plan.error
    assert isinstance(error, NoProviderError)
    assert "a (gone)" in str(error)
    assert isinstance(net.events[-1], Failed)
    assert set(error.missing) <= {c.hex() for c in manifest.distinct_ids()}


def test_chunk_nobody_has_fails_at_once() -> None:
    manifest, data = make_blob(10)
    net = FakeNet.start(manifest, data, [FakeProvider("a", list(range(9)))])
    assert net.run() is State.FAILED
    assert net.sent == []
    assert isinstance(net.plan.error, NoProviderError)
    assert net.plan.error.missing == [manifest.chunks[9].chunk_id.hex()]


def test_no_providers_at_all() -> None:
    manifest, data = make_blob(3)
    net = FakeNet.start(manifest, data, [])
    assert net.run() is State.FAILED
    assert "providers excluded: none" in str(net.plan.error)


def test_not_found_is_fetched_elsewhere_without_blame() -> None:
    manifest, data = make_blob(12)
    providers = [
        FakeProvider("liar", everything(manifest), rate=1e6, lies_about={0, 1, 2}),
        FakeProvider("b", everything(manifest)),
    ]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.COMPLETE
    assert net.stored == data
    assert net.plan.excluded() == {}


def test_resume_fetches_only_what_is_missing() -> None:
    manifest, data = make_blob(40)
    present = set(manifest.distinct_ids()[::2])
    net = FakeNet.start(manifest, data, [FakeProvider("a", everything(manifest))], present=present)
    start = net.plan.progress(0.0)
    assert start.bytes_done == sum(len(data[c]) for c in present)
    assert net.run() is State.COMPLETE
    assert {a.chunk_id for a in net.sent} == set(data) - present
    end = net.plan.progress(net.now)
    assert end.bytes_done == end.bytes_total == manifest.total_size
    assert end.bytes_fetched == sum(len(data[c]) for c in set(data) - present)


def test_everything_present_completes_immediately() -> None:
    manifest, data = make_blob(5)
    plan = TransferPlan(manifest, present=set(data), now=0.0)
    assert plan.state is State.COMPLETE
    assert plan.next_actions(0.0) == []


def test_cancel_then_resume() -> None:
    manifest, data = make_blob(40)
    net = FakeNet.start(manifest, data, [FakeProvider("a", everything(manifest))])
    while len(net.stored) < 15:
        net.step()
    in_flight = net.plan.progress(net.now).peers[0].in_flight
    assert in_flight > 0
    net.plan.cancel()
    cancels = [a for a in net.plan.next_actions(net.now) if isinstance(a, CancelFetch)]
    assert len(cancels) == in_flight  # every request in flight is withdrawn
    assert net.plan.state is State.CANCELLED
    assert isinstance(net.plan.error, TransferCancelledError)
    assert net.step() is False  # a cancelled plan asks for nothing
    # A late answer to a cancelled request is dropped without blame.
    late = cancels[0].chunk_id
    assert net.plan.on_chunk("a", late, data[late], net.now) is Verdict.DUPLICATE
    done = set(net.stored)
    resumed = FakeNet.start(manifest, data, [FakeProvider("a", everything(manifest))], present=done)
    assert resumed.run() is State.COMPLETE
    assert {a.chunk_id for a in resumed.sent} == set(data) - done


def test_endgame_reasks_the_slow_peers_last_chunks() -> None:
    manifest, data = make_blob(30)
    providers = [
        FakeProvider("fast", everything(manifest), rate=1e6),
        FakeProvider("slow", everything(manifest), rate=1_000),
    ]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.COMPLETE
    dupes = [a for a in net.sent if a.duplicate]
    assert dupes
    assert all(a.peer == "fast" for a in dupes)
    assert any(c.peer == "slow" for c in net.cancels)
    # Without endgame the slow peer's 4 chunks alone would take ~4 s at 1 kB/s.
    assert net.now < 1.0


def test_unsolicited_chunk_marks_peer() -> None:
    manifest, data = make_blob(4)
    plan = TransferPlan(manifest, present=set(), now=0.0)
    plan.add_provider("a", everything(manifest))
    chunk_id = manifest.chunks[0].chunk_id
    assert plan.on_chunk("a", chunk_id, data[chunk_id], 0.0) is Verdict.REJECTED
    assert plan.excluded() == {"a": "misbehaving"}


def test_out_of_range_have_map_marks_peer() -> None:
    manifest, _ = make_blob(4)
    plan = TransferPlan(manifest, present=set(), now=0.0)
    plan.add_provider("a", [0, 99])
    assert plan.excluded() == {"a": "misbehaving"}


def test_repeated_failures_drop_the_peer() -> None:
    manifest, _ = make_blob(8)
    plan = TransferPlan(manifest, present=set(), now=0.0, max_failures=2)
    plan.add_provider("a", everything(manifest))
    plan.add_provider("b", everything(manifest))
    asked = [a for a in plan.next_actions(0.0) if isinstance(a, FetchChunk) and a.peer == "a"]
    plan.on_failure("a", asked[0].chunk_id, 1.0, "timeout")
    assert plan.excluded() == {}
    plan.on_failure("a", asked[1].chunk_id, 2.0, "timeout")
    assert plan.excluded() == {"a": "gone"}
    again = plan.next_actions(2.0)
    assert all(a.peer == "b" for a in again if isinstance(a, FetchChunk))


def test_progress_and_rate_use_injected_time() -> None:
    manifest, data = make_blob(50, size=10_000)
    net = FakeNet.start(
        manifest, data, [FakeProvider("a", everything(manifest), rate=100_000, latency=0.0)]
    )
    assert net.run() is State.COMPLETE
    progress = [e for e in net.events if isinstance(e, Progress)]
    assert len(progress) == 50
    assert [p.bytes_done for p in progress] == sorted(p.bytes_done for p in progress)
    assert progress[-1].bytes_done == manifest.total_size
    assert progress[-1].rate_bps == pytest.approx(100_000, rel=0.05)
    assert progress[-1].peers[0].peer == "a"


providers_strategy = st.lists(
    st.tuples(
        st.sets(st.integers(0, 19)),  # positions held
        st.booleans(),  # corrupt
        st.one_of(st.none(), st.integers(0, 10)),  # vanish after
        st.sampled_from([1_000.0, 10_000.0, 100_000.0]),
    ),
    min_size=0,
    max_size=5,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(specs=providers_strategy, present=st.sets(st.integers(0, 19)))
def test_property_random_swarms(
    specs: list[tuple[set[int], bool, int | None, float]], present: set[int]
) -> None:
    manifest, data = make_blob(20, size=500)
    providers = [
        FakeProvider(f"p{i}", sorted(pos), rate=rate, corrupt=bad, vanish_after=vanish)
        for i, (pos, bad, vanish, rate) in enumerate(specs)
    ]
    have = {manifest.chunks[i].chunk_id for i in present}
    net = FakeNet.start(manifest, data, providers, present=have)
    state = net.run()
    needed = set(data) - have
    honest = set().union(
        *[
            {manifest.chunks[i].chunk_id for i in p.positions}
            for p in providers
            if not p.corrupt and p.vanish_after is None
        ]
    )
    assert state in (State.COMPLETE, State.FAILED)
    if needed <= honest:
        assert state is State.COMPLETE
    if state is State.COMPLETE:
        assert set(net.stored) == needed
    else:
        assert isinstance(net.plan.error, NoProviderError)
    assert all(hash_chunk(d) == c for c, d in net.stored.items())
    assert all(n <= 4 for n in net.max_outstanding.values())
    # (FakeNet.pump also asserts that no request ever goes to an excluded peer.)
    for p in providers:
        if p.corrupt and p.served:
            assert net.plan.excluded()[p.peer] == "misbehaving"


def test_gone_peer_may_come_back_misbehaving_never() -> None:
    manifest, _ = make_blob(4)
    plan = TransferPlan(manifest, present=set(), now=0.0)
    plan.add_provider("a", everything(manifest))
    plan.add_provider("b", everything(manifest))
    plan.provider_gone("a", 1.0)
    plan.add_provider("a", everything(manifest))  # reconnected
    assert plan.excluded() == {}
    plan.add_provider("b", [99])  # out of range: misbehaving
    plan.add_provider("b", everything(manifest))
    assert plan.excluded() == {"b": "misbehaving"}


def test_many_chunks_plan_in_linear_time() -> None:
    manifest, data = make_blob(5000, size=100)
    providers = [FakeProvider(p, everything(manifest)) for p in ("a", "b", "c")]
    net = FakeNet.start(manifest, data, providers)
    assert net.run() is State.COMPLETE
    assert len(net.stored) == 5000


def test_a_digest_computed_by_the_caller_is_checked_like_a_hash() -> None:
    manifest, data = make_blob(2)
    [first, second] = (ref.chunk_id for ref in manifest.chunks)
    plan = TransferPlan(manifest, present=set(), now=0.0)
    plan.add_provider("a", [0, 1])
    plan.add_provider("b", [0, 1])
    asked = {(a.peer, a.chunk_id) for a in plan.next_actions(0.0) if isinstance(a, FetchChunk)}
    assert asked == {("a", first), ("b", second)} or asked == {("a", second), ("b", first)}
    [(peer_first, _)] = [key for key in asked if key[1] == first]
    [(peer_second, _)] = [key for key in asked if key[1] == second]
    # The right digest is accepted without the plan hashing the bytes again.
    verdict = plan.on_chunk(peer_first, first, data[first], 1.0, digest=first)
    assert verdict is Verdict.ACCEPTED
    # A digest that is not the chunk's ID means wrong bytes: rejected, the sender excluded.
    verdict = plan.on_chunk(peer_second, second, data[second], 1.0, digest=first)
    assert verdict is Verdict.REJECTED
    assert any(isinstance(e, PeerMisbehaved) and e.peer == peer_second for e in plan.take_events())
