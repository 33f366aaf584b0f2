"""What peers can make a scheduler store: within one quota per peer, and collected again when
the request they made it for is refused (``catalog.peer_quota``), over the real protocols."""

from __future__ import annotations

import pytest
import trio

from catalog.blob import BlobId
from catalog.dispatch import (
    MAX_RESULT_OUTPUT,
    ResultAck,
    ResultStatus,
    decode_reply,
    encode_request,
)
from catalog.owner_protocol import Submitted
from node.errors import StreamBrokenError
from scheduler_role.lifecycle import FINISHED_TASK_STATES
from scheduler_role.task_store import MAX_ARCHIVE_BYTES, MAX_ARCHIVE_MEMBERS
from tests.hostile.conftest import Node, Scheduler
from tests.hostile.test_results import dispatch_stream, report_of, take_lease
from tests.hostile.test_tasks_protocol import (
    assert_refused,
    still_serves,
    submit_with_archive,
    tar_of,
)
from tests.scheduler.conftest import spec

FILES_LIMIT = MAX_ARCHIVE_BYTES + MAX_ARCHIVE_MEMBERS * 1024  # reserved while files are fetched


async def stored(node: Node) -> tuple[set[BlobId], int]:
    """The blobs a node holds and the bytes its chunks take."""
    blobs = {info.blob_id for info in await node.blobs.blobs.ls()}
    return blobs, (await node.blobs.blobs.chunks.usage()).used_bytes


async def test_an_owner_past_its_quota_is_refused_and_nothing_more_is_stored(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, owner = scheduler_and_peer
    quota = scheduler.blobs.peer_quota
    quota.quota = FILES_LIMIT + (1 << 20)
    # What it made the scheduler store before (results of its tasks, say) still counts.
    await quota.charge(owner.p2p.peer_id, BlobId(b"\1" * 32), 2 << 20, created=False)
    before = await stored(scheduler)
    answer = await submit_with_archive(owner, scheduler, "t-q", ["a"], tar_of([("a", b"x")]))
    assert_refused(answer, "quota_exceeded")
    assert "quota" in answer.message
    assert await stored(scheduler) == before
    assert not (scheduler.home / "tasks" / "t-q").exists()
    # Another peer's quota is its own: the same submit from it would be fetched.
    assert await quota.used(owner.p2p.peer_id) == 2 << 20
    await still_serves(owner, scheduler)


async def test_the_files_of_a_refused_submit_are_collected(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, owner = scheduler_and_peer
    before = await stored(scheduler)
    archive = tar_of([("a", b"x" * 300_000), ("b", b"not named by the task")])
    answer = await submit_with_archive(owner, scheduler, "t-r", ["a"], archive)
    assert_refused(answer, "invalid_task")  # fetched, then refused as it unpacked
    assert await stored(scheduler) == before
    assert await scheduler.blobs.peer_quota.used(owner.p2p.peer_id) == 0


async def test_an_accepted_tasks_files_are_kept_in_its_directory_only(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, owner = scheduler_and_peer
    before = await stored(scheduler)
    answer = await submit_with_archive(owner, scheduler, "t-a", ["a"], tar_of([("a", b"hi")]))
    assert isinstance(answer, Submitted), answer
    assert (scheduler.home / "tasks" / "t-a" / "files" / "a").read_bytes() == b"hi"
    assert await stored(scheduler) == before  # the archive's blob is not kept besides
    with trio.fail_after(20):  # its assembly fails here (no boot files): let it end first
        while (await scheduler.service.queue.status("t-a")).state not in FINISHED_TASK_STATES:
            await scheduler.service.wait_changed(1.0)


async def test_the_blobs_of_a_result_that_does_not_count_are_collected(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, worker = scheduler_and_peer
    await scheduler.service.queue.submit(spec("t"))
    before = await stored(scheduler)
    async with await dispatch_stream(worker, scheduler) as stream:
        grant = await take_lease(stream)
        lying = await report_of(worker, grant.lease, b"x" * 200_000, signed_stdout=b"42\n")
        await stream.send(encode_request(2, lying))
        with trio.fail_after(20), pytest.raises(StreamBrokenError):
            await stream.receive()
    assert await stored(scheduler) == before
    assert await scheduler.blobs.peer_quota.used(worker.p2p.peer_id) == 0


async def test_a_worker_past_its_quota_is_refused_before_any_fetch(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, worker = scheduler_and_peer
    scheduler.blobs.peer_quota.quota = MAX_RESULT_OUTPUT - 1  # not even one stdout fits
    await scheduler.service.queue.submit(spec("t"))
    before = await stored(scheduler)
    async with await dispatch_stream(worker, scheduler) as stream:
        grant = await take_lease(stream)
        await stream.send(encode_request(2, await report_of(worker, grant.lease, b"42\n")))
        with trio.fail_after(20), pytest.raises(StreamBrokenError):
            await stream.receive()
    assert await stored(scheduler) == before
    assert (await scheduler.service.queue.results("t")) == []


async def test_a_counted_result_is_charged_to_the_tasks_owner_until_the_task_is_released(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, worker = scheduler_and_peer
    quota = scheduler.blobs.peer_quota
    await scheduler.service.queue.submit(spec("t"))  # its owner is "owner1"
    before = await stored(scheduler)
    async with await dispatch_stream(worker, scheduler) as stream:
        grant = await take_lease(stream)
        await stream.send(encode_request(2, await report_of(worker, grant.lease, b"42\n")))
        with trio.fail_after(20):
            reply = decode_reply(await stream.receive())
    assert reply == (2, ResultAck(lease=grant.lease, status=ResultStatus.RECORDED))
    assert await quota.used(worker.p2p.peer_id) == 0
    assert await quota.used("owner1") == 3  # b"42\n" and an empty stderr
    freed = await quota.release_task("t")  # what forgetting the task will do
    assert len(freed) == 2
    for blob in freed:
        await scheduler.blobs.rm(blob)
    await scheduler.blobs.blobs.gc()
    assert await stored(scheduler) == before


async def test_the_files_a_task_keeps_count_against_its_owners_quota(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    """An accepted task's unpacked files stay in its directory for its life: before, they were
    charged to no one, so an owner could fill the disk with many tasks, each within quota."""
    scheduler, owner = scheduler_and_peer
    quota = scheduler.blobs.peer_quota
    quota.quota = FILES_LIMIT + 1000  # room for the fetch, and for two tasks' 600 bytes
    for n in range(2):
        answer = await submit_with_archive(
            owner, scheduler, f"t-f{n}", ["a"], tar_of([("a", b"x" * 600)])
        )
        assert isinstance(answer, Submitted), answer
        assert await quota.used(owner.p2p.peer_id) == 600 * (n + 1)
    answer = await submit_with_archive(owner, scheduler, "t-f2", ["a"], tar_of([("a", b"x" * 600)]))
    assert_refused(answer, "quota_exceeded")
    assert not (scheduler.home / "tasks" / "t-f2").exists()
    assert await quota.release_task("t-f0") == []  # the files' entry is no blob to collect
    assert await quota.used(owner.p2p.peer_id) == 600
    with trio.fail_after(20):  # their assemblies fail here (no boot files): let them end first
        for task_id in ("t-f0", "t-f1"):
            while (  # noqa: ASYNC110
                await scheduler.service.queue.status(task_id)
            ).state not in FINISHED_TASK_STATES:
                await trio.sleep(0.05)
