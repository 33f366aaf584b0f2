"""Warm starts across real ``vmlend node start`` processes: the worker builds a snapshot of a
booted guest behind its first task and restores it for the next, which ``vmlend run`` drives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, local_network, vmlend_command

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

ROLES = [("scheduler",), ("worker",), ("owner",)]
FIRST = """\
name = "first"
os = "tiny"
command = "echo booted"
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""


async def until_logged(node: LocalNode, pattern: str, seconds: float) -> str:
    wanted = re.compile(pattern)
    with trio.fail_after(seconds):
        while True:
            for line in node.output:
                if wanted.search(line):
                    return line
            await trio.sleep(0.1)


async def test_the_second_task_runs_in_a_restored_guest_through_vmlend_run(
    tmp_path: Path,
) -> None:
    async with local_network(tmp_path / "nodes", 3, roles=ROLES, warm=True) as nodes:
        _scheduler, worker, owner = nodes
        with trio.fail_after(60):
            for n in nodes:
                await n.call("schedulers.wait", {"count": 1, "timeout": 60})
        with trio.fail_after(180):
            answer = await owner.call("task.submit", {"text": FIRST, "base_dir": str(tmp_path)})
            first = await owner.call("task.wait", {"task_id": answer["task_id"], "timeout": 170})
        assert first["state"] == "succeeded"
        await until_logged(worker, r"runs in vmlend-\S+ \(booted\)", 5)
        await until_logged(worker, r"warm snapshot \S+ ready", 120)

        with trio.fail_after(120):
            done = await trio.run_process(
                [
                    *vmlend_command(), "run", "--data", str(owner.data_dir), "--memory", "128MiB",
                    "--", "sh", "-c", "echo from a restored guest; exit 3",
                ],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert done.returncode == 3, done.stderr.decode()
        assert "from a restored guest" in done.stdout.decode()
        await until_logged(worker, r"runs in vmlend-\S+ \(restored from a warm snapshot\)", 5)
