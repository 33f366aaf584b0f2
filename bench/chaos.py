"""Issue 15's chaos bench: 100 or more tasks through real nodes and real VMs in the network lab
while workers are killed, frozen and cut off and the scheduler is killed, against the same stream
with no fault in the same run. Prints JSON: succeeded, failed, lost, duplicated, wrong output, VM
runs and re-runs, wasted VM-seconds, orphan VMs, and per fault when it struck, how long it held,
and how long recovery took (the replica given up, re-run elsewhere, the node serving again, the
first lease after a scheduler's return). Needs root (network namespaces) and libvirt.

    sudo .venv/bin/python bench/chaos.py [--tasks 100] [--workers 2] [--rounds 2]
        [--lease-timeout 10] [--task-seconds 3] [--no-baseline] [--keep DIR]

Each round strikes four faults in turn: a worker killed -9 (restarted after 5 s), a worker frozen
(SIGSTOP) for the lease timeout + 10 s, a worker cut off the network as long, and the scheduler
killed -9 (restarted after 10 s, on its port). A fault strikes a worker while its VM runs a task.
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


async def main(args: argparse.Namespace) -> None:
    sweep_orphans()
    bound = 600.0 + args.tasks * (args.task_seconds + 8.0) * 2 / args.workers
    common: dict[str, Any] = {
        "workers": args.workers, "tasks": args.tasks, "task_seconds": args.task_seconds,
        "lease_timeout": args.lease_timeout, "bound": bound,
    }  # fmt: skip
    results: dict[str, Any] = {"bench": "chaos", **common, "rounds": args.rounds}
    with workspace(args.keep) as tmp:
        if args.baseline:
            progress(f"baseline: {args.tasks} tasks, no fault")
            report = await run_chaos(test_prefix(), Path(tmp) / "baseline", ChaosPlan(**common))
            results["baseline"] = report.as_dict()
        plan = ChaosPlan(**common, faults=faults(args.rounds, args.lease_timeout), gap=5.0)
        progress(f"chaos: {args.tasks} tasks, {len(plan.faults)} faults")
        report = await run_chaos(test_prefix(), Path(tmp) / "chaos", plan)
        results["chaos"] = report.as_dict()
    if args.baseline:
        base, hit = results["baseline"], results["chaos"]
        results["wall_ratio"] = round(hit["wall_s"] / base["wall_s"], 3)
        results["vm_seconds_ratio"] = round(hit["vm_seconds"] / base["vm_seconds"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lease-timeout", type=float, default=10.0)
    parser.add_argument("--task-seconds", type=float, default=3.0)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--keep", metavar="DIR", help="keep the nodes' logs under DIR")
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main, parser.parse_args())
