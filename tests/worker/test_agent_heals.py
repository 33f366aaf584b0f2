"""Issue 15, the worker's part: a worker that cannot run VMs asks for no work and says why, and a
finished result is kept until its scheduler has it, across a stop and across the agent's restart."""

from __future__ import annotations

import json
import logging

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from catalog.dispatch import Lost, ResultReport, WorkRequest, verify_report
from tests.worker import test_agent
from tests.worker.fake_backend import FakeBackend, vm_result
from tests.worker.fake_scheduler import grant, lease
from tests.worker.test_agent import Lab, until
from worker_role.agent import HEAL_INTERVAL, MAX_UNDELIVERED, STATE_FILE
from worker_role.errors import VmError

lab = test_agent.lab  # the agent wired to fakes


async def test_while_the_backend_cannot_run_vms_no_work_is_asked_and_the_agent_says_why(
    lab: Lab, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    lab.backend = FakeBackend()
    a = lab.scheduler("sched-a")
    a.work += [grant(lease(1)), grant(lease(2))]
    backend = lab.backend
    # libvirtd went away: the first start fails on it, and the backend then knows it is down.
    backend.start_error = VmError("create vmlend-x: the connection to libvirtd was lost")
    backend.healed = "cannot connect to libvirt at qemu:///system (is libvirtd running?)"
    caplog.set_level(logging.INFO, "vmlend.worker.agent")
    agent = await lab.start()
    await until(a.changes, lambda: bool(a.of_type(Lost)))
    assert a.of_type(Lost) == [Lost(leases=(lease(1),))]
    assert "lease task1/0#1 failed starting its VM: create vmlend-x" in caplog.text
    assert "destroy" not in caplog.text
    await trio.sleep(10 * HEAL_INTERVAL)  # virtual
    assert agent.problem == backend.healed
    assert len(a.of_type(WorkRequest)) == 1  # not one more while it cannot run them
    assert backend.heals >= 5  # it keeps trying
    assert "not asking for work: cannot connect to libvirt" in caplog.text
    # libvirtd is back: the agent asks again within one heal interval and runs the next lease.
    backend.start_error, backend.healed = None, None
    back = trio.current_time()
    vm = await lab.running_vm()
    assert trio.current_time() - back <= HEAL_INTERVAL
    assert agent.problem is None
    assert a.of_type(WorkRequest)[-1].offer is not None
    vm.finish(vm_result(stdout=b"ok"))
    await until(a.changes, lambda: lease(2) in a.results)


async def test_a_result_the_scheduler_has_not_taken_survives_a_restart_and_is_delivered(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1)))
    a.answer_delay[ResultReport] = 10_000.0  # the scheduler does not answer: it went away
    await lab.start()
    vm = await lab.running_vm()
    vm.finish(vm_result(exit_code=3, stdout=b"finished\n"))
    await until(a.changes, lambda: lease(1) in a.results)
    state = trio.Path(lab.data_dir / STATE_FILE)
    kept = json.loads(await state.read_text())
    assert kept["leases"] == {}
    assert [len(v) for v in kept["results"].values()] == [1]
    # The room is free while the result waits: the agent asks for more work.
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) >= 2)
    lab.stop()  # killed before the scheduler took the result
    await trio.testing.wait_all_tasks_blocked()

    a.results.clear()
    del a.answer_delay[ResultReport]
    told_before = len(a.received)
    await lab.start()
    await until(a.changes, lambda: lease(1) in a.results)
    report = a.results[lease(1)]
    assert verify_report(report, lab.identity.public_bytes)
    assert report.exit_code == 3
    after = [r.message for r in a.received[told_before:]]
    assert not [m for m in after if isinstance(m, Lost)]  # finished, not lost
    assert len(lab.backend.vms) == 1  # and not run again
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) >= 3)
    await trio.testing.wait_all_tasks_blocked()
    assert json.loads(await state.read_text()) == {"leases": {}, "results": {}}


async def test_a_stop_after_the_vm_finished_does_not_throw_its_result_away(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a")
    a.work.append(grant(lease(1)))
    a.answer_delay[ResultReport] = 10_000.0
    await lab.start()
    vm = await lab.running_vm()
    vm.finish(vm_result(stdout=b"done\n"))
    await until(a.changes, lambda: lease(1) in a.results)
    # The scheduler, restarted, let the lease lapse and says it is no longer ours; the result
    # is still sent (it decides whether it counts) until it is acked.
    a.stop_on_ack.add(lease(1))
    await a.push_stop((lease(1),), "no longer yours")
    a.results.clear()
    del a.answer_delay[ResultReport]
    await trio.sleep(60)  # the first request times out; the stream is replaced; sent again
    await until(a.changes, lambda: lease(1) in a.results)
    assert not a.of_type(Lost)


async def test_a_scheduler_that_never_takes_results_gets_no_more_work_past_a_bound(
    lab: Lab, autojump_clock: MockClock
) -> None:
    lab.backend = FakeBackend(result=vm_result(stdout=b"done\n"))  # every VM finishes at once
    a = lab.scheduler("sched-a")
    a.work += [grant(lease(n)) for n in range(MAX_UNDELIVERED + 8)]
    a.answer_delay[ResultReport] = 10_000.0  # hostile: it never acks a result
    await lab.start()
    await trio.sleep(600)  # virtual
    assert len(lab.backend.vms) == MAX_UNDELIVERED
    kept = json.loads(await trio.Path(lab.data_dir / STATE_FILE).read_text())
    assert len(kept["results"]["sched-a"]) == MAX_UNDELIVERED


async def test_a_broken_scheduler_stream_is_dialled_again_at_once_not_at_the_next_round(
    lab: Lab, autojump_clock: MockClock
) -> None:
    """The scheduler restarted, or this worker was frozen or cut off: what is known of the
    scheduler is still its best address, so the agent does not wait for the next discovery round
    (5 s, plus a DHT lookup of up to 10 s); the chaos bench measured 22 s before."""
    a = lab.scheduler("sched-a")
    await lab.start()
    await until(a.changes, lambda: len(a.streams) == 1)
    delays = []
    # A scheduler that accepts and drops, again and again: the pauses grow, to 4 s (+-20 %) at most.
    for n in range(2, 10):
        broke = trio.current_time()
        await a.streams[-1].aclose()
        await until(a.changes, lambda n=n: len(a.streams) == n)  # type: ignore[misc]
        delays.append(trio.current_time() - broke)
    assert delays[0] < 0.5, delays
    assert max(delays) <= 4.0 * 1.2 + 0.1, delays  # DialBackoff's most, jittered by +-20 %
    assert delays[-1] >= 1.0, delays  # backed off: not dialling in a loop
