"""The worker agent's lease, offer and heartbeat logic, against fakes in virtual time.

Each test wires a real :class:`WorkerAgent` to fake schedulers (real dispatch frames over in-memory
streams), an in-memory VM backend and in-memory lease blobs, under ``autojump_clock``: nothing
sleeps in real time, and every wait is for a recorded event.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import blake3
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from catalog.caps import Caps
from catalog.dispatch import Heartbeat, Lost, WorkRequest, verify_report
from node.config import WorkerConfig
from node.identity import Identity
from node.limits import LIMITS
from node.units import GIB
from tests.worker.fake_backend import (
    FAKE_IMAGE_BYTES,
    IMAGE,
    Changes,
    FakeBackend,
    FakeLeaseBlobs,
    FakeVm,
    manifest,
    vm_result,
)
from tests.worker.fake_scheduler import FakeNetwork, FakeScheduler, grant, lease
from worker_role.agent import RETRY_FLOOR, STATE_FILE, WORK_WAIT, WorkerAgent
from worker_role.control_stream import HEARTBEAT_FLOOR, heartbeat_interval
from worker_role.errors import GuestFailedError, VmError, VmSetupError
from worker_role.policy import VM_OVERHEAD_MIB

T = TypeVar("T")
LIMIT_KEYS = {limit.config_key for limit in LIMITS}
TWO_VMS = {"max_concurrent_vms": 2, "max_vcpus": 2, "max_cpu_share": 2.0}
PATIENCE = 24 * 3600.0  # virtual seconds a wait may take before the test fails instead of hanging


async def until(changes: Changes, condition: Callable[[], bool]) -> None:
    with trio.fail_after(PATIENCE):
        await changes.wait_for(condition)


class Lab:
    """A worker agent wired to fakes. Set ``backend`` and the schedulers before :meth:`start`."""

    def __init__(self, data_dir: Path, nursery: trio.Nursery) -> None:
        self.data_dir = data_dir
        self.identity = Identity.generate()
        self.network = FakeNetwork(nursery)
        self.backend = FakeBackend()
        self.blobs = FakeLeaseBlobs(manifest())
        self._nursery = nursery
        self._scope = trio.CancelScope()

    def scheduler(self, peer_id: str, *, retry_after: float = 10.0) -> FakeScheduler:
        scheduler = FakeScheduler(peer_id, self.identity.public_bytes, retry_after=retry_after)
        return self.network.add(scheduler)

    async def start(self, **worker: Any) -> WorkerAgent:
        """Start an agent serving every scheduler added so far, with these ``[worker]`` keys."""
        limits = {key: worker.pop(key) for key in LIMIT_KEYS & worker.keys()}
        config = WorkerConfig(
            limits=limits,
            schedulers=tuple(self.network.schedulers),
            vm_dir=self.data_dir / "vm",
            **worker,
        )
        agent = WorkerAgent(
            self.network, self.blobs, self.identity, self.data_dir, config,
            open_backend=self.backend.open,
        )  # fmt: skip
        self._scope = trio.CancelScope()
        await self._nursery.start(self._run, agent)
        return agent

    async def _run(self, agent: WorkerAgent, *, task_status: trio.TaskStatus[None]) -> None:
        with self._scope:
            await agent.run(task_status=task_status)

    def stop(self) -> None:
        self._scope.cancel()

    async def running_vm(self, index: int = 0) -> FakeVm:
        await until(self.backend.changes, lambda: len(self.backend.vms) > index)
        return self.backend.vms[index]


async def _inline(fn: Callable[..., T], *args: Any, **_: Any) -> T:
    await trio.lowlevel.checkpoint()
    return fn(*args)


@pytest.fixture
async def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    # The agent writes its lease file in a worker thread. trio does not count a running thread
    # as work, so the autojump clock could jump while one runs and reorder timers around it;
    # inline, every run takes the same path.
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)
    async with trio.open_nursery() as nursery:
        yield Lab(tmp_path, nursery)
        nursery.cancel_scope.cancel()


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


# ---- a lease from offer to signed result -------------------------------------------------------


async def test_a_granted_lease_runs_under_the_grant_and_reports_a_signed_result(
    lab: Lab, autojump_clock: MockClock
) -> None:
    lab.blobs = FakeLeaseBlobs(manifest(command=("sh", "-c", "work"), timeout_s=30), fetch_s=4.0)
    lab.backend = FakeBackend(output=[("stdout", b"live\n")])
    a = lab.scheduler("sched-a")
    key, caps = lease(1), Caps(vcpus=1, memory_mib=512, disk_mib=128)
    a.work.append(grant(key, caps=caps, max_runtime=90.2))
    await lab.start(max_memory=GIB, max_disk=GIB)

    vm = await lab.running_vm()
    assert vm.image == IMAGE
    assert vm.caps == caps
    assert vm.task.argv == ("sh", "-c", "work")
    assert (vm.task.cwd, dict(vm.task.env)) == ("/work", {"LANG": "C"})
    # The grant's max_runtime, rounded up to whole seconds; the manifest's 30 s is not used.
    assert vm.task.timeout_s == 91
    # Heartbeats start with the grant, and the scheduler hears at once (not a heartbeat interval
    # later) that the VM runs, after the image took 4 s to fetch: it counts max runtime from there.
    await until(a.changes, lambda: any(key in h.running for h in a.of_type(Heartbeat)))
    granted, heartbeats = a.times_of(WorkRequest)[0], a.of_type(Heartbeat)
    assert a.times_of(Heartbeat)[:2] == [granted, granted + 4.0] == [granted, vm.started_at]
    assert [h.running for h in heartbeats[:2]] == [(), (key,)]
    # ... and how much of the image it holds: nothing at the grant, all of it once the VM runs.
    assert [h.fetched for h in heartbeats[:2]] == [(0,), (FAKE_IMAGE_BYTES,)]

    vm.finish(vm_result(exit_code=7, stdout=b"out\n", stderr=b"err\n", out_tar=b"tar"))
    await until(a.changes, lambda: key in a.results and bool(a.logs))
    report = a.results[key]
    assert verify_report(report, lab.identity.public_bytes)
    assert report.exit_code == 7
    assert report.stdout_digest == blake3.blake3(b"out\n").digest()
    assert report.stderr_digest == blake3.blake3(b"err\n").digest()
    published = lab.blobs.published
    assert published[report.stdout_blob] == b"out\n"
    assert published[report.stderr_blob] == b"err\n"
    assert report.archive_blob is not None
    assert published[report.archive_blob] == b"tar"
    assert [(c.lease, c.stream, c.data) for c in a.logs] == [(key, "stdout", b"live\n")]
    assert vm.destroyed
    assert not a.of_type(Lost)
    # The lease is over and its room is back: the next offer has all of it, image included.
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 2)
    first, second = (w.offer for w in a.of_type(WorkRequest))
    assert second.room == first.room
    assert second.images == {grant(key).image_id}


# ---- offers: room, resting schedulers, shares ---------------------------------------------------


async def test_offers_only_the_room_the_policy_leaves_and_none_when_it_is_full(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work += [grant(lease(n), caps=Caps(memory_mib=m)) for n, m in [(1, 768), (2, 256)]]
    # Each VM costs the host VM_OVERHEAD_MIB beyond its guest memory, and the limit counts it.
    await lab.start(max_memory=GIB + 2 * (VM_OVERHEAD_MIB << 20), **TWO_VMS)
    first = await lab.running_vm(0)
    await lab.running_vm(1)
    offered = [w.offer.room.memory_mib for w in a.of_type(WorkRequest)]
    assert offered == [1024 + VM_OVERHEAD_MIB, 256]

    await trio.sleep(3600)  # virtual: an hour of heartbeats with no room left
    assert len(a.of_type(WorkRequest)) == 2
    assert len(a.of_type(Heartbeat)) > 300

    first.finish(vm_result())
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 3)
    assert a.of_type(WorkRequest)[2].offer.room.memory_mib == 768


async def test_the_result_is_reported_while_the_vm_is_torn_down_and_its_room_held_till_then(
    lab: Lab, autojump_clock: MockClock
) -> None:
    lab.backend = FakeBackend(teardown_s=5.0)
    a = lab.scheduler("sched-a")
    a.work += [grant(lease(1)), grant(lease(2))]
    await lab.start(max_concurrent_vms=1)
    first = await lab.running_vm(0)
    first.finish(vm_result(stdout=b"one"))
    ended = trio.current_time()
    await until(a.changes, lambda: lease(1) in a.results)
    assert trio.current_time() - ended < 1.0  # reported, not after the 5 s teardown
    assert not first.destroyed
    await lab.running_vm(1)  # the next lease starts only once the first VM is gone
    assert first.destroyed
    assert trio.current_time() - ended >= 5.0


@pytest.mark.parametrize(
    "error", [VmError("destroy vmlend-x: libvirtd went away"), OSError(5, "Input/output error")]
)
async def test_a_vm_that_fails_to_go_after_its_result_costs_neither_the_result_nor_the_agent(
    lab: Lab, autojump_clock: MockClock, error: VmError | OSError
) -> None:
    lab.backend = FakeBackend(teardown_error=error)
    a = lab.scheduler("sched-a")
    a.work += [grant(lease(1)), grant(lease(2))]
    await lab.start(max_concurrent_vms=1)
    (await lab.running_vm(0)).finish(vm_result(stdout=b"one"))
    await until(a.changes, lambda: lease(1) in a.results)
    (await lab.running_vm(1)).finish(vm_result(stdout=b"two"))  # the agent lends on
    await until(a.changes, lambda: lease(2) in a.results)
    assert a.of_type(Lost) == []


async def test_a_scheduler_without_work_is_asked_again_only_after_its_retry_after(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a", retry_after=7.5)
    await lab.start()
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 4)
    assert gaps(a.times_of(WorkRequest)) == [7.5, 7.5, 7.5]


async def test_with_one_scheduler_a_request_waits_there_and_is_renewed_when_it_comes_back_empty(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a", retry_after=7.5)
    a.answer_delay[WorkRequest] = WORK_WAIT  # held for all the time the worker would wait
    await lab.start()
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 4)
    assert all(r.wait == WORK_WAIT for r in a.of_type(WorkRequest))
    # Nothing came in the hold: asked again at once, not after a rest on top of it.
    assert gaps(a.times_of(WorkRequest)) == [WORK_WAIT] * 3


async def test_a_scheduler_cannot_make_a_waiting_worker_ask_in_a_loop(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a", retry_after=0.001)  # "no work" at once, "ask again now"
    await lab.start()
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 4)
    assert gaps(a.times_of(WorkRequest)) == [RETRY_FLOOR] * 3


async def test_with_two_schedulers_to_ask_no_request_waits_at_either(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a, b = lab.scheduler("sched-a", retry_after=7.5), lab.scheduler("sched-b", retry_after=7.5)
    lab.network.reachable = trio.Event()  # both are connected before the first offer
    await lab.start()
    await until(lab.network.changes, lambda: lab.network.dialling == 2)
    lab.network.reachable.set()
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) >= 2)
    await until(b.changes, lambda: len(b.of_type(WorkRequest)) >= 2)
    first = min(a.times_of(WorkRequest)[0], b.times_of(WorkRequest)[0])
    asked_first = a if a.times_of(WorkRequest)[0] == first else b
    # Asked while the other was ready too: no wait; the second asked, the first resting: wait
    # no longer than that rest has left.
    assert asked_first.of_type(WorkRequest)[0].wait is None
    for sched in (a, b):
        for request in sched.of_type(WorkRequest):
            assert request.wait is None or request.wait <= 7.5


async def test_work_is_taken_from_two_schedulers_in_proportion_to_their_shares(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a, b = lab.scheduler("sched-a"), lab.scheduler("sched-b")
    a.work += [grant(lease(n)) for n in range(100, 120)]
    b.work += [grant(lease(n)) for n in range(200, 220)]
    lab.network.reachable = trio.Event()  # both are connected before the first offer
    await lab.start(shares=(("sched-a", 3), ("sched-b", 1)))
    await until(lab.network.changes, lambda: lab.network.dialling == 2)
    lab.network.reachable.set()
    for n in range(8):
        (await lab.running_vm(n)).finish(vm_result())
    picked = ["a" if g.lease.task_id.startswith("task1") else "b" for g in lab.blobs.grants[:8]]
    assert (picked[:4].count("a"), picked.count("a")) == (3, 6), picked


# ---- stopping and losing leases -----------------------------------------------------------------


async def test_a_pushed_stop_destroys_the_vm_and_reports_nothing(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1)))
    await lab.start()
    vm = await lab.running_vm()
    await a.push_stop((lease(1),))
    await until(lab.backend.changes, lambda: vm.destroyed)
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 2)  # its room is back
    assert not a.results
    assert not a.of_type(Lost)


async def test_a_stop_in_a_heartbeat_ack_destroys_the_vm(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1), lease_timeout=30.0))
    await lab.start()
    vm = await lab.running_vm()
    a.stop_on_ack.add(lease(1))
    await until(lab.backend.changes, lambda: vm.destroyed)
    last_heartbeat = a.times_of(Heartbeat)[-1]
    assert trio.current_time() == last_heartbeat
    assert last_heartbeat - vm.started_at <= 10.0
    assert not a.results
    assert not a.of_type(Lost)


async def test_a_scheduler_cannot_stop_another_schedulers_lease(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a, b = lab.scheduler("sched-a"), lab.scheduler("sched-b")
    a.work.append(grant(lease(1)))
    await lab.start()
    vm = await lab.running_vm()
    await until(b.changes, lambda: bool(b.streams))
    await b.push_stop((lease(1),))
    b.stop_on_ack.add(lease(1))
    await trio.sleep(60)  # virtual
    assert not vm.destroyed
    await a.push_stop((lease(1),))
    await until(lab.backend.changes, lambda: vm.destroyed)


async def test_a_lease_whose_vm_fails_is_reported_lost(lab: Lab, autojump_clock: MockClock) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1)))
    await lab.start()
    vm = await lab.running_vm()
    vm.fail(GuestFailedError("guest vmlend-x ended without a result"))
    await until(a.changes, lambda: bool(a.of_type(Lost)))
    assert a.of_type(Lost) == [Lost(leases=(lease(1),))]
    assert vm.destroyed
    assert not a.results


async def test_a_grant_beyond_the_lending_policy_is_refused_and_reported_lost(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1), caps=Caps(memory_mib=4096)))
    await lab.start(max_memory=GIB)
    await until(a.changes, lambda: bool(a.of_type(Lost)))
    assert a.of_type(Lost) == [Lost(leases=(lease(1),))]
    assert not lab.backend.vms


async def test_leases_held_at_a_crash_are_reported_lost_on_the_next_start(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1)))
    await lab.start()
    await lab.running_vm()
    state = trio.Path(lab.data_dir / STATE_FILE)
    left_by_a_crash = await state.read_text()  # what the file holds while the lease runs
    lab.stop()
    await trio.testing.wait_all_tasks_blocked()
    await state.write_text(left_by_a_crash)

    told_before = len(a.received)
    await lab.start()
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 2)
    assert a.received[told_before].message == Lost(leases=(lease(1),))  # before anything else
    assert json.loads(await state.read_text()) == {"leases": {}, "results": {}}  # told once


@pytest.mark.parametrize("torn", ['{"sched-a": [["t1", 0, ', "[1, 2]", '{"sched-a": 7}'])
async def test_a_torn_lease_file_is_set_aside_and_the_agent_lends_on(
    lab: Lab, autojump_clock: MockClock, torn: str
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1)))
    await trio.Path(lab.data_dir / STATE_FILE).write_text(torn)  # a crash mid-write, say
    await lab.start()
    await lab.running_vm()  # it started, and serves
    assert [p.name.split("-")[0] for p in lab.data_dir.glob(f"{STATE_FILE}.corrupt-*")] == [
        f"{STATE_FILE}.corrupt"
    ]


async def test_a_machine_that_cannot_run_vms_keeps_running_without_lending(
    lab: Lab, autojump_clock: MockClock
) -> None:
    lab.backend = FakeBackend(open_error=VmSetupError("libvirt is unreachable"))
    lab.scheduler("sched-a").work.append(grant(lease(1)))
    agent = await lab.start()
    assert agent.problem == "libvirt is unreachable"
    await trio.sleep(60)  # virtual
    assert lab.network.dialling == 0


# ---- heartbeats -----------------------------------------------------------------------------


def test_the_heartbeat_interval_is_a_third_of_the_shortest_lease_timeout_with_a_floor() -> None:
    assert heartbeat_interval([]) is None
    assert heartbeat_interval([30.0]) == 10.0
    assert heartbeat_interval([30.0, 6.0, 90.0]) == 2.0
    assert heartbeat_interval([0.3]) == HEARTBEAT_FLOOR
    assert heartbeat_interval([math.ulp(0.0)]) == HEARTBEAT_FLOOR


async def test_heartbeats_follow_the_shortest_lease_timeout_held_for_that_scheduler(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a, b = lab.scheduler("sched-a"), lab.scheduler("sched-b")
    a.work.append(grant(lease(1), lease_timeout=30.0))
    b.work.append(grant(lease(2), lease_timeout=9.0))
    await lab.start(max_concurrent_vms=3, max_vcpus=3, max_cpu_share=3.0)
    await lab.running_vm(1)
    await trio.sleep(40)  # virtual
    assert gaps(a.times_of(Heartbeat)[-4:]) == [10.0, 10.0, 10.0]
    assert gaps(b.times_of(Heartbeat)[-4:]) == [3.0, 3.0, 3.0]

    a.work.append(grant(lease(3), lease_timeout=6.0))  # a now holds 30 s and 6 s leases
    third = await lab.running_vm(2)
    await trio.sleep(20)  # virtual
    assert a.of_type(Heartbeat)[-1].leases == (lease(1), lease(3))
    assert gaps(a.times_of(Heartbeat)[-4:]) == [2.0, 2.0, 2.0]

    third.finish(vm_result())
    a.work.append(grant(lease(4), lease_timeout=0.3))  # a third of it is below the floor
    await lab.running_vm(3)
    await trio.sleep(10)  # virtual
    assert a.of_type(Heartbeat)[-1].leases == (lease(1), lease(4))
    assert gaps(a.times_of(Heartbeat)[-4:]) == [HEARTBEAT_FLOOR] * 3
    assert gaps(b.times_of(Heartbeat)[-4:]) == [3.0, 3.0, 3.0]


# ---- answers matched by request ID --------------------------------------------------------------


async def test_answers_are_matched_to_requests_by_id_not_by_order(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1), lease_timeout=3.0))
    await lab.start(**TWO_VMS)
    first = await lab.running_vm(0)
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 2)  # answered NoWork
    a.answer_delay[WorkRequest] = 5.0
    a.work.append(grant(lease(2)))
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) == 3)
    asked = trio.current_time()

    # While the work request waits for its answer, heartbeats go out and their acks come back
    # first: the one that asks to stop lease 1 is taken for the heartbeat, not the work request.
    a.stop_on_ack.add(lease(1))
    await until(lab.backend.changes, lambda: first.destroyed)
    assert trio.current_time() - asked <= 1.0
    second = await lab.running_vm(1)
    assert trio.current_time() - asked == 5.0
    assert [g.lease for g in lab.blobs.grants] == [lease(1), lease(2)]
    assert not second.destroyed
    assert len(a.streams) == 1


async def test_an_answer_to_no_request_of_ours_fails_the_stream(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work += [grant(lease(1)), grant(lease(2))]
    misnumbered: list[int] = []

    def renumber(request_id: int) -> int:
        if misnumbered:
            return request_id
        misnumbered.append(request_id)
        return request_id + 1  # the first answer names a request the agent never sent

    a.renumber = renumber
    await lab.start()
    await lab.running_vm(0)
    # The grant of lease 1 came under an unknown ID: the agent dropped that stream without
    # taking it, dialled again, and took lease 2 on the new stream.
    assert len(a.streams) == 2
    assert [g.lease for g in lab.blobs.grants] == [lease(2)]
