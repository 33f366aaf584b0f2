"""A worker that trusts a scheduler asks it for work, not a stranger's (issue 14, item 4): the DHT
holds the records of a trusted scheduler and of a ground key; while the trusted one is served the
worker never opens a control stream to the other, with none reachable it serves whoever it finds,
and ``worker.schedulers`` still limits whom it serves at all (fakes for the network and the VMs,
in virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from catalog import scheduler_record
from catalog.dispatch import PROTOCOL_ID, WorkRequest
from node.config import WorkerConfig
from node.dht_records import Record, make_record, parse_record, peer_id_of
from node.identity import Identity
from node.p2p_stream import MessageStream
from node.wire import WireLimits
from tests.worker.fake_backend import FakeBackend, FakeLeaseBlobs, manifest
from tests.worker.fake_scheduler import FakeNetwork, FakeScheduler
from worker_role.agent import DISCOVERY_INTERVAL, WorkerAgent

NOW = 1_800_000_000.0
TRUSTED = Identity.generate()
GROUND = Identity.generate()
TRUSTED_ID = peer_id_of(TRUSTED.public_bytes)
GROUND_ID = peer_id_of(GROUND.public_bytes)
ROUNDS = 10


def advert(by: Identity, name: str) -> Record:
    payload = {"name": name, "peer_id": peer_id_of(by.public_bytes), "addrs": []}
    key, value = make_record(by, scheduler_record.KIND, payload, ttl=600, now=NOW)
    return parse_record(key, value, now=NOW)


class TwoSchedulerDht(FakeNetwork):
    """The worker's p2p node: the DHT advertises both schedulers; ``dialled`` is whom the agent
    opened a control stream to."""

    finds = 0
    dialled: list[str]

    async def find_records(self, kind: str, *, timeout: float) -> list[Record]:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        self.finds += 1
        self.changes.changed()
        return [advert(GROUND, "ground"), advert(TRUSTED, "trusted")]

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, limits: WireLimits | None = None
    ) -> MessageStream:
        if protocol_id == PROTOCOL_ID:
            self.dialled.append(peer_id)
        return await super().open_stream(peer_id, protocol_id, limits=limits)


@pytest.fixture
async def network() -> AsyncIterator[TwoSchedulerDht]:
    async with trio.open_nursery() as nursery:
        dht = TwoSchedulerDht(nursery)
        dht.dialled = []
        yield dht
        nursery.cancel_scope.cancel()


async def lend(
    network: TwoSchedulerDht, tmp_path: Path, identity: Identity, serves: tuple[str, ...] = ()
) -> None:
    """Run a worker trusting :data:`TRUSTED` for :data:`ROUNDS` rounds of discovery."""
    config = WorkerConfig(schedulers=serves, vm_dir=tmp_path / "vm")
    agent = WorkerAgent(
        network, FakeLeaseBlobs(manifest()), identity, tmp_path, config,
        open_backend=FakeBackend().open,
    )  # fmt: skip
    agent.trusted_schedulers = frozenset({TRUSTED_ID})
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(10 * ROUNDS * DISCOVERY_INTERVAL):
            await network.changes.wait_for(lambda: network.finds >= ROUNDS)
        nursery.cancel_scope.cancel()


async def test_a_worker_serves_only_its_trusted_scheduler_while_it_is_there(
    network: TwoSchedulerDht, tmp_path: Path, autojump_clock: MockClock
) -> None:
    identity = Identity.generate()
    trusted = network.add(FakeScheduler(TRUSTED_ID, identity.public_bytes, retry_after=1.0))
    ground = network.add(FakeScheduler(GROUND_ID, identity.public_bytes, retry_after=1.0))
    await lend(network, tmp_path, identity)
    assert trusted.of_type(WorkRequest)
    assert not ground.of_type(WorkRequest)
    assert set(network.dialled) == {TRUSTED_ID}


async def test_with_its_trusted_scheduler_unreachable_a_worker_serves_the_others(
    network: TwoSchedulerDht, tmp_path: Path, autojump_clock: MockClock
) -> None:
    identity = Identity.generate()
    ground = network.add(FakeScheduler(GROUND_ID, identity.public_bytes, retry_after=1.0))
    await lend(network, tmp_path, identity)  # the trusted one is advertised, not reachable
    assert ground.of_type(WorkRequest)
    assert network.dialled[0] == TRUSTED_ID  # asked first


async def test_the_lenders_allow_list_still_decides_whom_a_worker_serves(
    network: TwoSchedulerDht, tmp_path: Path, autojump_clock: MockClock
) -> None:
    identity = Identity.generate()
    trusted = network.add(FakeScheduler(TRUSTED_ID, identity.public_bytes, retry_after=1.0))
    ground = network.add(FakeScheduler(GROUND_ID, identity.public_bytes, retry_after=1.0))
    await lend(network, tmp_path, identity, serves=(GROUND_ID,))
    assert not trusted.of_type(WorkRequest)
    assert ground.of_type(WorkRequest)
    assert set(network.dialled) == {GROUND_ID}
