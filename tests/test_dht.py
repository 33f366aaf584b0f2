"""The DHT across real nodes: discovery from one bootstrap address and signed records."""

from __future__ import annotations

import time

import msgpack
import pytest
import trio

from node import dht_records
from node.dht_records import RecordNotFoundError, make_record, record_key
from node.errors import LocalProtocolError
from node.identity import Identity
from node.p2p import P2PNode
from tests.p2p_helpers import FAST, LOOPBACK, running_nodes
from tests.p2p_helpers.rogue import local_value, push_raw_value
from tests.p2p_helpers.subprocess_peer import peer_process

SCHEDULER = "scheduler"


async def test_five_nodes_find_each_other_and_every_scheduler_record() -> None:
    async with running_nodes(5) as nodes:
        with trio.fail_after(20):
            for node in nodes:
                peers = await node.wait_peer_count(4)
                assert {p.peer_id for p in peers} == {n.peer_id for n in nodes} - {node.peer_id}
                assert all(p.addrs for p in peers)
        publisher = nodes[3]
        payload = {"name": "sched-a", "peer_id": publisher.peer_id, "addrs": publisher.addrs}
        await publisher.put_record(SCHEDULER, publisher.peer_id, payload, ttl=60)
        second = nodes[1]
        await second.put_record(
            SCHEDULER, second.peer_id, {"name": "sched-b", "peer_id": second.peer_id}, ttl=60
        )
        for node in nodes:
            record = await node.get_record(SCHEDULER, publisher.peer_id, timeout=10)
            assert record.payload == payload
            assert record.owner == publisher.peer_id
            found = await node.find_records(SCHEDULER, timeout=10)
            assert sorted(r.payload["name"] for r in found) == ["sched-a", "sched-b"]


async def test_a_republished_record_replaces_the_old_one_everywhere() -> None:
    async with running_nodes(3) as nodes:
        with trio.fail_after(20):
            for node in nodes:
                await node.wait_peer_count(2)
        pub = nodes[2]
        await pub.put_record(SCHEDULER, pub.peer_id, {"load": 1}, ttl=60)
        for node in nodes:
            assert (await node.get_record(SCHEDULER, pub.peer_id, timeout=10)).payload["load"] == 1
        await pub.put_record(SCHEDULER, pub.peer_id, {"load": 2}, ttl=60)
        for node in nodes:
            assert (await node.get_record(SCHEDULER, pub.peer_id, timeout=10)).payload["load"] == 2


async def test_forged_tampered_and_misplaced_records_are_rejected_on_every_node() -> None:
    mallory = Identity.generate()
    async with running_nodes(4) as nodes:
        with trio.fail_after(20):
            for node in nodes:
                await node.wait_peer_count(3)
        rogue, honest, others = nodes[0], nodes[1], nodes[2:]
        await honest.put_record(SCHEDULER, honest.peer_id, {"name": "real"}, ttl=60)
        key = record_key(SCHEDULER, honest.peer_id)
        now = time.time()
        # Forged: Mallory's signature under the honest node's key, issued later so it would win.
        _, forged = make_record(mallory, SCHEDULER, {"name": "evil"}, ttl=60, now=now + 5)
        # Tampered: the honest record with its payload rewritten.
        _, genuine = make_record(honest.identity, SCHEDULER, {"name": "x"}, ttl=60, now=now + 5)
        fields = msgpack.unpackb(genuine, raw=False)
        fields["payload"] = msgpack.packb({"name": "evil"})
        tampered = msgpack.packb(fields, use_bin_type=True)
        # Expired: properly signed, long dead.
        _, expired = make_record(honest.identity, SCHEDULER, {"name": "old"}, ttl=5, now=now - 60)
        # Unregistered namespace and plain keys: no validator may accept them.
        for target in [honest, *others]:
            for bad in (forged, tampered, expired):
                assert not await push_raw_value(rogue, target.peer_id, key, bad)
            assert not await push_raw_value(rogue, target.peer_id, "/other/x", b"anything")
            assert not await push_raw_value(rogue, target.peer_id, "plain-key", b"anything")
            assert local_value(target, "/other/x") is None
            assert local_value(target, "plain-key") is None
        for node in nodes:
            record = await node.get_record(SCHEDULER, honest.peer_id, timeout=10)
            assert record.payload == {"name": "real"}
        # A record that only ever existed forged is not found anywhere.
        victim = others[0]
        for target in nodes[1:]:
            assert not await push_raw_value(
                rogue, target.peer_id, record_key(SCHEDULER, victim.peer_id), forged
            )
        for node in nodes:
            with pytest.raises(RecordNotFoundError):
                await node.get_record(SCHEDULER, victim.peer_id, timeout=10)


async def test_a_publisher_with_a_slow_clock_publishes_records_others_see_as_expired() -> None:
    async with trio.open_nursery() as nursery:
        honest = P2PNode(Identity.generate(), listen=[LOOPBACK], **FAST)
        addrs = await nursery.start(honest.run)
        late = P2PNode(
            Identity.generate(),
            listen=[LOOPBACK],
            bootstrap=[addrs[0]],
            wall_clock=lambda: time.time() - 3600,
            **FAST,
        )
        await nursery.start(late.run)
        with trio.fail_after(20):
            await honest.wait_peer_count(1)
        await late.put_record(SCHEDULER, late.peer_id, {"name": "stale"}, ttl=60)
        assert (await late.get_record(SCHEDULER, late.peer_id, timeout=10)).payload  # own view
        key = record_key(SCHEDULER, late.peer_id)
        assert local_value(honest, key) is None  # refused on arrival
        with pytest.raises(RecordNotFoundError):
            await honest.get_record(SCHEDULER, late.peer_id, timeout=10)
        assert await honest.find_records(SCHEDULER, timeout=10) == []
        nursery.cancel_scope.cancel()


async def test_a_node_publishes_only_under_its_own_peer_id() -> None:
    async with running_nodes(1) as (node,):
        other = dht_records.peer_id_of(Identity.generate().public_bytes)
        with pytest.raises(LocalProtocolError):
            await node.put_record(SCHEDULER, other, {"name": "x"}, ttl=60)


async def test_a_record_outlives_its_publisher_in_the_dht() -> None:
    async with running_nodes(4) as nodes, peer_process(nodes[0].addrs[0], publish=SCHEDULER) as pub:
        with trio.fail_after(20):
            await pub.wait_event("published")
            for node in nodes:
                await node.wait_peers(lambda ps: pub.peer_id in {p.peer_id for p in ps})
        pub.kill()
        with trio.fail_after(10):  # as a client would notice: the publisher leaves peer lists
            for node in nodes:
                await node.wait_peers(lambda ps: pub.peer_id not in {p.peer_id for p in ps})
        for node in nodes:
            record = await node.get_record(SCHEDULER, pub.peer_id, timeout=10)
            assert record.owner == pub.peer_id  # served by the k closest, not the owner
            found = await node.find_records(SCHEDULER, timeout=10)
            assert [r.owner for r in found] == [pub.peer_id]


async def test_content_providers_are_found_by_every_node() -> None:
    key = b"\x12\x20" + bytes(range(32))
    async with running_nodes(4) as nodes:
        with trio.fail_after(20):
            for node in nodes:
                await node.wait_peer_count(3)
        holder = nodes[2]
        await holder.provide(key, timeout=10)
        for node in nodes:
            found = await node.find_providers(key, timeout=10)
            assert found == ([] if node is holder else [holder.peer_id])
        holder.withdraw(key)
        assert holder.peer_id not in {
            str(p.peer_id) for p in holder._dht.kad.provider_store.get_providers(key)
        }
