"""Lifecycle tables: every (state, event) pair; random event sequences against invariants."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from scheduler_role.end_conditions import Outcome, ResultView, judge
from scheduler_role.errors import InvalidTransition
from scheduler_role.lifecycle import (
    FINAL_REPLICA_STATES,
    FINISHED_TASK_STATES,
    HOLDING,
    LIVE_TASK_STATES,
    REPLICA_TABLE,
    TASK_TABLE,
    Replica,
    ReplicaEvent,
    ReplicaState,
    TaskEvent,
    TaskState,
    expire,
    replica_step,
    task_step,
)
from tests.scheduler.conftest import spec

DETERMINISTIC = settings(derandomize=True, deadline=None)


def test_tables_cover_every_state() -> None:
    assert set(TASK_TABLE) == set(TaskState)
    assert set(REPLICA_TABLE) == set(ReplicaState)


@DETERMINISTIC
@given(st.sampled_from(TaskState), st.sampled_from(TaskEvent))
def test_task_every_pair_transitions_or_raises(state: TaskState, event: TaskEvent) -> None:
    if event in TASK_TABLE[state]:
        assert task_step(state, event) is TASK_TABLE[state][event]
    else:
        with pytest.raises(InvalidTransition) as info:
            task_step(state, event)
        assert (info.value.state, info.value.event) == (state.value, event.value)


def test_task_table_shape() -> None:
    # Exhaustive as well, not only sampled: cancel from every live state and no other; a finished
    # task only ever moves to done; done is final.
    for state, event in itertools.product(TaskState, TaskEvent):
        allowed = event in TASK_TABLE[state]
        if event is TaskEvent.CANCEL:
            assert allowed == (state in LIVE_TASK_STATES)
        if state in FINISHED_TASK_STATES:
            assert allowed == (event is TaskEvent.COLLECT and state is not TaskState.DONE)
    # Every state is reachable from submitted.
    seen, frontier = {TaskState.SUBMITTED}, [TaskState.SUBMITTED]
    while frontier:
        for nxt in TASK_TABLE[frontier.pop()].values():
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(TaskState)


@DETERMINISTIC
@given(
    st.sampled_from(ReplicaState),
    st.sampled_from(ReplicaEvent),
    st.integers(0, 5),
    st.sampled_from(["w1", "w2"]),
)
def test_replica_every_pair_transitions_or_raises(
    state: ReplicaState, event: ReplicaEvent, attempts: int, worker: str
) -> None:
    replica = Replica(0, state, worker if state in HOLDING else None, attempts)
    named = worker if event is ReplicaEvent.LEASE else None
    if event not in REPLICA_TABLE[state]:
        with pytest.raises(InvalidTransition):
            replica_step(replica, event, worker=named)
        return
    after = replica_step(replica, event, worker=named)
    assert after.state is REPLICA_TABLE[state][event]
    # The holder is set exactly in the holding states; attempts only grow, by one per lease.
    assert (after.worker is not None) == (after.state in HOLDING)
    assert after.attempts == attempts + (event is ReplicaEvent.LEASE)
    if after.state in HOLDING and state in HOLDING:
        assert after.worker == replica.worker


def test_replica_final_states_have_no_way_out() -> None:
    assert {
        ReplicaState.REPORTED,
        ReplicaState.FAILED,
        ReplicaState.STOPPED,
    } == FINAL_REPLICA_STATES
    with pytest.raises(ValueError, match="LEASE"):
        replica_step(Replica(0), ReplicaEvent.LEASE)


def test_expire_requeues_until_max_attempts() -> None:
    replica = Replica(0)
    for attempt in range(1, 4):
        replica = replica_step(replica, ReplicaEvent.LEASE, worker=f"w{attempt}")
        replica = expire(replica, max_attempts=3, reason="no heartbeat")
        expected = ReplicaState.QUEUED if attempt < 3 else ReplicaState.FAILED
        assert replica.state is expected
        assert replica.worker is None
    assert "gave up after 3 attempts" in replica.reason


class TaskModel(RuleBasedStateMachine):
    """A task with replicas driven through the tables and the judge, as the queue drives it."""

    workers = ("a", "b", "c", "d")

    @initialize(
        replicas=st.integers(1, 4), quorum_gap=st.integers(0, 3), attempts=st.integers(1, 3)
    )
    def setup(self, replicas: int, quorum_gap: int, attempts: int) -> None:
        quorum = max(1, replicas - quorum_gap)
        self.spec = spec(replicas=replicas, quorum=quorum, max_attempts=attempts, deadline=100.0)
        self.state = TaskState.ACTIVE
        self.replicas = [Replica(i) for i in range(replicas)]
        self.results: list[ResultView] = []
        self.now = 0.0
        self.held_since: dict[int, float] = {}
        self.final: tuple[TaskState, tuple[ResultView, ...]] | None = None

    def _judge(self) -> None:
        held_for = {i: self.now - t for i, t in self.held_since.items()}
        j = judge(
            spec=self.spec, state=self.state, replicas=self.replicas, results=self.results,
            held_for=held_for, now_wall=self.now,
        )  # fmt: skip
        for i in j.time_out:
            self.replicas[i] = replica_step(self.replicas[i], ReplicaEvent.TIME_OUT)
            self.held_since.pop(i, None)
        if j.over:
            for i in j.stop:
                self.replicas[i] = replica_step(self.replicas[i], ReplicaEvent.STOP)
                self.held_since.pop(i, None)
            if self.state in LIVE_TASK_STATES:
                event = TaskEvent.SUCCEED if j.outcome is Outcome.SUCCEEDED else TaskEvent.FAIL
                self.state = task_step(self.state, event)

    def _witnesses(self) -> set[str]:
        held = {r.worker for r in self.replicas if r.worker is not None}
        return held | {r.worker for r in self.results}

    @rule(worker=st.sampled_from(workers))
    def lease(self, worker: str) -> None:
        queued = [r for r in self.replicas if r.state is ReplicaState.QUEUED]
        if self.state is not TaskState.ACTIVE or not queued or worker in self._witnesses():
            return
        r = queued[0]
        self.replicas[r.index] = replica_step(r, ReplicaEvent.LEASE, worker=worker)
        self.held_since[r.index] = self.now

    @rule(index=st.integers(0, 3), good=st.booleans())
    def report(self, index: int, good: bool) -> None:
        if index >= len(self.replicas) or self.replicas[index].state not in HOLDING:
            return
        r = self.replicas[index]
        assert r.worker is not None
        self.results.append(
            ResultView(index, r.worker, b"good" if good else b"bad-" + r.worker.encode())
        )
        self.replicas[index] = replica_step(r, ReplicaEvent.REPORT)
        self.held_since.pop(index)
        self._judge()

    @rule(index=st.integers(0, 3))
    def expire(self, index: int) -> None:
        if index >= len(self.replicas) or self.replicas[index].state not in HOLDING:
            return
        self.replicas[index] = expire(
            self.replicas[index], max_attempts=self.spec.limits.max_attempts, reason="lapsed"
        )
        self.held_since.pop(index)
        self._judge()

    @rule(seconds=st.sampled_from([1.0, 50.0, 700.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        self._judge()

    @precondition(lambda self: self.state in LIVE_TASK_STATES)
    @rule()
    def cancel(self) -> None:
        self.state = task_step(self.state, TaskEvent.CANCEL)
        self._judge()

    @invariant()
    def one_holder_per_replica_and_one_replica_per_worker(self) -> None:
        holders = [r.worker for r in self.replicas if r.state in HOLDING]
        assert all(h is not None for h in holders)
        assert len(holders) == len(set(holders))
        for r in self.replicas:
            assert (r.worker is not None) == (r.state in HOLDING)

    @invariant()
    def results_counted_once(self) -> None:
        keys = [(r.replica, r.worker) for r in self.results]
        assert len(keys) == len(set(keys))
        assert len({r.worker for r in self.results}) == len(self.results)

    @invariant()
    def finished_task_never_changes(self) -> None:
        if self.state in FINISHED_TASK_STATES:
            snapshot = (self.state, tuple(self.results))
            if self.final is None:
                self.final = snapshot
            assert self.final == snapshot
            assert not any(r.state in HOLDING for r in self.replicas)
        else:
            assert self.final is None


TaskModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, derandomize=True
)
TestTaskModel = TaskModel.TestCase
