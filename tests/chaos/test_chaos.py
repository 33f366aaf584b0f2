"""Issue 15's chaos suite, short: real nodes in the network lab and real VMs under a stream of
tasks, one fault of each kind in turn (a worker killed and restarted, a worker frozen for longer
than the lease timeout, a worker cut off the network for as long, the scheduler killed and
restarted). Every task must succeed exactly once with its own output, with at most one re-run
per fault and no VM left behind. ``bench/chaos.py`` runs the long version and reports times.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosPlan, Fault, run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

LEASE_TIMEOUT = 6.0


async def test_every_task_succeeds_once_through_kill_freeze_partition_and_restart(
    lab_prefix: str, tmp_path: Path
) -> None:
    faults = (
        Fault("kill", hold=3.0),
        Fault("freeze", hold=LEASE_TIMEOUT + 4),
        Fault("partition", hold=LEASE_TIMEOUT + 4),
        Fault("scheduler-restart", hold=4.0),
    )
    plan = ChaosPlan(
        workers=2, tasks=10, task_seconds=3.0, lease_timeout=LEASE_TIMEOUT, faults=faults,
        bound=420.0,
    )  # fmt: skip
    report = await run_chaos(lab_prefix, tmp_path, plan)
    shown = json.dumps(report.as_dict(), indent=1)
    assert report.succeeded == plan.tasks, shown
    assert not report.failed, shown
    assert not report.lost, shown
    assert not report.wrong_output, shown
    assert not report.duplicated, shown
    assert not report.orphan_vms, shown
    assert report.re_runs <= len(faults), shown
    for fault in report.faults:
        # Each fault struck a worker while its VM ran a task (the scheduler's restart: any).
        assert fault.kind == "scheduler-restart" or fault.task_id is not None, shown
        if fault.kind in ("freeze", "partition"):
            # Given up once the lease timed out; generous bounds, the bench has the figures.
            assert fault.requeued_after_s is not None, shown
            assert fault.requeued_after_s <= LEASE_TIMEOUT + 15, shown
        if fault.kind != "scheduler-restart":
            assert fault.serving_again_after_s is not None or fault is report.faults[-1], shown
