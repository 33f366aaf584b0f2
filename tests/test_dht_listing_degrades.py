"""Listing records when part of the network is unreachable (issue 15, item 5): the answer comes
within the timeout from what is known, marked stale, instead of an error for everyone."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio

from node import dht_records
from node.errors import DeadlineError
from node.heartbeat import Liveness
from node.identity import Identity
from node.p2p_records import MAX_REMEMBERED, DhtRecords

KIND = "scheduler"
NOW = 1_000_000.0


class _Network:
    """A DHT whose index and records answer, or hang, as a test says (sans-IO double)."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.index_hangs = False
        self.hanging_owners: set[str] = set()

    def publish(self, ttl: float = 600.0, now: float = NOW) -> str:
        identity = Identity.generate()
        key, value = dht_records.make_record(identity, KIND, {"name": "s"}, ttl=ttl, now=now)
        owner = key.rsplit("/", 1)[1]
        self.values[key] = value
        return owner

    async def providers(self, index: str, *, also_ask: Any = ()) -> set[str]:
        if self.index_hangs:
            await trio.sleep_forever()
        return {key.rsplit("/", 1)[1] for key in self.values}

    async def get_all(self, key: str, *, also_ask: Any = None) -> list[bytes]:
        if key.rsplit("/", 1)[1] in self.hanging_owners:
            await trio.sleep_forever()
        return [self.values[key]] if key in self.values else []

    async def get_from(self, peer: Any, key: str) -> bytes | None:
        return None

    def get_local(self, key: str) -> bytes | None:
        return None


def _records(network: _Network, clock: list[float]) -> DhtRecords:
    identity = Identity.generate()
    return DhtRecords(
        network,  # type: ignore[arg-type]
        identity,
        dht_records.peer_id_of(identity.public_bytes),
        liveness=Liveness(peer_timeout=5.0),
        is_connected=lambda peer: False,
        wall_clock=lambda: clock[0],
    )


async def test_an_unreachable_index_lists_what_was_known_marked_stale(autojump_clock: Any) -> None:
    network, clock = _Network(), [NOW]
    owners = sorted(network.publish() for _ in range(3))
    records = _records(network, clock)
    first = await records.find_records(KIND, timeout=10)
    assert [(r.owner, r.stale) for r in first] == [(o, False) for o in owners]

    network.index_hangs = True
    started = trio.current_time()
    again = await records.find_records(KIND, timeout=10)
    assert trio.current_time() - started <= 10.0
    assert [(r.owner, r.stale) for r in again] == [(o, True) for o in owners]


async def test_a_publisher_that_cannot_be_reached_is_stale_the_others_fresh(
    autojump_clock: Any,
) -> None:
    network, clock = _Network(), [NOW]
    cut_off, reachable = network.publish(), network.publish()
    records = _records(network, clock)
    await records.find_records(KIND, timeout=10)
    network.hanging_owners.add(cut_off)
    listed = {r.owner: r.stale for r in await records.find_records(KIND, timeout=10)}
    assert listed == {cut_off: True, reachable: False}


async def test_with_nothing_known_an_unreachable_index_is_a_deadline_error(
    autojump_clock: Any,
) -> None:
    network, clock = _Network(), [NOW]
    network.publish()
    network.index_hangs = True
    with pytest.raises(DeadlineError):
        await _records(network, clock).find_records(KIND, timeout=10)


async def test_an_expired_record_is_never_listed_as_stale(autojump_clock: Any) -> None:
    network, clock = _Network(), [NOW]
    network.publish(ttl=60.0)
    records = _records(network, clock)
    assert len(await records.find_records(KIND, timeout=10)) == 1
    network.index_hangs = True
    clock[0] = NOW + 61.0
    with pytest.raises(DeadlineError):
        await records.find_records(KIND, timeout=10)


async def test_what_is_remembered_is_bounded(autojump_clock: Any) -> None:
    network, clock = _Network(), [NOW]
    for _ in range(MAX_REMEMBERED + 50):
        network.publish()
    records = _records(network, clock)
    assert len(await records.find_records(KIND, timeout=60)) == MAX_REMEMBERED + 50
    network.index_hangs = True
    assert len(await records.find_records(KIND, timeout=10)) == MAX_REMEMBERED


async def test_the_scheduler_directory_says_which_schedulers_are_stale() -> None:
    from catalog import scheduler_record
    from catalog.scheduler_record import SchedulerDirectory, SchedulerRecord

    def record(identity: Identity, *, stale: bool) -> dht_records.Record:
        peer = dht_records.peer_id_of(identity.public_bytes)
        payload = SchedulerRecord(name="s", peer_id=peer, addrs=()).to_payload()
        key, value = dht_records.make_record(
            identity, scheduler_record.KIND, payload, ttl=60, now=NOW
        )
        parsed = dht_records.parse_record(key, value, now=NOW)
        return dataclasses.replace(parsed, stale=stale)

    fresh, old = Identity.generate(), Identity.generate()
    records = [record(fresh, stale=False), record(old, stale=True)]

    class Finder:
        async def find_records(self, kind: str, *, timeout: float) -> list[dht_records.Record]:  # noqa: ASYNC109
            return records

    directory = SchedulerDirectory(Finder())
    assert len(await directory.find(timeout=1)) == 2
    assert directory.stale == {dht_records.peer_id_of(old.public_bytes)}
