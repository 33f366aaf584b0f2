"""Placement and trust on the real queue (sqlite), with the default policy: networks, not keys,
hold replicas and agree; new workers are confirmed; conduct goes on each worker's record."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from catalog.dispatch import LeaseGrant, NoWork, ResultStatus
from catalog.errors import TaskFileError
from catalog.task_wire import task_from_wire, task_to_wire
from catalog.taskfile import loads
from node.errors import LocalProtocolError
from node.store import Database
from scheduler_role import schema
from scheduler_role.lifecycle import TaskState
from scheduler_role.owner_api import spec_of
from scheduler_role.queue import Queue
from scheduler_role.trust import Policy, WorkerRecord
from tests.scheduler.conftest import VirtualClock, offer, report, spec

ATTACKER = "198.51.100.0/24"
HONEST = "203.0.113.0/24"
OTHER = "192.0.2.0/24"


@pytest.fixture
async def strict(tmp_path: Path) -> AsyncIterator[Queue]:
    async with Queue.open(tmp_path / "s.db", clock=VirtualClock(), lease_timeout=30) as q:
        yield q


async def grant(q: Queue, worker: str, network: str) -> LeaseGrant:
    got = await q.lease(worker, offer(), network=network)
    assert isinstance(got, LeaseGrant), got
    return got


async def test_replicas_of_a_task_never_go_to_two_workers_on_one_network(strict: Queue) -> None:
    await strict.submit(spec("t", replicas=3, quorum=2))
    await grant(strict, "a1", ATTACKER)
    for n in range(2, 6):
        assert isinstance(await strict.lease(f"a{n}", offer(), network=ATTACKER), NoWork)
    await grant(strict, "h", HONEST)
    await grant(strict, "o", OTHER)


async def test_a_network_that_reported_gets_no_other_replica(strict: Queue) -> None:
    await strict.submit(spec("t", replicas=2, quorum=2))
    first = await grant(strict, "a1", ATTACKER)
    await strict.report("a1", report(first.lease, stdout="forged"))
    assert isinstance(await strict.lease("a2", offer(), network=ATTACKER), NoWork)
    await grant(strict, "h", HONEST)


async def test_an_untrusted_worker_holds_few_leases(strict: Queue) -> None:
    for n in range(5):
        await strict.submit(spec(f"t{n}"))
    limit = strict.policy.untrusted_max_leases
    for _ in range(limit):
        await grant(strict, "new", ATTACKER)
    refused = await strict.lease("new", offer(), network=ATTACKER)
    assert isinstance(refused, NoWork)
    assert "not yet trusted" in refused.reason


async def test_identities_on_one_network_cannot_take_turns_until_attempts_run_out(
    strict: Queue, autojump_clock: trio.abc.Clock
) -> None:
    await strict.submit(spec("t", replicas=2, quorum=2, max_attempts=3))
    got = await grant(strict, "a1", ATTACKER)
    await trio.sleep(strict.lease_timeout + 1)
    await strict.tick()  # a1 let it lapse
    for n in range(2, 6):
        assert isinstance(await strict.lease(f"a{n}", offer(), network=ATTACKER), NoWork)
    status = await strict.status("t")
    assert status.state is TaskState.ACTIVE
    assert status.replicas[got.lease.replica].attempts == 1
    assert (await strict.record_of("a1")).expired == 1
    await grant(strict, "h", HONEST)


async def test_a_new_workers_result_is_confirmed_from_another_network(strict: Queue) -> None:
    await strict.submit(spec("t"))
    first = await grant(strict, "a1", ATTACKER)
    await strict.report("a1", report(first.lease, stdout="42"))
    status = await strict.status("t")
    assert status.state is TaskState.ACTIVE  # one untrusted result decides nothing
    assert len(status.replicas) == 2  # adaptive replication: a replica was added
    assert isinstance(await strict.lease("a2", offer(), network=ATTACKER), NoWork)
    second = await grant(strict, "h", HONEST)
    assert second.lease.replica == 1
    await strict.report("h", report(second.lease, stdout="42"))
    status = await strict.status("t")
    assert status.state is TaskState.SUCCEEDED
    for worker in ("a1", "h"):
        assert await strict.record_of(worker) == WorkerRecord(agreed=1, streak=1)


async def test_a_forger_is_outvoted_and_recorded_when_a_trusted_worker_answers(
    tmp_path: Path,
) -> None:
    async with Queue.open(
        tmp_path / "s.db", clock=VirtualClock(), policy=Policy(trust_after=1)
    ) as q:
        # h earns trust: its first result is confirmed by o on a third network.
        await q.submit(spec("warm"))
        await q.report("h", report((await grant(q, "h", HONEST)).lease, stdout="1"))
        await q.report("o", report((await grant(q, "o", OTHER)).lease, stdout="1"))
        assert q.policy.trusted(await q.record_of("h"))
        await q.submit(spec("t"))
        forged = await grant(q, "a1", ATTACKER)
        await q.report("a1", report(forged.lease, stdout="forged"))
        honest = await grant(q, "h", HONEST)
        await q.report("h", report(honest.lease, stdout="honest"))
        status = await q.status("t")
        results = await q.results("t")
        assert status.state is TaskState.SUCCEEDED
        assert status.dissenters == ("a1",)
        agreed = [r for r in results if r.digest == status.agreed]
        assert [r.worker for r in agreed] == ["h"]
        assert await q.record_of("a1") == WorkerRecord(disagreed=1)


async def test_results_differing_in_stderr_only_do_not_agree(strict: Queue) -> None:
    from dataclasses import replace

    await strict.submit(spec("t", replicas=2, quorum=2))
    one = await grant(strict, "a", ATTACKER)
    two = await grant(strict, "h", HONEST)
    await strict.report("a", report(one.lease))
    await strict.report("h", replace(report(two.lease), stderr_digest=b"e" * 32))
    status = await strict.status("t")
    assert status.state is TaskState.FAILED
    assert "results disagree" in status.reason


async def test_a_task_may_name_the_only_workers_that_run_it(strict: Queue) -> None:
    from dataclasses import replace

    await strict.submit(replace(spec("t"), workers=frozenset({"mine"})))
    assert isinstance(await strict.lease("stranger", offer(), network=OTHER), NoWork)
    got = await grant(strict, "mine", HONEST)
    # The owner vouches for its workers: a listed worker's result decides alone.
    status, _ = await strict.report("mine", report(got.lease))
    assert status.status is ResultStatus.RECORDED
    assert (await strict.status("t")).state is TaskState.SUCCEEDED


async def test_min_quorum_applies_to_every_task(tmp_path: Path) -> None:
    async with Queue.open(
        tmp_path / "s.db", clock=VirtualClock(), policy=Policy(min_quorum=2)
    ) as q:
        await q.submit(spec("t"))
        status = await q.status("t")
        assert (status.spec.replicas, status.spec.quorum) == (2, 2)


async def test_a_version_one_store_migrates_and_keeps_its_results(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with Database.open(path, schema.MIGRATIONS[:1]) as db:

        def old(conn: sqlite3.Connection) -> None:
            values = schema.spec_values(spec("old"))
            del values["workers"]
            values |= {"state": "active", "submitted_at": 0.0}
            conn.execute(
                f"INSERT INTO tasks ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
            conn.execute("INSERT INTO replicas (task_seq, idx, state) VALUES (1, 0, 'queued')")

        await db.transaction(old)
    async with Queue.open(path, clock=VirtualClock()) as q:
        got = await grant(q, "w", HONEST)
        assert got.lease.task_id == "old"


PEER = "12D3KooW" + "A" * 44
TASK = 'name = "t"\nos = "tiny"\ncommand = "true"\n'


def test_a_task_file_names_its_workers_and_the_scheduler_keeps_them() -> None:
    task = loads(TASK + f'[placement]\nworkers = ["{PEER}", "{PEER}"]\n')
    assert task.workers == (PEER,)
    again = task_from_wire(task_to_wire(task), base_dir=Path("/"))
    assert again.workers == (PEER,)
    assert spec_of(again, "t", "owner1", 0.0).workers == frozenset({PEER})
    old_owner = task_to_wire(loads(TASK))
    del old_owner["workers"]  # an owner from before [placement]
    assert task_from_wire(old_owner, base_dir=Path("/")).workers == ()


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ('workers = ["not-a-peer"]', "not a peer ID"),
        ("workers = []", "no worker"),
        ('hosts = ["x"]', "unknown key"),
    ],
)
def test_a_bad_placement_is_refused_naming_the_key(placement: str, message: str) -> None:
    with pytest.raises(TaskFileError, match=message):
        loads(TASK + f"[placement]\n{placement}\n")


def test_a_peer_cannot_send_a_worker_list_that_is_not_peer_ids() -> None:
    wire = task_to_wire(loads(TASK))
    wire["workers"] = ["../x"]
    with pytest.raises(LocalProtocolError):
        task_from_wire(wire, base_dir=Path("/"))
