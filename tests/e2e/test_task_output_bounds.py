"""A task that floods its stdout, across real ``vmlend node start`` processes and a real VM:
the worker streams at most its live budget, the scheduler keeps at most its window, the owner
is told that output was cut and how much, and every node goes on serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from catalog.dispatch import LIVE_LOG_NOTE_ROOM, MAX_LIVE_LOG
from node.localnet import LocalNode, local_network, vmlend_command
from scheduler_role.live_logs import CUT_NOTE as SCHEDULER_CUT_NOTE
from scheduler_role.live_logs import MAX_LOG_BYTES
from worker_role.live_log import CUT_NOTE

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

ROLES = [("scheduler",), ("worker",), ("owner",)]
FLOOD = 128 << 20  # 16 times the live budget, written as fast as the guest can
LINE = "0123456789abcdef" * 4  # `yes` repeats it with a newline: 65 bytes a line


async def _ready(nodes: list[LocalNode]) -> None:
    with trio.fail_after(60):
        for n in nodes:
            await n.call("schedulers.wait", {"count": 1, "timeout": 60})


async def _vmlend(owner: LocalNode, *args: str) -> trio.CompletedProcess[bytes]:
    cmd = [*vmlend_command(), *args[:1], "--data", str(owner.data_dir), *args[1:]]
    return await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)


async def test_a_flood_of_output_is_cut_and_said_to_be_cut(tmp_path: Path) -> None:
    async with local_network(tmp_path, 3, roles=ROLES) as nodes:
        await _ready(nodes)
        owner = nodes[2]
        flood = f"yes {LINE} | head -c {FLOOD}; echo flooded >&2"
        with trio.fail_after(600):
            done = await _vmlend(
                owner, "run", "--memory", "128MiB", "--timeout", "8m", "--", "sh", "-c", flood
            )
        assert done.returncode == 0, done.stderr[-2000:]
        # The owner saw at most the worker's budget of the guest's stdout ...
        assert 0 < len(done.stdout) <= MAX_LIVE_LOG
        # ... and was told it was cut, and how much was dropped (the worker's last note).
        assert CUT_NOTE in done.stderr, done.stderr[-2000:]
        assert b"bytes dropped (stdout " in done.stderr, done.stderr[-2000:]
        # The worker kept to its budget: the scheduler never had to cut it.
        assert SCHEDULER_CUT_NOTE not in done.stderr
        task_id = done.stderr.split(b"vmlend run: task ", 1)[1].split()[0].decode()

        # What the scheduler still holds of it: its window, and the notes.
        with trio.fail_after(60):
            held = await _vmlend(owner, "logs", task_id)
        assert held.returncode == 0, held.stderr
        assert len(held.stdout) + len(held.stderr) <= MAX_LOG_BYTES + LIVE_LOG_NOTE_ROOM
        assert b"bytes dropped (stdout " in held.stderr

        # Every node is still serving: the next task runs as usual.
        with trio.fail_after(300):
            after = await _vmlend(owner, "run", "--memory", "128MiB", "--", "echo", "still-here")
        assert (after.returncode, after.stdout) == (0, b"still-here\n"), after.stderr[-2000:]
