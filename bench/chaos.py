"""Issue 15's chaos bench: 100 or more tasks through real nodes and real VMs in the network lab
while workers are killed, frozen and cut off and the scheduler is killed, against the same stream
with no fault in the same run. Prints JSON: succeeded, failed, lost, duplicated, wrong output, VM
runs and re-runs, wasted VM-seconds, orphan VMs, and per fault when it struck, how long it held,
and how long recovery took (the replica given up, re-run elsewhere, the node serving again, the
first lease after a scheduler's return); then, among three schedulers, how long after a partition
heals their catalogs agree again. Needs root (network namespaces) and libvirt.

    sudo .venv/bin/python bench/chaos.py [--tasks 100] [--workers 2] [--rounds 2]
        [--lease-timeout 10] [--task-seconds 3] [--no-baseline] [--keep DIR]
        [--catalog-rounds 3] [--catalog-hold 20]

Each round strikes four faults in turn: a worker killed -9 (restarted after 5 s), a worker frozen
(SIGSTOP) for the lease timeout + 10 s, a worker cut off the network as long, and the scheduler
killed -9 (restarted after 10 s, on its port). A fault strikes a worker while its VM runs a task.
Each catalog round cuts one of three schedulers off for ``--catalog-hold`` seconds (beyond the peer
timeout), publishes an entry on each side, and times, from the heal, each entry's arrival on every
scheduler; during the cut, it times listing the schedulers on the healthy side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.chaos.catalog_partition import as_dicts, run_catalog_partition
from tests.chaos.harness import ChaosPlan, Fault, run_chaos
from tests.netlab.lab import sweep_orphans, test_prefix


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def faults(rounds: int, lease_timeout: float) -> tuple[Fault, ...]:
    one = (
        Fault("kill", hold=5.0),
        Fault("freeze", hold=lease_timeout + 10),
        Fault("partition", hold=lease_timeout + 10),
        Fault("scheduler-restart", hold=10.0),
    )
    return one * rounds


@contextmanager
def workspace(keep: str | None) -> Iterator[str]:
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
            yield tmp
        return
    tmp = tempfile.mkdtemp(prefix="bench-chaos-", dir=keep)
    progress(f"every line of every node: {tmp}/*/chaos.log (kept)")
    yield tmp


async def tasks_under_faults(
    args: argparse.Namespace, common: dict[str, Any], tmp: Path
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.baseline:
        progress(f"baseline: {args.tasks} tasks, no fault")
        report = await run_chaos(test_prefix(), tmp / "baseline", ChaosPlan(**common))
        results["baseline"] = report.as_dict()
    plan = ChaosPlan(**common, faults=faults(args.rounds, args.lease_timeout), gap=5.0)
    progress(f"chaos: {args.tasks} tasks, {len(plan.faults)} faults")
    report = await run_chaos(test_prefix(), tmp / "chaos", plan)
    results["chaos"] = hit = report.as_dict()
    if args.baseline:
        base = results["baseline"]
        results["wall_ratio"] = round(hit["wall_s"] / base["wall_s"], 3)
        results["vm_seconds_ratio"] = round(hit["vm_seconds"] / base["vm_seconds"], 3)
    return results


async def main(args: argparse.Namespace) -> None:
    sweep_orphans()
    bound = 600.0 + args.tasks * (args.task_seconds + 8.0) * 2 / args.workers
    common: dict[str, Any] = {
        "workers": args.workers, "tasks": args.tasks, "task_seconds": args.task_seconds,
        "lease_timeout": args.lease_timeout, "bound": bound,
    }  # fmt: skip
    results: dict[str, Any] = {"bench": "chaos", **common, "rounds": args.rounds}
    with workspace(args.keep) as tmp:
        if args.tasks:
            results.update(await tasks_under_faults(args, common, Path(tmp)))
        if args.catalog_rounds:
            progress(f"catalog: {args.catalog_rounds} partitions of {args.catalog_hold:g}s")
            rounds = await run_catalog_partition(
                test_prefix(), Path(tmp) / "catalog", rounds=args.catalog_rounds,
                hold=args.catalog_hold,
            )  # fmt: skip
            converged = sorted(r.converged_after_s for r in rounds)
            results["catalog_partition"] = {
                "rounds": as_dicts(rounds),
                "converged_after_s": {"median": converged[len(converged) // 2],
                                      "max": converged[-1]},
            }  # fmt: skip
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100, help="0: the catalog rounds only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lease-timeout", type=float, default=10.0)
    parser.add_argument("--task-seconds", type=float, default=3.0)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--keep", metavar="DIR", help="keep the nodes' logs under DIR")
    parser.add_argument("--catalog-rounds", type=int, default=3, help="0: none")
    parser.add_argument("--catalog-hold", type=float, default=20.0)
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main, parser.parse_args())
