"""Hostile scheduler records against a real worker agent: the records a worker finds in the DHT
include correctly signed ones that are no scheduler record (empty, addresses of the wrong type,
naming another peer than their signer). The agent skips them, round after round, and serves the
real scheduler it found beside them (fakes for the network and the VMs, in virtual time)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from catalog import scheduler_record
from catalog.dispatch import WorkRequest
from node.config import WorkerConfig
from node.dht_records import Record, make_record, parse_record, peer_id_of
from node.identity import Identity
from tests.worker.fake_backend import FakeBackend, FakeLeaseBlobs, manifest
from tests.worker.fake_scheduler import FakeNetwork, FakeScheduler
from worker_role.agent import DISCOVERY_INTERVAL, WorkerAgent

NOW = 1_800_000_000.0
HONEST = Identity.generate()
HONEST_ID = peer_id_of(HONEST.public_bytes)


def signed(payload: dict[str, Any], by: Identity) -> Record:
    key, value = make_record(by, scheduler_record.KIND, payload, ttl=600, now=NOW)
    return parse_record(key, value, now=NOW)


def records() -> list[Record]:
    rogues = [Identity.generate() for _ in range(3)]
    rogue_ids = [peer_id_of(r.public_bytes) for r in rogues]
    rogue_addr = f"/ip4/127.0.0.1/tcp/9/p2p/{rogue_ids[1]}"
    honest = {"name": "honest", "peer_id": HONEST_ID, "addrs": []}
    return [
        signed({}, rogues[0]),
        signed({"name": "wrong-type", "peer_id": rogue_ids[1], "addrs": rogue_addr}, rogues[1]),
        signed(honest, HONEST),
        # The real scheduler's peer ID with an address of the rogue's choosing.
        signed({**honest, "addrs": [f"/ip4/127.0.0.1/tcp/9/p2p/{HONEST_ID}"]}, rogues[2]),
    ]


class HostileDht(FakeNetwork):
    """The worker's p2p node, where the DHT holds the records above."""

    finds = 0

    async def find_records(self, kind: str, *, timeout: float) -> list[Record]:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        assert kind == scheduler_record.KIND
        self.finds += 1
        self.changes.changed()
        return records()

    async def connect(self, addr: str) -> str:
        raise AssertionError(f"dialled {addr}: the real scheduler is connected already")


@pytest.fixture
async def network() -> AsyncIterator[HostileDht]:
    async with trio.open_nursery() as nursery:
        yield HostileDht(nursery)
        nursery.cancel_scope.cancel()


async def test_a_worker_skips_hostile_records_and_serves_the_real_scheduler(
    network: HostileDht, tmp_path: Path, autojump_clock: MockClock
) -> None:
    identity = Identity.generate()
    scheduler = network.add(FakeScheduler(HONEST_ID, identity.public_bytes, retry_after=1.0))
    config = WorkerConfig(schedulers=(), vm_dir=tmp_path / "vm")  # serve whichever it finds
    agent = WorkerAgent(
        network, FakeLeaseBlobs(manifest()), identity, tmp_path, config,
        open_backend=FakeBackend().open,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        with trio.fail_after(10 * DISCOVERY_INTERVAL):
            await network.changes.wait_for(lambda: network.finds >= 10)
        # Ten rounds of discovery later the agent still runs and asks the real scheduler for work.
        asked = len(scheduler.of_type(WorkRequest))
        with trio.fail_after(10.0):
            await scheduler.changes.wait_for(lambda: len(scheduler.of_type(WorkRequest)) > asked)
        assert set(network.schedulers) == {HONEST_ID}
        nursery.cancel_scope.cancel()
