"""End conditions, sans-IO: given a task's replicas and results, is it over, and who must stop?

The judge is a pure function of what the queue holds, so the queue can call it inside its sqlite
transaction after every change (a result, an expiry, a cancel, a tick) and a restarted scheduler
reaches the same verdict from the same rows. Rules, in order:

1. A finished task (succeeded, failed, cancelled, done) keeps its verdict; every replica still
   pending is stopped.
2. Results agree when their :func:`result_digest` (exit code, stdout hash, output archive ID) is
   equal; each worker counts once. The first digest that ``quorum`` workers agree on wins, in the
   order results arrived; every worker that reported something else is a dissenter.
3. A deadline that has passed fails the task.
4. A replica that has run ``max_runtime`` (as the queue counts it: from its VM's start, less one
   lease timeout of grace) is failed (``time_out``): the same command would run as long on
   another worker, so it is not retried.
5. If even every pending replica agreeing with the largest group could not make a quorum, the task
   fails and says why (disagreement, or replicas that used up their attempts / timed out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from scheduler_role.lifecycle import (
    FINISHED_TASK_STATES,
    HOLDING,
    PENDING,
    Replica,
    ReplicaState,
    TaskState,
)
from scheduler_role.task import TaskSpec


class Outcome(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class ResultView:
    """One accepted result, in arrival order."""

    replica: int
    worker: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict, plus which replicas to time out and which to stop (holders get a notice)."""

    outcome: Outcome
    reason: str = ""
    agreed: bytes | None = None
    agreeing: tuple[str, ...] = ()
    dissenters: tuple[str, ...] = ()
    time_out: tuple[int, ...] = ()
    stop: tuple[int, ...] = ()

    @property
    def over(self) -> bool:
        return self.outcome is not Outcome.RUNNING


_FINISHED_OUTCOME = {
    TaskState.SUCCEEDED: Outcome.SUCCEEDED,
    TaskState.FAILED: Outcome.FAILED,
    TaskState.CANCELLED: Outcome.CANCELLED,
}


def judge(
    *,
    spec: TaskSpec,
    state: TaskState,
    replicas: Sequence[Replica],
    results: Sequence[ResultView],
    held_for: Mapping[int, float],
    now_wall: float,
    reason: str = "",
    verdict: Outcome = Outcome.FAILED,
) -> Judgement:
    """Decide the task. ``held_for[i]``: seconds replica ``i`` has run, as max runtime counts.

    For a finished task, ``reason`` is its stored reason and ``verdict`` the outcome it had before
    ``done`` (the ``done`` state alone does not say).
    """
    pending = [r.index for r in replicas if r.state in PENDING]
    if state in FINISHED_TASK_STATES:
        outcome = _FINISHED_OUTCOME.get(state, verdict)
        agreed, agreeing, dissenters = _agreement(results, spec.quorum)
        return Judgement(outcome, reason, agreed, agreeing, dissenters, stop=tuple(pending))

    agreed, agreeing, dissenters = _agreement(results, spec.quorum)
    if agreed is not None:
        return Judgement(
            Outcome.SUCCEEDED,
            f"{len(agreeing)} of {spec.replicas} workers agree (quorum {spec.quorum})",
            agreed,
            agreeing,
            dissenters,
            stop=tuple(pending),
        )
    deadline = spec.limits.deadline
    if deadline is not None and now_wall >= deadline:
        return Judgement(
            Outcome.FAILED, "deadline passed", dissenters=dissenters, stop=tuple(pending)
        )
    if state is not TaskState.ACTIVE:
        return Judgement(Outcome.RUNNING)

    time_out = tuple(
        r.index
        for r in replicas
        if r.state in HOLDING and held_for.get(r.index, 0.0) >= spec.limits.max_runtime
    )
    still = [i for i in pending if i not in time_out]
    best = _largest_group(results)
    if best + len(still) >= spec.quorum:
        return Judgement(Outcome.RUNNING, time_out=time_out)
    why = _why_unreachable(spec, replicas, results, best, time_out)
    return Judgement(
        Outcome.FAILED, why, dissenters=dissenters, time_out=time_out, stop=tuple(still)
    )


def _agreement(
    results: Sequence[ResultView], quorum: int
) -> tuple[bytes | None, tuple[str, ...], tuple[str, ...]]:
    """(agreed digest, its workers, the workers who reported anything else), by arrival order."""
    seen: set[str] = set()
    groups: dict[bytes, list[str]] = {}
    agreed: bytes | None = None
    for result in results:
        if result.worker in seen:
            continue  # a worker counts once, whatever it sent for another replica
        seen.add(result.worker)
        group = groups.setdefault(result.digest, [])
        group.append(result.worker)
        if agreed is None and len(group) >= quorum:
            agreed = result.digest
    if agreed is None:
        return None, (), ()
    dissenters = tuple(sorted(w for d, ws in groups.items() if d != agreed for w in ws))
    return agreed, tuple(groups[agreed]), dissenters


def _largest_group(results: Sequence[ResultView]) -> int:
    workers: dict[bytes, set[str]] = {}
    for result in results:
        workers.setdefault(result.digest, set()).add(result.worker)
    return max((len(ws) for ws in workers.values()), default=0)


def _why_unreachable(
    spec: TaskSpec,
    replicas: Sequence[Replica],
    results: Sequence[ResultView],
    best: int,
    time_out: tuple[int, ...],
) -> str:
    parts: list[str] = []
    distinct = len({r.digest for r in results})
    if distinct > 1:
        parts.append(f"results disagree ({distinct} different results, at most {best} agree)")
    for r in replicas:
        if r.index in time_out:
            limit = spec.limits.max_runtime
            parts.append(f"replica {r.index}: max runtime of {limit:g} s exceeded")
        elif r.state is ReplicaState.FAILED:
            parts.append(f"replica {r.index}: {r.reason or 'failed'}")
    parts.append(f"quorum of {spec.quorum} can no longer be reached")
    return "; ".join(parts)
