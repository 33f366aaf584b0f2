"""An owner cannot fill a scheduler for good, nor lose its results early: a full quota refuses
its submits, files or not; its finished tasks are forgotten after ``keep_finished`` (their
directories, charges and result blobs with them), and then it may submit again. Over the real
protocols (scheduler_role.retention)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from catalog.dispatch import ResultAck, ResultStatus, decode_reply, encode_request
from catalog.owner_protocol import Submitted, TaskResults, TaskStatus
from scheduler_role.lifecycle import FINISHED_TASK_STATES, TaskState
from scheduler_role.retention import DEFAULT_KEEP_FINISHED
from scheduler_role.service import SchedulerService
from tests.hostile.conftest import Node, Scheduler, _no_boot_files, _node
from tests.hostile.test_peer_quota import stored
from tests.hostile.test_results import dispatch_stream, report_of, take_lease
from tests.hostile.test_tasks_protocol import (
    ask,
    assert_refused,
    submit,
    submit_with_archive,
    tar_of,
    task_map,
)
from tests.scheduler.conftest import spec


async def until_finished(scheduler: Scheduler, task_id: str) -> None:
    with trio.fail_after(20):
        while (await scheduler.service.queue.status(task_id)).state not in FINISHED_TASK_STATES:
            await scheduler.service.wait_changed(1.0)


async def run_to_success(scheduler: Scheduler, owner: Node, worker: Node, task_id: str) -> None:
    """A task of ``owner``'s that ``worker`` runs, its result counted (and charged to owner)."""
    # The owner names the worker, so its one result decides (no other network to confirm it).
    mine = replace(spec(task_id), owner=owner.p2p.peer_id, workers=frozenset({worker.p2p.peer_id}))
    await scheduler.service.queue.submit(mine)
    async with await dispatch_stream(worker, scheduler) as stream:
        grant = await take_lease(stream)
        await stream.send(encode_request(2, await report_of(worker, grant.lease, b"42\n" * 1000)))
        with trio.fail_after(20):
            reply = decode_reply(await stream.receive())
    assert reply == (2, ResultAck(lease=grant.lease, status=ResultStatus.RECORDED))
    assert (await scheduler.service.queue.status(task_id)).state is TaskState.SUCCEEDED


async def test_an_owner_at_its_quota_is_refused_until_its_finished_tasks_are_forgotten(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> None:
    scheduler, owner, worker = scheduler_and_peers
    me = owner.p2p.peer_id
    quota = scheduler.blobs.peer_quota
    before = await stored(scheduler)
    answer = await submit_with_archive(owner, scheduler, "t-files", ["a"], tar_of([("a", b"hi")]))
    assert isinstance(answer, Submitted), answer
    await until_finished(scheduler, "t-files")  # its assembly fails here (no boot files)
    await run_to_success(scheduler, owner, worker, "t-run")
    assert await quota.used(me) == 3000 + 2  # the result's stdout (its stderr is empty), the files
    quota.quota = await quota.used(me)  # full

    # A full quota refuses even a task without files: its results would be charged too.
    answer = await ask(owner, scheduler, submit("t-next", task_map()))
    assert_refused(answer, "quota_exceeded")
    assert "quota" in answer.message
    assert "forgotten" in answer.message

    # Within keep_finished a finished task answers in full.
    assert await scheduler.service.retention.sweep() == []
    status = await ask(owner, scheduler, {"type": "status", "task_id": "t-run"})
    assert isinstance(status, TaskStatus), status
    assert status.state == "succeeded"
    results = await ask(owner, scheduler, {"type": "results", "task_id": "t-run"})
    assert isinstance(results, TaskResults), results
    assert results.stdout == b"42\n" * 1000
    assert (scheduler.home / "tasks" / "t-files").is_dir()

    # Past it, both are forgotten with everything they held.
    later = time.time() + DEFAULT_KEEP_FINISHED
    assert sorted(await scheduler.service.retention.sweep(now=later)) == ["t-files", "t-run"]
    assert await quota.used(me) == 0
    assert await quota.used(worker.p2p.peer_id) == 0
    assert await stored(scheduler) == before
    assert not (scheduler.home / "tasks" / "t-files").exists()
    for request in ({"type": "status"}, {"type": "results"}, {"type": "wait", "timeout": 1.0},
                    {"type": "cancel"}):  # fmt: skip
        answer = await ask(owner, scheduler, request | {"task_id": "t-run"})
        assert_refused(answer, "unknown_task")
        assert "kept 168h after it ends, then forgotten" in answer.message, answer

    answer = await ask(owner, scheduler, submit("t-next", task_map()))
    assert isinstance(answer, Submitted), answer
    assert answer.new


async def test_the_quota_check_leaves_a_repeated_submit_idempotent(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, owner = scheduler_and_peer
    assert isinstance(await ask(owner, scheduler, submit("t", task_map())), Submitted)
    scheduler.blobs.peer_quota.quota = 0
    again = await ask(owner, scheduler, submit("t", task_map()))
    assert isinstance(again, Submitted), again
    assert not again.new
    assert_refused(await ask(owner, scheduler, submit("u", task_map())), "quota_exceeded")


@pytest.fixture
async def short_lived(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, Node]]:
    """A scheduler that keeps finished tasks for one second, and an owner."""
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        base = await _node(stack, nursery, tmp_path / "scheduler")
        service = SchedulerService(
            base.p2p, base.blobs, base.home, boot=_no_boot_files, keep_finished=1.0
        )
        await nursery.start(service.run)
        owner = await _node(stack, nursery, tmp_path / "owner")
        await owner.p2p.connect(base.p2p.addrs[0])
        yield Scheduler(base.p2p, base.blobs, base.home, service), owner
        nursery.cancel_scope.cancel()


async def test_the_scheduler_forgets_finished_tasks_by_itself(
    short_lived: tuple[Scheduler, Node],
) -> None:
    scheduler, owner = short_lived
    answer = await submit_with_archive(owner, scheduler, "t", ["a"], tar_of([("a", b"hi")]))
    assert isinstance(answer, Submitted), answer
    with trio.fail_after(30):
        while scheduler.service.retention.forgotten == 0:
            await scheduler.service.wait_changed(1.0)
    assert not (scheduler.home / "tasks" / "t").exists()
    answer = await ask(owner, scheduler, {"type": "status", "task_id": "t"})
    assert_refused(answer, "unknown_task")
    assert "kept 1s after it ends" in answer.message
