"""Issue 15 with real processes and real VMs: a worker that cannot start VMs is routed around, and
a result finished while its scheduler was down survives the worker's own kill -9.

The scheduler runs with a 6 s lease timeout (as in test_task_faults). Each worker runs one VM at
a time (the default policy).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode
from tests.e2e.test_task_faults import network, submit, task_text
from tests.e2e.test_tasks import _first_output

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

VM_ROOT = Path("/var/lib/vmlend")  # reachable by the libvirt-qemu user, unlike tmp_path


@asynccontextmanager
async def own_vm_dir() -> AsyncIterator[Path]:
    path = VM_ROOT / f"test-sick-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


async def test_a_worker_that_cannot_start_vms_is_sidelined_and_every_task_runs_once_elsewhere(
    tmp_path: Path,
) -> None:
    roles = [("owner",), ("scheduler",), ("worker",), ("worker",)]
    async with own_vm_dir() as vm_dir:
        # node3's VM directory (its images and VM files) is set before it starts (its backend
        # opens there), then made unusable: every lease it takes fails before a VM exists.
        toml = f'[worker]\nvm_dir = "{vm_dir}"\n'
        async with network(tmp_path, roles, tomls={3: toml}) as nodes:
            owner, healthy, sick = nodes[0], nodes[2], nodes[3]
            shutil.rmtree(vm_dir)
            vm_dir.write_text("not a directory\n")
            ids = []
            with trio.fail_after(60):
                for n in range(4):
                    ids.append(await submit(owner, task_text(f"echo task-{n}"), tmp_path))
            statuses = []
            with trio.fail_after(300):
                for task_id in ids:
                    statuses.append(
                        await owner.call("task.wait", {"task_id": task_id, "timeout": 290})
                    )
            for n, status in enumerate(statuses):
                assert status["state"] == "succeeded", status
                assert status["results"] == 1, status
                assert status["reported_by"] == [healthy.peer_id], status
                results = await owner.call("task.results", {"task_id": ids[n]})
                assert results["stdout"] == f"task-{n}\n".encode()
            before_a_vm = (" failed fetching its image: ", " failed starting its VM: ")
            failed = [x for x in sick.output if any(step in x for step in before_a_vm)]
            assert failed, "\n".join(x for x in sick.output if "DHT" not in x)[-6000:]
            # Sidelined: after its first failure it is refused for 5 s, 10 s, ... so it fails
            # far fewer leases than it would asking every second.
            assert len(failed) <= 4, failed


async def test_a_result_finished_while_the_scheduler_was_down_survives_the_workers_kill(
    tmp_path: Path,
) -> None:
    roles = [("owner",), ("worker",), ("scheduler",)]
    async with network(tmp_path, roles) as nodes:
        owner, worker, scheduler = nodes
        with trio.fail_after(120):
            task_id = await submit(owner, task_text("echo started; sleep 3; echo done"), tmp_path)
            assert await _first_output(owner, task_id) == b"started\n"
        await scheduler.kill()
        state = worker.data_dir / "agent_leases.json"
        with trio.fail_after(60):  # the VM finishes; its result waits for the scheduler
            while not json.loads(state.read_text() or "{}").get("results"):  # noqa: ASYNC110
                await trio.sleep(0.2)
        await worker.kill()
        async with trio.open_nursery() as nursery:
            again_s = LocalNode("again-s", scheduler.data_dir, scheduler.roles, owner.addrs[:1])
            again_w = LocalNode("again-w", worker.data_dir, worker.roles, owner.addrs[:1])
            with trio.fail_after(240):
                await again_s.start(nursery)
                await again_w.start(nursery)
                status = await owner.call("task.wait", {"task_id": task_id, "timeout": 200})
                results = await owner.call("task.results", {"task_id": task_id})
            vms_run = [line for line in again_w.output if " runs in vmlend-" in line]
            assert await again_w.stop() == 0
            assert await again_s.stop() == 0
    assert status["state"] == "succeeded", status
    assert status["results"] == 1
    assert [r["attempts"] for r in status["replicas"]] == [1]  # never leased again
    assert results["stdout"] == b"started\ndone\n"
    assert not vms_run  # the restarted worker ran no VM: it delivered what it kept
