"""The judge: quorum with a wrong worker, deadline, max runtime, attempts, cancel."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.dispatch import result_digest
from scheduler_role.end_conditions import Outcome, ResultView, judge
from scheduler_role.lifecycle import Replica, ReplicaState, TaskState
from tests.scheduler.conftest import digest_of, spec

GOOD = result_digest(0, digest_of("42"), None)
BAD = result_digest(0, digest_of("41"), None)


def reported(n: int) -> list[Replica]:
    return [Replica(i, ReplicaState.REPORTED, None, 1) for i in range(n)]


def test_digest_covers_exit_code_stdout_and_archive() -> None:
    base = result_digest(0, digest_of("x"), None)
    assert base == result_digest(0, digest_of("x"), None)
    assert base != result_digest(1, digest_of("x"), None)
    assert base != result_digest(0, digest_of("y"), None)
    assert base != result_digest(0, digest_of("x"), digest_of("archive"))


def test_quorum_with_one_wrong_worker_succeeds_and_names_it() -> None:
    s = spec(replicas=3, quorum=2)
    replicas = [*reported(2), Replica(2, ReplicaState.RUNNING, "w3", 1)]
    results = [ResultView(0, "w1", BAD), ResultView(1, "w2", GOOD)]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=results, held_for={},
              now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.RUNNING  # 1 good + 1 pending can still make 2
    results.append(ResultView(2, "w3", GOOD))
    replicas[2] = Replica(2, ReplicaState.REPORTED, None, 1)
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=results, held_for={},
              now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.SUCCEEDED
    assert j.agreed == GOOD
    assert j.agreeing == ("w2", "w3")
    assert j.dissenters == ("w1",)


def test_quorum_reached_early_stops_the_rest() -> None:
    s = spec(replicas=3, quorum=2)
    replicas = [*reported(2), Replica(2, ReplicaState.LEASED, "w3", 1)]
    results = [ResultView(0, "w1", GOOD), ResultView(1, "w2", GOOD)]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=results, held_for={},
              now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.SUCCEEDED
    assert j.stop == (2,)


def test_disagreement_that_cannot_reach_quorum_fails() -> None:
    s = spec(replicas=3, quorum=2)
    results = [ResultView(0, "w1", BAD), ResultView(1, "w2", GOOD), ResultView(2, "w3", b"x" * 32)]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=reported(3), results=results, held_for={},
              now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.FAILED
    assert "results disagree" in j.reason


def test_one_worker_counts_once() -> None:
    s = spec(replicas=2, quorum=2)
    results = [ResultView(0, "w1", GOOD), ResultView(1, "w1", GOOD)]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=reported(2), results=results, held_for={},
              now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.FAILED


def test_deadline_fails_and_stops_everything() -> None:
    s = spec(replicas=2, quorum=2, deadline=100.0)
    replicas = [Replica(0, ReplicaState.RUNNING, "w1", 1), Replica(1, ReplicaState.QUEUED)]
    kwargs = dict(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=[], held_for={})
    assert judge(**kwargs, now_wall=99.9).outcome is Outcome.RUNNING  # type: ignore[arg-type]
    j = judge(**kwargs, now_wall=100.0)  # type: ignore[arg-type]
    assert j.outcome is Outcome.FAILED
    assert j.reason == "deadline passed"
    assert j.stop == (0, 1)


def test_deadline_applies_before_the_image_is_ready() -> None:
    s = spec(deadline=10.0, image_id=None)
    j = judge(spec=s, state=TaskState.ASSEMBLING, replicas=[Replica(0)], results=[],
              held_for={}, now_wall=11)  # fmt: skip
    assert j.outcome is Outcome.FAILED


def test_max_runtime_times_out_the_replica_and_fails_when_quorum_is_lost() -> None:
    s = spec(replicas=2, quorum=1, max_runtime=60)
    replicas = [
        Replica(0, ReplicaState.RUNNING, "w1", 1),
        Replica(1, ReplicaState.RUNNING, "w2", 1),
    ]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=[],
              held_for={0: 61.0, 1: 10.0}, now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.RUNNING
    assert j.time_out == (0,)
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=[],
              held_for={0: 61.0, 1: 60.0}, now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.FAILED
    assert j.time_out == (0, 1)
    assert "max runtime" in j.reason


def test_attempts_used_up_fail_the_task() -> None:
    s = spec(replicas=1, quorum=1, max_attempts=2)
    replicas = [Replica(0, ReplicaState.FAILED, None, 2, "no heartbeat; gave up after 2 attempts")]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=replicas, results=[], held_for={},
              now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.FAILED
    assert "gave up after 2 attempts" in j.reason


def test_cancelled_task_stops_every_pending_replica() -> None:
    s = spec(replicas=3, quorum=2)
    replicas = [Replica(0, ReplicaState.RUNNING, "w1", 1), Replica(1, ReplicaState.QUEUED),
                Replica(2, ReplicaState.REPORTED, None, 1)]  # fmt: skip
    j = judge(spec=s, state=TaskState.CANCELLED, replicas=replicas,
              results=[ResultView(2, "w3", GOOD)], held_for={}, now_wall=0)  # fmt: skip
    assert j.outcome is Outcome.CANCELLED
    assert j.stop == (0, 1)


@settings(derandomize=True, deadline=None)
@given(
    st.integers(1, 5).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
    st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["a", "b", "c", "d"]), st.booleans())),
)
def test_success_means_quorum_distinct_workers_agree(
    shape: tuple[int, int], raw: list[tuple[int, str, bool]]
) -> None:
    replicas, quorum = shape
    s = spec(replicas=replicas, quorum=quorum)
    seen: set[tuple[int, str]] = set()
    results = []
    for idx, worker, good in raw:
        if idx < replicas and (idx, worker) not in seen:
            seen.add((idx, worker))
            results.append(ResultView(idx, worker, GOOD if good else BAD))
    states = [Replica(i, ReplicaState.REPORTED, None, 1) for i in range(replicas)]
    j = judge(spec=s, state=TaskState.ACTIVE, replicas=states, results=results, held_for={},
              now_wall=0)  # fmt: skip
    if j.outcome is Outcome.SUCCEEDED:
        assert len(set(j.agreeing)) == len(j.agreeing) >= quorum
        assert not set(j.agreeing) & set(j.dissenters)
        first: dict[str, bytes] = {}
        for r in results:
            first.setdefault(r.worker, r.digest)  # a worker's later results are not counted
        assert all(first[w] == j.agreed for w in j.agreeing)
    else:
        assert j.outcome is Outcome.FAILED  # nothing pending: decided either way
