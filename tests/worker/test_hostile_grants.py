"""A hostile scheduler's grants against a real worker agent (fakes for the network and the VMs,
in virtual time): the same lease key granted twice by one scheduler, the same key granted by two
schedulers at once, grants whose fields are absurd, and a NoWork asking to be asked again at once.
Each costs at most that lease (or the stream it came on); the agent keeps running, leaks no VM,
and serves honest work after."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from catalog.dispatch import Answer, Heartbeat, Lost, Request, WorkRequest, encode_answer
from node.p2p_stream import MessageStream
from tests.worker.fake_backend import FakeLeaseBlobs, manifest, vm_result
from tests.worker.fake_scheduler import FakeScheduler, grant, lease
from tests.worker.test_agent import TWO_VMS, Lab, _inline, gaps, until
from worker_role.agent import RETRY_FLOOR


@pytest.fixture
async def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Lab]:
    monkeypatch.setattr(trio.to_thread, "run_sync", _inline)  # as in test_agent: see there
    async with trio.open_nursery() as nursery:
        yield Lab(tmp_path, nursery)
        nursery.cancel_scope.cancel()


async def test_a_lease_granted_twice_by_one_scheduler_runs_once_and_the_agent_lends_on(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = lab.scheduler("sched-a", retry_after=1.0)
    lab.blobs = FakeLeaseBlobs(manifest(), fetch_s=4.0)
    # The second grant comes while the first one's image is still being fetched.
    a.work += [grant(lease(1)), grant(lease(1)), grant(lease(2))]
    await lab.start(**TWO_VMS)
    first = await lab.running_vm(0)
    # The repeat was refused (its stream failed; the agent came back on a new one), and the
    # next honest grant runs beside the first.
    second = await lab.running_vm(1)
    assert len(a.streams) >= 2
    await trio.sleep(60)  # virtual: nothing else starts, nothing ends
    assert len(lab.backend.vms) == 2
    assert not first.destroyed
    assert not second.destroyed
    # Heartbeats on the new stream still carry the first lease: it was not lost.
    assert lease(1) in a.of_type(Heartbeat)[-1].leases
    first.finish(vm_result(stdout=b"one"))
    second.finish(vm_result(stdout=b"two"))
    await until(a.changes, lambda: {lease(1), lease(2)} <= a.results.keys())
    assert not a.of_type(Lost)
    assert not lab.backend.running


async def test_two_schedulers_granting_the_same_lease_key_each_keep_their_own(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a, b = lab.scheduler("sched-a"), lab.scheduler("sched-b")
    a.work.append(grant(lease(1)))
    b.work.append(grant(lease(1)))
    await lab.start(**TWO_VMS)
    await lab.running_vm(0)
    await lab.running_vm(1)
    # Each scheduler hears about its own lease in its heartbeats.
    await until(a.changes, lambda: any(lease(1) in h.running for h in a.of_type(Heartbeat)))
    await until(b.changes, lambda: any(lease(1) in h.running for h in b.of_type(Heartbeat)))
    # b stops its lease: one VM goes, the other (a's) stays and still reports to a.
    await b.push_stop((lease(1),))
    await until(lab.backend.changes, lambda: len(lab.backend.running) == 1)
    await trio.sleep(60)  # virtual
    assert len(lab.backend.running) == 1
    assert lease(1) in a.of_type(Heartbeat)[-1].leases
    lab.backend.running[0].finish(vm_result(stdout=b"a's"))
    await until(a.changes, lambda: lease(1) in a.results)
    assert not b.results
    assert not a.of_type(Lost)
    assert not lab.backend.running


ABSURD: list[dict[str, Any]] = [
    {"max_runtime": math.inf},
    {"max_runtime": math.nan},
    {"max_runtime": -1.0},
    {"max_runtime": 10.0**300},
    {"max_runtime": "forever"},
    {"lease_timeout": 0},
    {"lease_timeout": True},
    {"image_id": b"\0" * 31},
    {"image_id": "../../etc/passwd"},
    {"lease": ["../../../root/.ssh", 0, 1]},
    {"lease": ["t", -1, 1]},
    {"lease": ["t", 0, 2**63]},
    {"lease": "t"},
    {"caps": {"vcpus": 10**9}},
    {"caps": {"memory_mib": -1}},
    {"caps": {"no_such_cap": 1}},
    {"caps": []},
    {"no_such_field": 1},
]


class AbsurdScheduler(FakeScheduler):
    """Answers its first work requests with a grant whose field ``ABSURD[n]`` overrides."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.absurd = list(ABSURD)
        self.sent: list[dict[str, Any]] = []

    async def _send_answer(self, stream: MessageStream, request_id: int, answer: Answer) -> None:
        frame = encode_answer(request_id, answer)
        if self.absurd and frame.get("type") == "no_work":
            frame = {**encode_answer(request_id, grant(lease(9))), **self.absurd.pop(0)}
            self.sent.append(frame)
        await stream.send(frame)


async def test_grants_with_absurd_fields_are_refused_and_the_agent_lends_on(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = AbsurdScheduler("sched-a", lab.identity.public_bytes, retry_after=1.0)
    lab.network.add(a)
    await lab.start(**TWO_VMS)
    await until(a.changes, lambda: not a.absurd and len(a.of_type(WorkRequest)) > len(ABSURD))
    assert not lab.backend.vms
    assert not lab.blobs.grants  # no image was asked for on an absurd grant's word
    # An honest grant after all of them runs and reports.
    a.work.append(grant(lease(1)))
    vm = await lab.running_vm()
    vm.finish(vm_result(stdout=b"fine"))
    await until(a.changes, lambda: lease(1) in a.results)
    # Each absurd grant failed the stream it came on; the agent dialled again each time.
    assert len(a.streams) == len(ABSURD) + 1


class Impatient(FakeScheduler):
    """Answers NoWork with a retry_after of a microsecond, ``rounds`` times, then stops answering
    work requests (so that virtual time can pass)."""

    rounds = 50

    def _answer(self, message: Request) -> Answer:
        if isinstance(message, WorkRequest) and len(self.of_type(WorkRequest)) >= self.rounds:
            self.answer_delay[WorkRequest] = 10**6
        return super()._answer(message)


async def test_a_scheduler_asking_to_be_asked_again_at_once_is_asked_at_most_once_a_second(
    lab: Lab, autojump_clock: MockClock
) -> None:
    a = Impatient("sched-a", lab.identity.public_bytes, retry_after=1e-6)
    lab.network.add(a)
    await lab.start()
    await until(a.changes, lambda: len(a.of_type(WorkRequest)) >= 10)
    assert min(gaps(a.times_of(WorkRequest))) >= RETRY_FLOOR
