"""A task that names a ready image (``image = REF``) runs it with no assembly: built and published
on the scheduler's node, then submitted by the owner by catalog name (task file) and by image ID
(``vmlend run --image``). Three processes, two VM boots.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from node.localnet import vmlend_command
from tests.e2e.test_task_faults import network

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

EXAMPLES = Path(__file__).parents[2] / "examples"
BY_NAME = """\
name = "by-name"
image = "hello"
command = "echo by-name"
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""


async def test_a_published_image_runs_by_name_and_by_id(tmp_path: Path) -> None:
    roles = [("owner",), ("scheduler",), ("worker",)]
    async with network(tmp_path, roles) as nodes:
        owner, scheduler = nodes[0], nodes[1]
        build = [*vmlend_command(), "image", "build", str(EXAMPLES / "hello.toml")]
        build += ["--data", str(scheduler.data_dir), "--publish", "--json"]
        with trio.fail_after(180):
            built = await trio.run_process(
                build, capture_stdout=True, capture_stderr=True, check=False
            )
        assert built.returncode == 0, built.stderr.decode()
        image_id = json.loads(built.stdout)["image_id"]

        with trio.fail_after(180):
            answer = await owner.call("task.submit", {"text": BY_NAME, "base_dir": str(tmp_path)})
            task_id = answer["task_id"]
            status = await owner.call("task.wait", {"task_id": task_id, "timeout": 170})
            results = await owner.call("task.results", {"task_id": task_id})
        assert status["state"] == "succeeded", status
        assert results["stdout"] == b"by-name\n"

        run = [*vmlend_command(), "run", "--data", str(owner.data_dir), "--memory", "128MiB"]
        run += ["--image", image_id, "--", "sh", "-c", "echo by-id; exit 3"]
        with trio.fail_after(180):
            done = await trio.run_process(
                run, capture_stdout=True, capture_stderr=True, check=False
            )
        assert done.returncode == 3, done.stderr.decode()
        assert b"by-id" in done.stdout


async def test_an_unknown_image_fails_the_task_with_the_reason(tmp_path: Path) -> None:
    roles = [("owner",), ("scheduler",)]
    async with network(tmp_path, roles) as nodes:
        owner = nodes[0]
        text = BY_NAME.replace('image = "hello"', 'image = "nowhere"')
        with trio.fail_after(60):
            answer = await owner.call("task.submit", {"text": text, "base_dir": str(tmp_path)})
            status = await owner.call("task.wait", {"task_id": answer["task_id"], "timeout": 50})
        assert status["state"] == "failed", status
        assert "no image 'nowhere'" in status["reason"]
