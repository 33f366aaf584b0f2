"""What a chaos run did, worked out from what it saw (sans-IO, so it is tested on its own).

A run sees three things, each with the time it arrived (``trio.current_time()`` of the driver):

- every line its nodes logged: a worker logs ``lease T/r#a granted by S`` when a scheduler leases
  it a replica and ``lease T/r#a runs in vmlend-...`` once the VM is up;
- the libvirt domains it saw running, each from the first poll it was seen in to the last;
- the faults it struck and when each was healed, and every task's final status and output.

From those :func:`account` counts tasks (succeeded, failed, lost, wrong, duplicated), VM runs and
the VM-seconds that produced no counted result, and each fault's recovery times.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

GRANT_RE = re.compile(r"lease (\S+)/(\d+)#(\d+) granted by (\S+)")
RUN_RE = re.compile(r"lease (\S+)/(\d+)#(\d+) runs in (vmlend-\S+)")

FaultKind = Literal["kill", "freeze", "partition", "scheduler-restart"]


@dataclass(frozen=True)
class Line:
    at: float
    node: str  # the harness's name of the node (a restarted node keeps its name)
    text: str


@dataclass(frozen=True)
class Grant:
    at: float
    node: str
    task_id: str
    replica: int
    attempt: int


@dataclass(frozen=True)
class Run:
    at: float
    node: str
    task_id: str
    replica: int
    attempt: int
    domain: str


@dataclass
class FaultRecord:
    kind: FaultKind
    node: str
    struck_at: float
    healed_at: float | None = None  # the kill's restart, the freeze's SIGCONT, the mend
    ready_at: float | None = None  # a restarted node printed its RPC socket again
    task_id: str | None = None  # the task whose VM ran on the node when it was struck
    replica: int = 0  # and which lease of it
    attempt: int = 0
    requeued_at: float | None = None  # the scheduler gave that replica up (status polled)


@dataclass(frozen=True)
class TaskOutcome:
    task_id: str
    expected: bytes
    status: Mapping[str, Any] | None  # None: never finished within the run's bound
    stdout: bytes | None


@dataclass
class FaultReport:
    kind: FaultKind
    node: str
    struck_at: float  # seconds into the run
    held_s: float | None
    task_id: str | None
    requeued_after_s: float | None  # strike -> the scheduler queued the replica again
    rerun_elsewhere_after_s: float | None  # strike -> that task's VM up on another worker
    serving_again_after_s: float | None  # healed (or ready) -> this node's next lease
    first_lease_after_return_s: float | None  # a scheduler's restart -> any worker's next lease


@dataclass
class Report:
    tasks: int
    succeeded: int
    failed: list[str]
    lost: list[str]
    wrong_output: list[str]
    duplicated: list[str]  # more than one result counted for a task run once (replicas = 1)
    vm_runs: int
    re_runs: int
    wasted_vm_seconds: float
    vm_seconds: float
    orphan_vms: list[str]
    wall_s: float = 0.0  # first task submitted -> every task finished and every fault healed
    faults: list[FaultReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def grants(lines: Sequence[Line]) -> list[Grant]:
    found = []
    for line in lines:
        m = GRANT_RE.search(line.text)
        if m:
            found.append(Grant(line.at, line.node, m[1], int(m[2]), int(m[3])))
    return found


def runs(lines: Sequence[Line]) -> list[Run]:
    found = []
    for line in lines:
        m = RUN_RE.search(line.text)
        if m:
            found.append(Run(line.at, line.node, m[1], int(m[2]), int(m[3]), m[4]))
    return found


def account(
    lines: Sequence[Line],
    domains: Mapping[str, tuple[float, float]],
    faults: Sequence[FaultRecord],
    outcomes: Sequence[TaskOutcome],
    peer_of: Mapping[str, str],
    orphan_vms: Sequence[str],
    started_at: float = 0.0,
) -> Report:
    """The report of one run. ``domains`` maps each domain seen to (first, last) seen;
    ``peer_of`` maps node names to peer IDs; a fault's ``struck_at`` is reported from
    ``started_at``."""
    all_runs = [r for r in runs(lines) if r.task_id in {o.task_id for o in outcomes}]
    all_grants = grants(lines)
    report = Report(
        tasks=len(outcomes), succeeded=0, failed=[], lost=[], wrong_output=[], duplicated=[],
        vm_runs=len(all_runs), re_runs=0, wasted_vm_seconds=0.0, vm_seconds=0.0,
        orphan_vms=sorted(orphan_vms),
    )  # fmt: skip
    node_of_peer = {peer: name for name, peer in peer_of.items()}
    for o in outcomes:
        task_runs = [r for r in all_runs if r.task_id == o.task_id]
        report.re_runs += max(0, len(task_runs) - 1)
        seconds = {r.domain: _seconds(domains, r.domain) for r in task_runs}
        report.vm_seconds += sum(seconds.values())
        useful = 0.0
        if o.status is None:
            report.lost.append(o.task_id)
        elif o.status.get("state") != "succeeded":
            report.failed.append(o.task_id)
        elif o.stdout != o.expected:
            report.wrong_output.append(o.task_id)
        else:
            report.succeeded += 1
            reporters = [node_of_peer.get(p) for p in o.status.get("reported_by", [])]
            counted = [r for r in task_runs if r.node in reporters]
            if counted:
                useful = seconds[counted[-1].domain]
        if o.status is not None and int(o.status.get("results", 0)) > 1:
            report.duplicated.append(o.task_id)
        report.wasted_vm_seconds += sum(seconds.values()) - useful
    report.faults = [_fault_report(f, all_grants, all_runs, started_at) for f in faults]
    return report


def _seconds(domains: Mapping[str, tuple[float, float]], domain: str) -> float:
    first, last = domains.get(domain, (0.0, 0.0))
    return last - first


def _fault_report(
    f: FaultRecord, all_grants: Sequence[Grant], all_runs: Sequence[Run], started_at: float
) -> FaultReport:
    def after(t: float | None) -> float | None:
        return None if t is None else round(t - f.struck_at, 3)

    rerun = next(
        (r.at for r in all_runs
         if r.task_id == f.task_id and r.node != f.node and r.at > f.struck_at),
        None,
    )  # fmt: skip
    back = f.ready_at if f.ready_at is not None else f.healed_at
    serving = first_lease = None
    if back is not None:
        if f.kind == "scheduler-restart":
            first = next((g.at for g in all_grants if g.at >= back), None)
            first_lease = None if first is None else round(first - back, 3)
        else:
            first = next((g.at for g in all_grants if g.node == f.node and g.at >= back), None)
            serving = None if first is None else round(first - back, 3)
    return FaultReport(
        kind=f.kind,
        node=f.node,
        struck_at=round(f.struck_at - started_at, 3),
        held_s=None if f.healed_at is None else round(f.healed_at - f.struck_at, 3),
        task_id=f.task_id,
        requeued_after_s=after(f.requeued_at),
        rerun_elsewhere_after_s=after(rerun),
        serving_again_after_s=serving,
        first_lease_after_return_s=first_lease,
    )
