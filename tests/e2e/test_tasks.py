"""Tasks across real ``vmlend node start`` processes and real VMs: owner -> scheduler -> worker.

Three processes: a scheduler, a worker (lending one VM at a time) and an owner. Budget: every
VM boots under TCG in 5-20 s, so each test runs a handful of tiny-OS tasks.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import trio

from node.errors import RpcError
from node.localnet import LocalNode, local_network, vmlend_command
from node.rpc_client import AsyncClient

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

ROLES = [("scheduler",), ("worker",), ("owner",)]
VM_DIR = Path("/var/lib/vmlend/vm")
TASK = """\
name = "roundtrip"
os = "tiny"
files = ["in.txt"]
command = "cat in.txt; echo to-stderr >&2; mkdir -p /out; echo result > /out/r.txt; exit 7"
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""
SLEEPER = """\
name = "sleeper"
os = "tiny"
command = "echo started; sleep 300"
[resources]
memory = "128MiB"
[limits]
max_runtime = "10m"
"""


async def _ready(nodes: list[LocalNode]) -> None:
    with trio.fail_after(60):
        for n in nodes:
            await n.call("schedulers.wait", {"count": 1, "timeout": 60})


def _task_dir(tmp_path: Path, text: str) -> Path:
    where = tmp_path / "task"
    where.mkdir(exist_ok=True)
    (where / "in.txt").write_text("hello file\n")
    (where / "task.toml").write_text(text)
    return where


async def _submit(owner: LocalNode, where: Path) -> str:
    text = (where / "task.toml").read_text()
    answer = await owner.call("task.submit", {"text": text, "base_dir": str(where)})
    task_id: str = answer["task_id"]
    return task_id


def _domains_of(pid: int) -> set[str]:
    """Domains the process ``pid`` started (their owner.json in the VM runtime dir)."""
    found = set()
    for d in VM_DIR.glob("vmlend-*"):
        try:
            owner = json.loads((d / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if owner.get("pid") == pid:
            found.add(d.name)
    return found


async def _running_domains() -> set[str]:
    """The domains running on the system libvirt the worker uses (asked without blocking trio)."""
    out = await trio.run_process(
        ["virsh", "-c", "qemu:///system", "list", "--name"], capture_stdout=True
    )
    return {line.strip() for line in out.stdout.decode().splitlines() if line.strip()}


async def test_task_round_trip_files_exit_code_stdout_and_out_archive(tmp_path: Path) -> None:
    async with local_network(tmp_path, 3, roles=ROLES) as nodes:
        await _ready(nodes)
        owner = nodes[2]
        where = _task_dir(tmp_path, TASK)
        with trio.fail_after(180):
            task_id = await _submit(owner, where)
            status = await owner.call("task.wait", {"task_id": task_id, "timeout": 170})
        assert status["state"] == "succeeded", status
        assert status["exit_code"] == 7
        out = tmp_path / "results"
        with trio.fail_after(60):
            results = await owner.call("task.results", {"task_id": task_id, "out": str(out)})
        assert (results["stdout"], results["stderr"]) == (b"hello file\n", b"to-stderr\n")
        assert (out / "stdout").read_bytes() == b"hello file\n"
        with tarfile.open(fileobj=io.BytesIO((out / "out.tar").read_bytes())) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("r.txt"))
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == b"result\n"

        # `vmlend run`: output streamed, the task's exit code is ours.
        cmd = [*vmlend_command(), "run", "--data", str(owner.data_dir), "--memory", "128MiB",
               "--env", "WHO=via-run", "--disk", "64MiB", "--cpu-share", "0.5",
               "--", "sh", "-c", 'echo "$WHO"; exit 5']  # fmt: skip
        with trio.fail_after(180):
            done = await trio.run_process(
                cmd, capture_stdout=True, capture_stderr=True, check=False
            )
        assert done.returncode == 5, done.stderr
        assert done.stdout == b"via-run\n"

        # A task no worker could ever hold is refused at submit, with the reason.
        big = TASK.replace('memory = "128MiB"', 'memory = "64GiB"')
        with trio.fail_after(60), pytest.raises(RpcError, match="memory") as caught:
            await _submit(owner, _task_dir(tmp_path, big))
        assert caught.value.code == "unplaceable"
        # An invalid task file is refused with its line and key.
        with trio.fail_after(60), pytest.raises(RpcError, match=":2: oss: unknown key") as bad:
            await _submit(owner, _task_dir(tmp_path, TASK.replace("os = ", "oss = ")))
        assert bad.value.code == "invalid_task"


async def _first_output(owner: LocalNode, task_id: str) -> bytes:
    async with (
        AsyncClient.connect(owner.rpc_path) as client,
        client.stream("task.logs", {"task_id": task_id, "follow": True}) as stream,
    ):
        async for item in stream:
            params: Any = getattr(item, "params", None)
            if params:
                data: bytes = params[1]
                return data
    raise AssertionError("the log stream ended without output")


async def test_cancel_mid_run_destroys_the_vm_within_seconds(tmp_path: Path) -> None:
    async with local_network(tmp_path, 3, roles=ROLES) as nodes:
        await _ready(nodes)
        worker, owner = nodes[1], nodes[2]
        assert worker.process is not None
        with trio.fail_after(180):
            task_id = await _submit(owner, _task_dir(tmp_path, SLEEPER))
            assert await _first_output(owner, task_id) == b"started\n"
        ours = _domains_of(worker.process.pid) & await _running_domains()
        assert len(ours) == 1, f"the task's VM should be running: {ours}"
        (domain,) = ours
        with trio.fail_after(30):
            status = await owner.call("task.cancel", {"task_id": task_id})
        assert status["state"] == "cancelled", status
        # From the cancel's acceptance: the scheduler pushes Stop, the worker destroys the VM.
        with trio.fail_after(10):
            # libvirt has no blocking "until gone" query the test can use without importing it.
            while domain in await _running_domains():  # noqa: ASYNC110
                await trio.sleep(0.2)
        assert domain not in await _running_domains()
        # What it printed before the cancel is kept, marked partial.
        with trio.fail_after(60):
            results = await owner.call("task.results", {"task_id": task_id})
        assert (results["state"], results["partial"]) == ("cancelled", True)
        assert results["stdout"] == b"started\n"
