"""End conditions, sans-IO: given a task's replicas and results, is it over, and who must stop?

The judge is a pure function of what the queue holds, so the queue can call it inside its sqlite
transaction after every change (a result, an expiry, a cancel, a tick) and a restarted scheduler
reaches the same verdict from the same rows. Rules, in order:

1. A finished task (succeeded, failed, cancelled, done) keeps its verdict; every replica still
   pending is stopped.
2. Results agree when their :func:`agreement_digest` (exit code, stdout and stderr hashes, the
   output archive's ID) is equal; each worker and each network counts once. A digest wins once
   ``quorum`` networks agree on it and one of them is a trusted worker or at least two networks
   agree (a worker that has not earned trust never decides alone: :mod:`scheduler_role.trust`);
   the first such digest wins, in the order results arrived; every worker that reported something
   else is a dissenter.
3. A deadline that has passed fails the task.
4. A replica that has run ``max_runtime`` (as the queue counts it: from its VM's start, less one
   lease timeout of grace) is failed (``time_out``): the same command would run as long on
   another worker, so it is not retried.
5. If even every pending replica agreeing with the largest group could not make a quorum, the task
   fails and says why (disagreement, or replicas that used up their attempts / timed out).
6. If a quorum is within reach but only by results that need confirming from another network,
   the judge asks for the replicas missing (``add``), up to :func:`trust.replica_cap`; past that
   the task fails and says so.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import blake3

from catalog.dispatch import ResultReport
from scheduler_role.lifecycle import (
    FINISHED_TASK_STATES,
    HOLDING,
    PENDING,
    Replica,
    ReplicaState,
    TaskState,
)
from scheduler_role.task import TaskSpec
from scheduler_role.trust import replica_cap

_AGREEMENT_CONTEXT = b"vmlend agreement v2\x00"
_NO_ARCHIVE = bytes(32)


def agreement_digest(report: ResultReport) -> bytes:
    """What two results must share to agree: everything the owner receives (exit code, stdout,
    stderr, the ``/out`` archive). Each part is a digest the worker signed, checked against the
    bytes when the scheduler fetched them (the archive's blob ID verifies its bytes itself)."""
    packed = struct.pack(">q", report.exit_code) + report.stdout_digest + report.stderr_digest
    packed += report.archive_blob or _NO_ARCHIVE
    return blake3.blake3(_AGREEMENT_CONTEXT + packed).digest()


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
    network: str = ""  # where the worker was seen from; "" counts it as its own network
    trusted: bool = True  # whether its result may decide the task alone

    @property
    def where(self) -> str:
        return self.network or f"peer:{self.worker}"


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
    add: int = 0  # replicas to add: results that need confirming from another network

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
    counted = _counted(results)
    best = _largest_group(counted)
    if best + len(still) >= spec.quorum:
        missing = _confirmations_missing(counted, spec.quorum) - len(still)
        if missing <= 0:
            return Judgement(Outcome.RUNNING, time_out=time_out)
        room = replica_cap(spec) - len(replicas)
        if missing <= room:
            return Judgement(Outcome.RUNNING, time_out=time_out, add=missing)
        why = (
            "a result from a worker not yet trusted needs an agreeing one from another network,"
            f" and the task may not grow past {replica_cap(spec)} replicas"
        )
        return Judgement(
            Outcome.FAILED, why, dissenters=dissenters, time_out=time_out, stop=tuple(still)
        )
    why = _why_unreachable(spec, replicas, counted, best, time_out)
    return Judgement(
        Outcome.FAILED, why, dissenters=dissenters, time_out=time_out, stop=tuple(still)
    )


def _counted(results: Sequence[ResultView]) -> list[ResultView]:
    """The results that vote, by arrival: one per worker and one per network."""
    workers: set[str] = set()
    networks: set[str] = set()
    out: list[ResultView] = []
    for result in results:
        if result.worker in workers or result.where in networks:
            continue  # a worker (or a network) counts once, whatever it sent for another replica
        workers.add(result.worker)
        networks.add(result.where)
        out.append(result)
    return out


def _decides(group: Sequence[ResultView], quorum: int) -> bool:
    return len(group) >= quorum and (len(group) >= 2 or any(r.trusted for r in group))


def _agreement(
    results: Sequence[ResultView], quorum: int
) -> tuple[bytes | None, tuple[str, ...], tuple[str, ...]]:
    """(agreed digest, its workers, the workers who reported anything else), by arrival order."""
    groups: dict[bytes, list[ResultView]] = {}
    agreed: bytes | None = None
    for result in _counted(results):
        group = groups.setdefault(result.digest, [])
        group.append(result)
        if agreed is None and _decides(group, quorum):
            agreed = result.digest
    if agreed is None:
        return None, (), ()
    dissenters = tuple(sorted(r.worker for d, rs in groups.items() if d != agreed for r in rs))
    return agreed, tuple(r.worker for r in groups[agreed]), dissenters


def _largest_group(counted: Sequence[ResultView]) -> int:
    sizes: dict[bytes, int] = {}
    for result in counted:
        sizes[result.digest] = sizes.get(result.digest, 0) + 1
    return max(sizes.values(), default=0)


def _confirmations_missing(counted: Sequence[ResultView], quorum: int) -> int:
    """The fewest more results any digest needs to decide (a new one from a trusted worker
    needs ``quorum``; one that only untrusted workers back needs at least two networks)."""
    groups: dict[bytes, list[ResultView]] = {}
    for result in counted:
        groups.setdefault(result.digest, []).append(result)
    needs = [quorum]
    for group in groups.values():
        required = quorum if any(r.trusted for r in group) else max(quorum, 2)
        needs.append(required - len(group))
    return min(needs)


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
