"""What a queued task waits for, through the real ``vmlend`` binary (issue 18, item 6): on a
terminal (a real pty here) ``wait``, ``logs -f``, ``run`` and ``submit --wait`` say it on stderr
after a few seconds, and clear it; nothing when stderr is not a terminal or with ``--quiet``;
``wait --timeout`` exits 124 with one line. No worker runs, so the task stays queued."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import termios
from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, local_network, vmlend_command
from tests.e2e.test_cli_results import QUEUED, _submit

pytestmark = pytest.mark.e2e

ROLES = [("scheduler",), ("owner",)]
CLEAR = "\r\x1b[K"
WAITING = "waiting for a worker; no worker has asked for work recently"


class OnPty:
    """A ``vmlend`` process whose stderr is a terminal (the pty's slave side); stdout a pipe."""

    def __init__(self, owner: LocalNode, *args: str) -> None:
        self.argv = [*vmlend_command(), args[0], "--data", str(owner.data_dir), *args[1:]]
        self.err = ""
        self.out = b""

    async def run(self, nursery: trio.Nursery) -> trio.Process:
        master, slave = pty.openpty()
        # A pty starts 0 columns wide; a real terminal has a width.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        try:
            process = await trio.lowlevel.open_process(self.argv, stdout=-1, stderr=slave)
        finally:
            os.close(slave)
        nursery.start_soon(self._read_pty, master)
        nursery.start_soon(self._read_out, process)
        return process

    async def _read_pty(self, master: int) -> None:
        async with trio.lowlevel.FdStream(master) as stream:
            while True:
                try:
                    chunk = await stream.receive_some()
                except (OSError, trio.BrokenResourceError):
                    return  # EIO: the process closed its side
                if not chunk:
                    return
                self.err += chunk.decode(errors="replace")

    async def _read_out(self, process: trio.Process) -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            self.out += chunk

    async def until(self, text: str) -> None:
        while text not in self.err:  # noqa: ASYNC110 - the reader owns the pty
            await trio.sleep(0.05)


async def _on_pty(owner: LocalNode, *args: str) -> tuple[int, OnPty]:
    watched = OnPty(owner, *args)
    async with trio.open_nursery() as nursery:
        process = await watched.run(nursery)
        with trio.fail_after(60):
            code = await process.wait()
    return code, watched


async def _until_active(owner: LocalNode, task_id: str) -> None:
    """Polls: the scheduler assembles the image before it queues the task."""
    while True:
        status = await owner.call("task.status", {"task_id": task_id})
        if status["state"] == "active":
            return
        await trio.sleep(0.5)


async def test_a_queued_task_says_what_it_waits_for_on_a_terminal_only(tmp_path: Path) -> None:
    async with local_network(tmp_path, 2, roles=ROLES) as (_, owner):
        task_id = await _submit(owner, tmp_path, QUEUED)
        with trio.fail_after(120):
            await _until_active(owner, task_id)

        # wait --timeout on a terminal: the reason after a few seconds, cleared before the
        # one-line timeout message, exit 124.
        code, shown = await _on_pty(owner, "wait", "--timeout", "9s", task_id)
        assert code == 124, shown.err
        assert f"{CLEAR}{task_id}: active: 1 replica {WAITING}" in shown.err, shown.err
        last = shown.err.rsplit(CLEAR, 1)[1]
        assert last == (
            f"vmlend wait: {task_id} is still active after 9s; it goes on "
            "('vmlend cancel' stops it)\r\n"
        ), shown.err
        assert shown.out == b""

        # Not a terminal: no progress, only the line.
        with trio.fail_after(60):
            done = await trio.run_process(
                [*vmlend_command(), "wait", "--data", str(owner.data_dir), "--timeout", "5s",
                 task_id],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
        assert done.returncode == 124
        assert done.stderr.decode() == (
            f"vmlend wait: {task_id} is still active after 5s; it goes on "
            "('vmlend cancel' stops it)\n"
        )

        # --quiet on a terminal: no progress either.
        code, shown = await _on_pty(owner, "wait", "--quiet", "--timeout", "5s", task_id)
        assert code == 124
        assert WAITING not in shown.err
        assert CLEAR not in shown.err

        # A bad --timeout is one usage line.
        with trio.fail_after(60):
            done = await trio.run_process(
                [*vmlend_command(), "wait", "--timeout", "soon", task_id],
                capture_stderr=True, check=False,
            )  # fmt: skip
        assert done.returncode == 2
        assert "argument --timeout: not a duration: 'soon'" in done.stderr.decode()

        # logs -f says it too; so do run and submit --wait, whose Ctrl-C then cancels their
        # queued task (logs -f only stops watching).
        for args in (
            ("logs", "-f", task_id),
            ("run", "--memory", "128MiB", "--", "true"),
            ("submit", "--wait", str(tmp_path / "task.toml")),
        ):
            watched = OnPty(owner, *args)
            async with trio.open_nursery() as nursery:
                process = await watched.run(nursery)
                with trio.fail_after(60):
                    await watched.until(WAITING)
                process.send_signal(signal.SIGINT)
                with trio.fail_after(60):
                    code = await process.wait()
            assert code == 130
            if args[0] == "logs":
                assert watched.err.endswith(CLEAR), watched.err
            else:
                command, name = args[0], "run" if args[0] == "run" else "queued"
                said = f"{CLEAR}vmlend {command}: cancelling {name}-"
                assert said in watched.err, watched.err
                assert watched.err.endswith(" cancelled\r\n"), watched.err
