"""Group commit: writes share a transaction but fail alone; a cancelled waiter's write lands."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from catalog.dispatch import Heartbeat, LeaseGrant, LeaseKey, NoWork, verify_report
from node.errors import StoreError
from node.identity import Identity
from scheduler_role.errors import UnknownTaskError
from scheduler_role.queue import Queue
from scheduler_role.trust import LAB
from tests.scheduler.conftest import VirtualClock, offer, report, spec


async def test_a_refused_write_does_not_undo_its_batch_mates(queue: Queue) -> None:
    outcomes: dict[str, object] = {}

    async def submit(name: str) -> None:
        outcomes[name] = await queue.submit(spec(name))

    async def cancel_unknown() -> None:
        with pytest.raises(UnknownTaskError):
            await queue.cancel("missing")
        outcomes["missing"] = "refused"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, "a")
        nursery.start_soon(cancel_unknown)
        nursery.start_soon(submit, "b")
    assert outcomes == {"a": True, "missing": "refused", "b": True}
    stats = queue.statistics()
    assert stats["writes"] == 3
    assert stats["commits"] < 3  # they did share a transaction
    assert (await queue.status("b")).spec.task_id == "b"


async def test_a_lease_granted_to_a_cancelled_caller_expires(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a"))
    with trio.CancelScope() as scope:
        scope.cancel()
        await queue.lease("w1", offer())  # cancelled while waiting for the commit
    # Writes commit in order, so once w2's has, the cancelled one has too.
    assert isinstance(await queue.lease("w2", offer()), NoWork)
    assert queue.held_by() == {"w1": 1}  # the grant was committed and is tracked...
    await trio.sleep(queue.lease_timeout + 1)
    await queue.tick()  # ...so it expires like any other and the replica goes back
    got = await queue.lease("w2", offer())
    assert isinstance(got, LeaseGrant)
    assert got.lease == LeaseKey("a", 0, 2)


async def test_closed_queue_refuses_writes(tmp_path: Path) -> None:
    async with Queue.open(tmp_path / "s.db", clock=VirtualClock(), policy=LAB) as q:
        pass
    with pytest.raises(StoreError, match="closed"):
        await q.submit(spec("a"))


async def test_running_heartbeat_is_persisted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Queue.open(path, clock=VirtualClock(), policy=LAB) as q:
        await q.submit(spec("a"))
        got = await q.lease("w1", offer())
        assert isinstance(got, LeaseGrant)
        await q.heartbeat("w1", Heartbeat(leases=(got.lease,), running=(got.lease,)))
    db = sqlite3.connect(path)
    assert db.execute("SELECT state FROM replicas").fetchall() == [("running",)]
    db.close()


def test_report_signature() -> None:
    worker, other = Identity.generate(), Identity.generate()
    unsigned = report(LeaseKey("a", 0, 1))
    signed = dataclasses.replace(unsigned, signature=worker.sign(unsigned.signed_bytes()))
    assert verify_report(signed, worker.public_bytes)
    assert not verify_report(signed, other.public_bytes)
    assert not verify_report(dataclasses.replace(signed, exit_code=1), worker.public_bytes)
