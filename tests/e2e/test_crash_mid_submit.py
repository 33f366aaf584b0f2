"""A scheduler killed (SIGKILL) at each step of accepting a submit, and started again: the owner
holds either an acknowledged task that the restarted scheduler still has and runs to the right
output, or an error, after which a retry is accepted and runs. Never an acknowledged task that
was lost. Real processes (an owner, a worker with real VMs, a scheduler run by
``crash_mid_submit_node.py``, which kills itself at the step named in its environment).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio

from node.errors import RpcError
from node.localnet import LocalNode, stop_all, vmlend_command
from tests.e2e.crash_mid_submit_node import BANNER, STEPS

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

CRASH_NODE = Path(__file__).with_name("crash_mid_submit_node.py")
# One worker, on loopback: its result must decide a task alone (a lab's trust settings).
SCHEDULER_TOML = '[scheduler]\nlease_timeout = "6s"\ntrust_after = 0\ndistinct_networks = false\n'
TASK = """\
name = "crash"
os = "tiny"
files = ["in.txt"]
command = "cat in.txt"
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""
# What an owner may be told when the scheduler died under its submit: the outcome is unknown.
OUTCOME_UNKNOWN = {"scheduler_unreachable", "timeout", "bad_answer"}


class CrashingScheduler(LocalNode):
    def command(self) -> list[str]:
        real, program = super().command(), vmlend_command()
        assert real[: len(program)] == program
        return [sys.executable, str(CRASH_NODE), *real[len(program) :]]


def task_dir(base: Path, step: str) -> tuple[Path, bytes]:
    where = base / f"task-{step}"
    where.mkdir()
    content = f"submitted while the scheduler died after: {step}\n".encode()
    (where / "in.txt").write_bytes(content)
    return where, content


async def submit(owner: LocalNode, scheduler: str, where: Path) -> str:
    params = {"text": TASK, "base_dir": str(where), "scheduler": scheduler}
    task_id: str = (await owner.call("task.submit", params))["task_id"]
    return task_id


async def test_a_scheduler_killed_mid_submit_loses_no_acknowledged_task(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        nodes: list[LocalNode] = []
        try:
            owner = LocalNode("owner", tmp_path / "owner", ("owner",))
            nodes.append(owner)
            await owner.start(nursery)
            worker = LocalNode("worker", tmp_path / "worker", ("worker",), owner.addrs[:1])
            nodes.append(worker)
            await worker.start(nursery)
            data = tmp_path / "scheduler"
            data.mkdir()
            (data / "node.toml").write_text(SCHEDULER_TOML)
            acked: dict[str, bytes] = {}  # task ID -> the stdout it must end with
            unknown: list[tuple[str, Path, bytes]] = []
            for step in STEPS:
                env = {"VMLEND_TEST_CRASH_AT": step}
                scheduler = CrashingScheduler(
                    f"scheduler-{step}", data, ("scheduler",), owner.addrs[:1], env=env
                )
                nodes.append(scheduler)
                await scheduler.start(nursery)
                assert BANNER + step in scheduler.output
                where, content = task_dir(tmp_path, step)
                try:
                    with trio.fail_after(120):
                        acked[await submit(owner, scheduler.peer_id, where)] = content
                except RpcError as e:
                    told = (step, e.code, e.message)
                    unknown.append((step, where, content))
                else:
                    told = (step, "ok", "")
                assert told[1] in {"ok", *OUTCOME_UNKNOWN}, told
                assert scheduler.process is not None
                with trio.fail_after(60):
                    assert await scheduler.process.wait() == -9, scheduler.output[-20:]
            # The kill came before the answer at every step but the last.
            assert [s for s, _, _ in unknown] == list(STEPS[:-1]) or len(unknown) == len(STEPS)

            again = LocalNode("scheduler", data, ("scheduler",), owner.addrs[:1])
            nodes.append(again)
            await again.start(nursery)
            for _, where, content in unknown:  # the owner retries what it was not told
                with trio.fail_after(120):
                    acked[await submit(owner, again.peer_id, where)] = content
            for task_id, content in acked.items():
                with trio.fail_after(240):
                    status = await owner.call("task.wait", {"task_id": task_id, "timeout": 230})
                    results = await owner.call("task.results", {"task_id": task_id})
                assert status["state"] == "succeeded", (status, acked, unknown)
                assert results["stdout"] == content
            for node in nodes[:2] + nodes[-1:]:
                assert node.process is not None
                assert node.process.returncode is None, (node.name, node.output[-20:])
        finally:
            await stop_all(nodes)
            nursery.cancel_scope.cancel()
