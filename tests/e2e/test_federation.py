"""Federation across real processes and real VMs: two schedulers, one worker serving both, one
owner. A task runs through scheduler A; A is SIGKILLed; a task submitted to scheduler B still runs
on the same worker, and nothing waits on the dead scheduler.

Four processes (the box has two cores): owner, scheduler A, scheduler B, worker. Two VM boots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from node.errors import RpcError
from node.localnet import LocalNode
from tests.e2e.test_task_faults import network, task_text

pytestmark = [pytest.mark.e2e, pytest.mark.vm]


async def _submit_to(owner: LocalNode, scheduler: LocalNode, command: str, base: Path) -> Any:
    params = {"text": task_text(command), "base_dir": str(base), "scheduler": scheduler.peer_id}
    return await owner.call("task.submit", params)


async def test_a_killed_scheduler_does_not_stop_the_other_or_its_worker(tmp_path: Path) -> None:
    roles = [("owner",), ("scheduler",), ("scheduler",), ("worker",)]
    async with network(tmp_path, roles) as nodes:
        owner, a, b, worker = nodes
        with trio.fail_after(60):
            for n in (owner, worker):
                await n.call("schedulers.wait", {"count": 2, "timeout": 55})
        with trio.fail_after(120):
            first = await _submit_to(owner, a, "echo via-a", tmp_path)
            assert first["scheduler"] == a.peer_id
            done = await owner.call("task.wait", {"task_id": first["task_id"], "timeout": 110})
        assert done["state"] == "succeeded", done
        assert done["reported_by"] == [worker.peer_id]

        await a.kill()

        with trio.fail_after(150):
            second = await _submit_to(owner, b, "echo via-b", tmp_path)
            assert second["scheduler"] == b.peer_id
            status = await owner.call("task.status", {"task_id": second["task_id"]})
            # Any state of a live task (a scheduler that built the tiny OS at start assembles
            # in a moment, so it may be active already).
            assert status["state"] in {"submitted", "assembling", "active"}, status
            done = await owner.call("task.wait", {"task_id": second["task_id"], "timeout": 140})
            results = await owner.call("task.results", {"task_id": second["task_id"]})
        assert done["state"] == "succeeded", done
        assert done["reported_by"] == [worker.peer_id]
        assert results["stdout"] == b"via-b\n"
        with trio.fail_after(60):
            status = await owner.call("task.status", {"task_id": second["task_id"]})
            assert status["state"] == "succeeded"
            # The dead scheduler's task: a clear error, not a hang.
            with pytest.raises(RpcError) as lost:
                await owner.call("task.status", {"task_id": first["task_id"]})
        assert lost.value.code == "scheduler_unreachable", lost.value
