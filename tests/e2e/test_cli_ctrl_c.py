"""Ctrl-C on ``vmlend run`` through the real binary and a real VM (issue 18, item 1): the task is
cancelled and its VM gone within seconds; a second Ctrl-C detaches and says how to cancel.
Before, ``run`` exited 130 in 0.1 s, printed nothing, and the task ran on."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, local_network, vmlend_command
from tests.e2e.test_tasks import ROLES, _domains_of, _ready, _running_domains

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

SLEEP = ["--memory", "128MiB", "--", "sh", "-c", "echo started; sleep 300"]


class Run:
    """A real ``vmlend run`` process, its stdout and stderr read as they come."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.out = b""
        self.err = b""

    async def pump(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, "out")
            nursery.start_soon(self._read, "err")

    async def _read(self, which: str) -> None:
        stream = self.process.stdout if which == "out" else self.process.stderr
        assert stream is not None
        async for chunk in stream:
            setattr(self, which, getattr(self, which) + chunk)

    async def until(self, which: str, text: bytes) -> None:
        # Polls the pumped output: the pump owns the pipe.
        while text not in getattr(self, which):  # noqa: ASYNC110
            await trio.sleep(0.05)

    def task_id(self) -> str:
        line = next(x for x in self.err.decode().splitlines() if x.startswith("vmlend run: task "))
        return line.removeprefix("vmlend run: task ")


async def _start_run(nursery: trio.Nursery, owner: LocalNode) -> Run:
    cmd = [*vmlend_command(), "run", "--data", str(owner.data_dir), *SLEEP]
    process = await trio.lowlevel.open_process(cmd, stdout=-1, stderr=-1)
    run = Run(process)
    nursery.start_soon(run.pump)
    return run


async def _vm_of(worker: LocalNode) -> str:
    assert worker.process is not None
    ours = _domains_of(worker.process.pid) & await _running_domains()
    assert len(ours) == 1, f"the task's VM should be running: {ours}"
    return ours.pop()


async def _until_gone(domain: str) -> None:
    # libvirt has no blocking "until gone" query the test can use without importing it.
    while domain in await _running_domains():  # noqa: ASYNC110
        await trio.sleep(0.2)


async def test_ctrl_c_on_run_cancels_the_task_and_its_vm_is_gone_within_10_s(
    tmp_path: Path,
) -> None:
    async with local_network(tmp_path, 3, roles=ROLES) as nodes, trio.open_nursery() as nursery:
        await _ready(nodes)
        worker, owner = nodes[1], nodes[2]

        # --detach: the task ID at once, the task left running.
        with trio.fail_after(60):
            detached = await trio.run_process(
                [*vmlend_command(), "run", "--detach", "--data", str(owner.data_dir), *SLEEP],
                capture_stdout=True,
                capture_stderr=True,
            )
        detached_id = detached.stdout.decode().strip()
        assert detached_id.startswith("run-"), detached
        with trio.fail_after(60):
            status = await owner.call("task.status", {"task_id": detached_id})
            assert status["state"] in ("submitted", "assembling", "active"), status
            cancelled = await trio.run_process(
                [*vmlend_command(), "cancel", "--data", str(owner.data_dir), detached_id],
                capture_stdout=True,
            )
        assert b"cancelled" in cancelled.stdout

        # One Ctrl-C: cancelled, said so, the VM gone within 10 s.
        run = await _start_run(nursery, owner)
        with trio.fail_after(240):
            await run.until("out", b"started\n")
        domain = await _vm_of(worker)
        task_id = run.task_id()
        run.process.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            await _until_gone(domain)
            code = await run.process.wait()
        assert code == 130, run.err
        with trio.fail_after(5):
            await run.until("err", b"cancelled\n")
        err = run.err.decode()
        assert f"vmlend run: cancelling {task_id} (Ctrl-C again to detach)" in err
        assert f"vmlend run: {task_id} cancelled" in err
        assert "Traceback" not in err
        with trio.fail_after(30):
            status = await owner.call("task.status", {"task_id": task_id})
        assert status["state"] == "cancelled", status

        # Two Ctrl-C: the node is frozen so the cancel hangs; the second detaches and says how
        # to cancel later.
        run = await _start_run(nursery, owner)
        with trio.fail_after(240):
            await run.until("out", b"started\n")
        task_id = run.task_id()
        assert owner.process is not None
        os.kill(owner.process.pid, signal.SIGSTOP)
        try:
            run.process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                await run.until("err", b"Ctrl-C again to detach")
            run.process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                code = await run.process.wait()
        finally:
            os.kill(owner.process.pid, signal.SIGCONT)
        assert code == 130, run.err
        with trio.fail_after(5):
            await run.until("err", task_id.encode() + b"\n")
        again = f"vmlend cancel --data {owner.data_dir} {task_id}"
        assert f"detached; {task_id} may still be running; to cancel it: {again}" in (
            run.err.decode()
        )
        # The command it printed works (and leaves the worker free).
        with trio.fail_after(60):
            done = await trio.run_process(
                [*vmlend_command(), *again.split()[1:]], capture_stdout=True
            )
        assert b"cancelled" in done.stdout
