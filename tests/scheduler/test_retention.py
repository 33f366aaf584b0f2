"""The retention sweep (scheduler_role.retention) on the real sqlite queue, a real chunk store
and a real quota ledger, in the queue's virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import blake3
import pytest
import trio
import trio.testing

from catalog.blob import BlobId, BlobStore
from catalog.chunk_store import ChunkStore
from catalog.dispatch import LeaseGrant, ResultReport, ResultStatus
from catalog.peer_quota import PeerQuota
from scheduler_role.errors import InvalidTransition, UnknownTaskError
from scheduler_role.lifecycle import TaskState
from scheduler_role.queue import Queue
from scheduler_role.retention import (
    MAX_SWEEP_INTERVAL,
    MIN_SWEEP_INTERVAL,
    Recharge,
    Retention,
    settle_freed,
    sweep_interval,
)
from tests.scheduler.conftest import offer, spec

KEEP = 3600.0
OWNER = "owner1"  # the owner of conftest's spec()


@dataclass
class Blobs:
    """The parts of BlobService the sweep uses, over a real chunk store and quota ledger (the
    service's announcing to the DHT is all that is left out)."""

    blobs: BlobStore
    peer_quota: PeerQuota

    async def rm(self, blob_id: BlobId) -> None:
        await self.blobs.rm(blob_id)


@dataclass
class Setup:
    queue: Queue
    blobs: Blobs
    tasks: Path
    retention: Retention


@pytest.fixture
async def setup(queue: Queue, tmp_path: Path) -> AsyncIterator[Setup]:
    async with (
        ChunkStore.open(tmp_path / "chunks") as store,
        PeerQuota.open(tmp_path / "peer_quota.db") as quota,
    ):
        blobs = Blobs(BlobStore(store), quota)
        tasks = tmp_path / "tasks"
        tasks.mkdir()
        retention = Retention(queue, blobs, tasks, keep_finished=KEEP)  # type: ignore[arg-type]
        yield Setup(queue, blobs, tasks, retention)


async def finish(s: Setup, task_id: str, stdout: bytes, *, worker: str = "w1") -> list[BlobId]:
    """Submit ``task_id``, run it to success with ``stdout``, its result charged to its owner
    as the service does; its directory on disk. The result's blobs."""
    await s.queue.submit(spec(task_id))
    (s.tasks / task_id / "files").mkdir(parents=True)
    (s.tasks / task_id / "files" / "a").write_bytes(b"the owner's file")
    grant = await s.queue.lease(worker, offer())
    assert isinstance(grant, LeaseGrant)
    out = await s.blobs.blobs.add_bytes(stdout)
    err = await s.blobs.blobs.add_bytes(b"")
    report = ResultReport(
        lease=grant.lease, exit_code=0,
        stdout_digest=blake3.blake3(stdout).digest(), stderr_digest=blake3.blake3(b"").digest(),
        stdout_blob=bytes(out), stderr_blob=bytes(err), archive_blob=None, signature=bytes(64),
    )  # fmt: skip
    ack, _ = await s.queue.report(worker, report)
    assert ack.status is ResultStatus.RECORDED
    for blob, size in ((out, len(stdout)), (err, 0)):
        await s.blobs.peer_quota.charge(OWNER, blob, size, created=True, task=task_id)
    assert (await s.queue.status(task_id)).state is TaskState.SUCCEEDED
    return [out, err]


async def held(s: Setup) -> set[BlobId]:
    return {info.blob_id for info in await s.blobs.blobs.ls()}


def test_the_sweep_runs_often_enough_and_never_spins() -> None:
    assert sweep_interval(7 * 86400) == MAX_SWEEP_INTERVAL
    assert sweep_interval(600) == 60
    assert sweep_interval(0.01) == MIN_SWEEP_INTERVAL


def test_a_freed_blob_another_task_names_is_recharged_not_removed() -> None:
    a, b = BlobId(b"a" * 32), BlobId(b"b" * 32)
    remove, recharge = settle_freed([a, b, a], {bytes(b): ("t2", "o2")})
    assert remove == [a]
    assert recharge == [Recharge(b, "t2", "o2")]


async def test_a_finished_task_answers_until_keep_finished_then_is_forgotten(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    s = setup
    before = await held(s)
    blobs = await finish(s, "t1", b"42\n")
    await trio.sleep(KEEP - 1)
    assert await s.retention.sweep() == []
    # Within keep_finished: its status and results are all still there.
    assert (await s.queue.status("t1")).state is TaskState.SUCCEEDED
    assert len(await s.queue.results("t1")) == 1
    assert (s.tasks / "t1" / "files" / "a").exists()
    assert await s.blobs.peer_quota.used(OWNER) == 3
    assert set(blobs) <= await held(s)

    await trio.sleep(1)
    assert await s.retention.sweep() == ["t1"]
    with pytest.raises(UnknownTaskError):
        await s.queue.status("t1")
    with pytest.raises(UnknownTaskError):
        await s.queue.results("t1")
    assert not (s.tasks / "t1").exists()
    assert await s.blobs.peer_quota.used(OWNER) == 0
    assert await held(s) == before
    assert (await s.blobs.blobs.chunks.usage()).used_bytes == 0
    assert await s.retention.sweep() == []  # nothing left to do, nothing done twice


async def test_the_service_sweeps_every_interval(
    setup: Setup, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its sweeps wait on sqlite threads, during which autojump moves time on to any deadline:
    # here the loop alone is timed (the sweep's work is tested above, and over the real
    # protocols in tests/hostile/test_retention.py).
    swept: list[float] = []

    async def sweep() -> list[str]:
        swept.append(trio.current_time())
        return []

    monkeypatch.setattr(setup.retention, "sweep", sweep)
    async with trio.open_nursery() as nursery:
        await nursery.start(setup.retention.serve)
        await trio.sleep(3.5 * sweep_interval(KEEP))
        nursery.cancel_scope.cancel()
    assert swept == [sweep_interval(KEEP) * n for n in (1, 2, 3)]


async def test_live_tasks_are_never_forgotten(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    s = setup
    await s.queue.submit(spec("live"))
    await s.queue.submit(spec("assembling", image_id=None))
    await trio.sleep(100 * KEEP)
    assert await s.retention.sweep() == []
    with pytest.raises(InvalidTransition):
        await s.queue.forget("live")
    assert (await s.queue.status("live")).state is TaskState.ACTIVE


async def test_a_result_blob_another_task_still_shows_stays_charged_to_its_owner(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    s = setup
    first = await finish(s, "t1", b"same\n")
    await trio.sleep(KEEP / 2)
    await s.queue.submit(replace(spec("t2"), owner="owner2"))
    grant = await s.queue.lease("w2", offer())
    assert isinstance(grant, LeaseGrant)
    # Identical output is one blob; the ledger keeps the first task's charge (peer, blob).
    report = ResultReport(
        lease=grant.lease, exit_code=0,
        stdout_digest=blake3.blake3(b"same\n").digest(), stderr_digest=blake3.blake3(b"").digest(),
        stdout_blob=bytes(first[0]), stderr_blob=bytes(first[1]), archive_blob=None,
        signature=bytes(64),
    )  # fmt: skip
    ack, _ = await s.queue.report("w2", report)
    assert ack.status is ResultStatus.RECORDED
    await trio.sleep(KEEP / 2)
    assert await s.retention.sweep() == ["t1"]
    assert set(first) <= await held(s)  # t2's result still reads
    assert await s.blobs.peer_quota.used("owner2") == 5
    await trio.sleep(KEEP)
    assert await s.retention.sweep() == ["t2"]
    assert not set(first) & await held(s)
    assert await s.blobs.peer_quota.used("owner2") == 0


async def test_an_assembly_that_ends_after_its_task_was_forgotten_is_moot(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    s = setup
    await s.queue.submit(spec("t1", image_id=None))
    await s.queue.begin_assembly("t1")
    await s.queue.cancel("t1")
    await trio.sleep(KEEP)
    assert await s.retention.sweep() == ["t1"]
    await s.queue.image_ready("t1", bytes(32))  # the assembly still running finishes
    await s.queue.assembly_failed("t1", "too late")
    with pytest.raises(UnknownTaskError):
        await s.queue.cancel("t1")  # the owner's own requests still learn it is gone


async def test_a_forgotten_tasks_id_may_be_used_again(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    s = setup
    await finish(s, "t1", b"x\n")
    await trio.sleep(KEEP)
    assert await s.retention.sweep() == ["t1"]
    assert await s.queue.submit(spec("t1")) is True
    assert (await s.queue.status("t1")).replicas[0].attempts == 0


async def test_a_task_whose_directory_cannot_go_is_kept_for_the_next_sweep(
    setup: Setup, autojump_clock: trio.testing.MockClock
) -> None:
    s = setup
    await finish(s, "t1", b"x\n")
    (s.tasks / "t1.tar").mkdir()  # discard() unlinks <dir>.tar too: a directory there fails
    await trio.sleep(KEEP)
    assert await s.retention.sweep() == []
    assert (await s.queue.status("t1")).state is TaskState.SUCCEEDED
    assert await s.blobs.peer_quota.used(OWNER) == 2
    (s.tasks / "t1.tar").rmdir()
    assert await s.retention.sweep() == ["t1"]
