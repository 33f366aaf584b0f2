"""Why is a task waiting? Sans-IO: from the task's status and the workers seen lately.

The answer is for a person (``vmlend status ID``): one line per reason, most useful first. It
tells "never" (no worker's *capacity* fits: "no worker offers 8 GiB memory") from "not now"
(a worker could, but its room is taken: "2 workers busy"), and names the quorum rule when the only
fitting workers already ran a replica of this task.
"""

from __future__ import annotations

from collections.abc import Mapping

from catalog.caps import Caps, NetworkMode, Violation
from scheduler_role.lifecycle import HOLDING, ReplicaState, TaskState
from scheduler_role.matching import violations
from scheduler_role.queue import SeenOffer, TaskStatus


def explain(
    status: TaskStatus,
    offers: Mapping[str, SeenOffer],
    held_by: Mapping[str, int],
    sidelined: Mapping[str, float] | None = None,
) -> list[str]:
    """Reasons ``status``'s task is not (fully) running; empty if nothing is waiting.

    ``offers``: the last offer of each worker seen recently (``Queue.offers``); ``held_by``: leases
    each worker holds now (``Queue.held_by()``); ``sidelined``: seconds left for each worker
    given no lease because its leases kept failing to start (``Queue.sidelined()``).
    """
    resting = {w: left for w, left in (sidelined or {}).items() if w in offers or w in held_by}
    state = status.state
    if state is TaskState.SUBMITTED:
        return ["waiting for image assembly to start"]
    if state is TaskState.ASSEMBLING:
        return ["waiting for image assembly"]
    if state is not TaskState.ACTIVE:
        return []
    queued = [r for r in status.replicas if r.state is ReplicaState.QUEUED]
    if not queued:
        return []
    lines = [_plural(len(queued), "replica") + " waiting for a worker"]
    need = status.spec.caps
    taken = {r.worker for r in status.replicas if r.state in HOLDING} | set(status.reported)
    workers = set(offers) | set(held_by)
    if not workers:
        return [*lines, "no worker has asked for work recently"]
    never: dict[str, list[Violation]] = {}
    for worker, seen in offers.items():
        found = violations(seen.offer.capacity, need)
        if found:
            never[worker] = found
    capable = sorted(w for w in offers if w not in never)
    unknown = sorted(w for w in held_by if w not in offers)  # busy since before we saw an offer
    if not capable and not unknown:
        return [*lines, *_never_lines(need, [offers[w].offer.capacity for w in never], never)]
    free = [
        w for w in capable
        if w not in taken and w not in resting and not violations(offers[w].offer.room, need)
    ]  # fmt: skip
    busy = [w for w in capable if w not in taken and w not in free and w not in resting]
    busy += [w for w in unknown if w not in resting]
    already = [w for w in capable if w in taken]
    if free:
        lines.append(f"{_plural(len(free), 'worker')} can take it; waiting for their next request")
    if busy:
        lines.append(f"{_plural(len(busy), 'worker')} busy")
    if already:
        lines.append(
            f"{_plural(len(already), 'worker')} already ran a replica of this task "
            "(each replica needs a different worker)"
        )
    if resting:
        lines.append(
            f"{_plural(len(resting), 'worker')} sidelined for {max(resting.values()):.0f} s more "
            f"at most: {'its' if len(resting) == 1 else 'their'} leases failed to start (a sick "
            "worker is given no work for a while)"
        )
    if never:
        lines.append(f"{_plural(len(never), 'worker')} too small for it")
    for replica in queued:
        if replica.attempts:
            lines.append(
                f"replica {replica.index} re-queued after attempt {replica.attempts} of "
                f"{status.spec.limits.max_attempts}: {replica.reason}"
            )
    return lines


def _never_lines(
    need: Caps, capacities: list[Caps], never: dict[str, list[Violation]]
) -> list[str]:
    """One line per limit that no worker meets, with the largest on offer."""
    lines: list[str] = []
    everyone = [set(v.limit for v in found) for found in never.values()]
    common = set.intersection(*everyone) if everyone else set()
    if "memory_mib" in common:
        best = max(c.memory_mib for c in capacities)
        lines.append(f"no worker offers {_mib(need.memory_mib)} memory (largest: {_mib(best)})")
    if "vcpus" in common:
        best_cpus = max(c.vcpus for c in capacities)
        lines.append(f"no worker offers {need.vcpus} vCPUs (largest: {best_cpus})")
    if "cpu_share" in common:
        lines.append(f"no worker offers a CPU share of {need.cpu_share:g}")
    if "disk_mib" in common:
        best = max(c.disk_mib for c in capacities)
        lines.append(f"no worker offers {_mib(need.disk_mib)} disk (largest: {_mib(best)})")
    if "network" in common and need.network is NetworkMode.PROXY:
        lines.append("no worker allows network access")
    if not lines:
        # Each worker misses on something different: say what for each.
        for worker, found in sorted(never.items()):
            lines.append(f"worker {worker}: {found[0].message}")
    return lines


def _mib(value: int) -> str:
    return f"{value // 1024} GiB" if value % 1024 == 0 else f"{value} MiB"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
