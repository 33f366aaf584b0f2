"""The task lifecycle: every state, event and transition, in this one module.

DESIGN.md draws one line: submitted -> assembling -> queued -> leased -> running -> succeeded |
failed | expired (-> queued) -> done, cancelled from any live state. With replicas that line is two
machines, because a task with three replicas is "queued" and "running" at once:

* the **task** machine (:data:`TASK_TABLE`): submitted -> assembling -> active -> succeeded | failed
  | cancelled -> done. ``active`` means the image is ready and the replicas are being dispatched;
  the verdict (succeeded, failed, cancelled) is final, and ``done`` only records that the owner has
  collected it.
* the **replica** machine (:data:`REPLICA_TABLE`), one per replica: queued -> leased -> running ->
  reported, or expired -> queued again (another attempt) / failed (attempts used up), or failed on
  max runtime, or stopped when the task ended without needing it. A queued replica may also go
  straight to reported: the result of its last lease, which lapsed while the worker finished it,
  arriving before anyone else leased it again (nothing is run twice for a late word).

A lease that ends before its VM started (the worker could not fetch, boot or reach libvirt) is the
worker's failure, not the task's: :func:`expire` counts it in ``start_failures``, which spends the
task's ``max_attempts`` no more, and is bounded on its own (``START_FAILURE_FACTOR`` times the
attempts) so a task cannot bounce between sick workers forever.

Every (state, event) pair not in a table raises :class:`InvalidTransition`: nothing is implied. A
replica is held by a worker exactly in :data:`HOLDING`; :func:`replica_step` keeps the holder,
attempt count and state consistent, so callers cannot set them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from scheduler_role.errors import InvalidTransition


class TaskState(StrEnum):
    SUBMITTED = "submitted"
    ASSEMBLING = "assembling"
    ACTIVE = "active"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DONE = "done"


class TaskEvent(StrEnum):
    ASSEMBLE = "assemble"  # the scheduler starts building the image
    IMAGE_READY = "image_ready"  # the image exists (built, or already in the image library)
    ASSEMBLY_FAILED = "assembly_failed"
    SUCCEED = "succeed"  # the judge found `quorum` agreeing results
    FAIL = "fail"  # the judge gave up: deadline, attempts, disagreement, runtime
    CANCEL = "cancel"  # the owner cancelled
    COLLECT = "collect"  # the owner has the outcome; the scheduler may forget the task later


TASK_TABLE: dict[TaskState, dict[TaskEvent, TaskState]] = {
    TaskState.SUBMITTED: {
        TaskEvent.ASSEMBLE: TaskState.ASSEMBLING,
        TaskEvent.IMAGE_READY: TaskState.ACTIVE,
        TaskEvent.FAIL: TaskState.FAILED,
        TaskEvent.CANCEL: TaskState.CANCELLED,
    },
    TaskState.ASSEMBLING: {
        TaskEvent.IMAGE_READY: TaskState.ACTIVE,
        TaskEvent.ASSEMBLY_FAILED: TaskState.FAILED,
        TaskEvent.FAIL: TaskState.FAILED,
        TaskEvent.CANCEL: TaskState.CANCELLED,
    },
    TaskState.ACTIVE: {
        TaskEvent.SUCCEED: TaskState.SUCCEEDED,
        TaskEvent.FAIL: TaskState.FAILED,
        TaskEvent.CANCEL: TaskState.CANCELLED,
    },
    TaskState.SUCCEEDED: {TaskEvent.COLLECT: TaskState.DONE},
    TaskState.FAILED: {TaskEvent.COLLECT: TaskState.DONE},
    TaskState.CANCELLED: {TaskEvent.COLLECT: TaskState.DONE},
    TaskState.DONE: {},
}

LIVE_TASK_STATES = frozenset({TaskState.SUBMITTED, TaskState.ASSEMBLING, TaskState.ACTIVE})
"""States a task can still be cancelled, failed or succeed from."""
FINISHED_TASK_STATES = frozenset(set(TaskState) - LIVE_TASK_STATES)
"""States whose verdict never changes again (``done`` only marks it collected)."""


def task_step(state: TaskState, event: TaskEvent) -> TaskState:
    """The state after ``event``; :class:`InvalidTransition` if the table has none."""
    try:
        return TASK_TABLE[state][event]
    except KeyError:
        raise InvalidTransition("task", state.value, event.value) from None


def task_allows(state: TaskState, event: TaskEvent) -> bool:
    return event in TASK_TABLE[state]


class ReplicaState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"  # a worker has it and is fetching the image / booting
    RUNNING = "running"  # the worker says the VM runs
    EXPIRED = "expired"  # transient: the lease lapsed; re-queued or given up in the same step
    REPORTED = "reported"
    FAILED = "failed"
    STOPPED = "stopped"


class ReplicaEvent(StrEnum):
    LEASE = "lease"
    START = "start"
    REPORT = "report"
    EXPIRE = "expire"  # no heartbeat in time, or the worker said it lost the lease
    REQUEUE = "requeue"
    GIVE_UP = "give_up"  # max attempts reached
    TIME_OUT = "time_out"  # ran longer than max runtime; another try would as well
    STOP = "stop"  # the task ended (verdict or cancel)


REPLICA_TABLE: dict[ReplicaState, dict[ReplicaEvent, ReplicaState]] = {
    ReplicaState.QUEUED: {
        ReplicaEvent.LEASE: ReplicaState.LEASED,
        ReplicaEvent.REPORT: ReplicaState.REPORTED,  # its lapsed last lease's result, late
        ReplicaEvent.STOP: ReplicaState.STOPPED,
    },
    ReplicaState.LEASED: {
        ReplicaEvent.START: ReplicaState.RUNNING,
        ReplicaEvent.REPORT: ReplicaState.REPORTED,
        ReplicaEvent.EXPIRE: ReplicaState.EXPIRED,
        ReplicaEvent.TIME_OUT: ReplicaState.FAILED,
        ReplicaEvent.STOP: ReplicaState.STOPPED,
    },
    ReplicaState.RUNNING: {
        ReplicaEvent.REPORT: ReplicaState.REPORTED,
        ReplicaEvent.EXPIRE: ReplicaState.EXPIRED,
        ReplicaEvent.TIME_OUT: ReplicaState.FAILED,
        ReplicaEvent.STOP: ReplicaState.STOPPED,
    },
    ReplicaState.EXPIRED: {
        ReplicaEvent.REQUEUE: ReplicaState.QUEUED,
        ReplicaEvent.GIVE_UP: ReplicaState.FAILED,
        ReplicaEvent.STOP: ReplicaState.STOPPED,
    },
    ReplicaState.REPORTED: {},
    ReplicaState.FAILED: {},
    ReplicaState.STOPPED: {},
}

HOLDING = frozenset({ReplicaState.LEASED, ReplicaState.RUNNING})
"""States in which exactly one worker holds the replica (and it has a lease)."""
PENDING = frozenset({ReplicaState.QUEUED, ReplicaState.LEASED, ReplicaState.RUNNING})
"""States from which a replica may still produce a result."""
FINAL_REPLICA_STATES = frozenset(s for s, row in REPLICA_TABLE.items() if not row)


@dataclass(frozen=True, slots=True)
class Replica:
    """One replica's place in its machine. ``worker`` is set exactly when ``state`` is holding.

    ``attempts`` counts leases granted so far; the current lease (if any) is attempt ``attempts``.
    ``start_failures`` counts those of them that ended before their VM started: they do not spend
    the task's ``max_attempts`` (:func:`spent`).
    """

    index: int
    state: ReplicaState = ReplicaState.QUEUED
    worker: str | None = None
    attempts: int = 0
    reason: str = ""
    start_failures: int = 0


START_FAILURE_FACTOR = 2
"""A replica may fail to start this many times its task's ``max_attempts`` before it gives up."""


def spent(replica: Replica) -> int:
    """The attempts of ``replica`` that count against ``max_attempts``: leases whose VM started."""
    return replica.attempts - replica.start_failures


def replica_step(
    replica: Replica, event: ReplicaEvent, *, worker: str | None = None, reason: str = ""
) -> Replica:
    """Apply ``event``; LEASE needs the ``worker``, every other event must not name one."""
    try:
        state = REPLICA_TABLE[replica.state][event]
    except KeyError:
        raise InvalidTransition("replica", replica.state.value, event.value) from None
    if (event is ReplicaEvent.LEASE) != (worker is not None):
        raise ValueError("a worker is named exactly for LEASE")
    if event is ReplicaEvent.LEASE:
        return replace(replica, state=state, worker=worker, attempts=replica.attempts + 1)
    holder = replica.worker if state in HOLDING else None
    return replace(replica, state=state, worker=holder, reason=reason or replica.reason)


def expire(replica: Replica, *, max_attempts: int, reason: str, started: bool = True) -> Replica:
    """EXPIRE, then REQUEUE while attempts remain, else GIVE_UP (one step for the caller).

    ``started=False``: the lease ended before its VM started; it spends a start failure (at most
    ``START_FAILURE_FACTOR * max_attempts``) instead of one of the task's attempts."""
    expired = replica_step(replica, ReplicaEvent.EXPIRE, reason=reason)
    if not started:
        expired = replace(expired, start_failures=expired.start_failures + 1)
    if expired.start_failures >= START_FAILURE_FACTOR * max_attempts:
        why = f"{reason}; gave up after {expired.start_failures} leases failed to start"
        return replica_step(expired, ReplicaEvent.GIVE_UP, reason=why)
    if spent(expired) < max_attempts:
        return replica_step(expired, ReplicaEvent.REQUEUE, reason=reason)
    return replica_step(
        expired, ReplicaEvent.GIVE_UP, reason=f"{reason}; gave up after {spent(expired)} attempts"
    )
