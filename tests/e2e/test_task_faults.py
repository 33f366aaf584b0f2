"""Faults across real processes and real VMs: a worker killed mid-task, a wrong worker outvoted,
a scheduler killed and restarted, a deadline passed.

The scheduler runs with a 6 s lease timeout so that a dead worker's lease lapses quickly. The wrong
worker is a real node whose VM backend is wrapped by a test-only entry point
(``wrong_result_node.py``).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, stop_all, vmlend_command
from tests.e2e.test_tasks import _domains_of, _first_output, _running_domains
from tests.e2e.wrong_result_node import BANNER

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

SCHEDULER_TOML = '[scheduler]\nlease_timeout = "6s"\n'
WRONG_RESULT_NODE = Path(__file__).with_name("wrong_result_node.py")


class WrongResultNode(LocalNode):
    """A node whose worker reports a wrong stdout for every task it runs."""

    def command(self) -> list[str]:
        real, program = super().command(), vmlend_command()
        assert real[: len(program)] == program
        return [sys.executable, str(WRONG_RESULT_NODE), *real[len(program) :]]


def task_text(command: str, *, extra: str = "", limits: str = 'max_runtime = "3m"\n') -> str:
    return (
        f'name = "fault"\nos = "tiny"\ncommand = {command!r}\n{extra}'
        f'[resources]\nmemory = "128MiB"\n[limits]\n{limits}'
    )


@asynccontextmanager
async def network(
    base: Path,
    roles: Sequence[tuple[str, ...]],
    *,
    faulty: Sequence[int] = (),
    tomls: Mapping[int, str] = {},
) -> AsyncIterator[list[LocalNode]]:
    """node0 (an owner) is the bootstrap peer; schedulers get a short lease timeout; the nodes
    numbered in ``faulty`` report wrong results; ``tomls[i]`` is added to node i's node.toml."""
    async with trio.open_nursery() as nursery:
        nodes: list[LocalNode] = []
        try:
            for i, node_roles in enumerate(roles):
                data = base / f"node{i}"
                data.mkdir(parents=True)
                toml = SCHEDULER_TOML if "scheduler" in node_roles else ""
                (data / "node.toml").write_text(toml + tomls.get(i, ""))
                boot = nodes[0].addrs[:1] if nodes else ()
                kind = WrongResultNode if i in faulty else LocalNode
                node = kind(f"node{i}", data, node_roles, boot)
                nodes.append(node)
                await node.start(nursery)
                assert (BANNER in node.output) == (i in faulty)
            with trio.fail_after(60):
                for n in nodes:
                    await n.call("schedulers.wait", {"count": 1, "timeout": 60})
            yield nodes
        finally:
            await stop_all(nodes)
            nursery.cancel_scope.cancel()


async def submit(owner: LocalNode, text: str, base: Path) -> str:
    answer = await owner.call("task.submit", {"text": text, "base_dir": str(base)})
    task_id: str = answer["task_id"]
    return task_id


async def test_worker_killed_mid_task_finishes_elsewhere_and_leaves_no_vm(tmp_path: Path) -> None:
    roles = [("owner",), ("scheduler",), ("worker",), ("worker",)]
    async with network(tmp_path, roles) as nodes:
        owner = nodes[0]
        with trio.fail_after(120):
            task_id = await submit(owner, task_text("echo started; sleep 8; echo done"), tmp_path)
            assert await _first_output(owner, task_id) == b"started\n"
            status = await owner.call("task.status", {"task_id": task_id})
        holder = status["replicas"][0]["worker"]
        victim = next(n for n in nodes if n.peer_id == holder)
        assert victim.process is not None
        old_pid = victim.process.pid
        left_behind = _domains_of(old_pid) & await _running_domains()
        assert left_behind, "the killed worker's VM should be running"
        await victim.kill()
        with trio.fail_after(150):
            status = await owner.call("task.wait", {"task_id": task_id, "timeout": 140})
        assert status["state"] == "succeeded", status
        assert status["reported_by"] != [holder]
        assert len(status["reported_by"]) == 1
        async with trio.open_nursery() as nursery:
            again = LocalNode("again", victim.data_dir, victim.roles, owner.addrs[:1])
            with trio.fail_after(60):
                await again.start(nursery)  # ready once its backend swept what it left
            assert not (left_behind & await _running_domains())
            assert await again.stop() == 0


async def test_three_replicas_quorum_two_outvote_a_wrong_worker(tmp_path: Path) -> None:
    roles = [("owner",), ("scheduler",), ("worker",), ("worker",), ("worker",)]
    async with network(tmp_path, roles, faulty=[4]) as nodes:
        owner, wrong = nodes[0], nodes[4].peer_id
        text = task_text("echo right", extra="replicas = 3\nquorum = 2\n")
        with trio.fail_after(240):
            task_id = await submit(owner, text, tmp_path)
            status = await owner.call("task.wait", {"task_id": task_id, "timeout": 230})
            results = await owner.call("task.results", {"task_id": task_id})
    assert status["state"] == "succeeded", status
    assert results["stdout"] == b"right\n"
    agreeing = set(status["reported_by"]) - set(status["dissenters"])
    assert len(agreeing) >= 2
    assert wrong not in agreeing
    # Whether the wrong worker reports at all is a race: if both honest workers report first,
    # quorum ends the task and its replica is stopped. The dissent path itself is proved
    # deterministically on the real queue (tests/scheduler/test_queue.py, quorum tests).
    assert (wrong in status["reported_by"]) == (wrong in status["dissenters"])


async def test_scheduler_killed_and_restarted_keeps_the_task_and_counts_one_result(
    tmp_path: Path,
) -> None:
    roles = [("owner",), ("worker",), ("scheduler",)]
    async with network(tmp_path, roles) as nodes:
        owner, scheduler = nodes[0], nodes[2]
        with trio.fail_after(120):
            task_id = await submit(owner, task_text("echo started; sleep 6; echo done"), tmp_path)
            assert await _first_output(owner, task_id) == b"started\n"
        await scheduler.kill()
        async with trio.open_nursery() as nursery:
            again = LocalNode("again", scheduler.data_dir, scheduler.roles, owner.addrs[:1])
            with trio.fail_after(180):
                await again.start(nursery)
                status = await owner.call("task.wait", {"task_id": task_id, "timeout": 170})
                results = await owner.call("task.results", {"task_id": task_id})
            assert await again.stop() == 0
    assert status["state"] == "succeeded", status
    assert status["results"] == 1
    assert results["stdout"] == b"started\ndone\n"


async def test_deadline_passed_stops_the_task_and_reports_it(tmp_path: Path) -> None:
    roles = [("owner",), ("scheduler",), ("worker",)]
    async with network(tmp_path, roles) as nodes:
        owner, worker = nodes[0], nodes[2]
        assert worker.process is not None
        # The guest's own limit (max_runtime) is far off: only the deadline can end it in time. A
        # deadline as a duration may not be shorter than max_runtime; as a UTC time it may.
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=28)
        limits = f'max_runtime = "5m"\ndeadline = {when:%Y-%m-%dT%H:%M:%SZ}\n'
        text = task_text("echo started; sleep 300", limits=limits)
        with trio.fail_after(150):
            task_id = await submit(owner, text, tmp_path)
            assert await _first_output(owner, task_id) == b"started\n"
            ours = _domains_of(worker.process.pid) & await _running_domains()
            assert ours, "the task's VM should be running before the deadline"
            status = await owner.call("task.wait", {"task_id": task_id, "timeout": 140})
        assert status["state"] == "failed", status
        assert "deadline" in status["reason"]
        with trio.fail_after(10):
            while ours & await _running_domains():  # noqa: ASYNC110 (see test_tasks)
                await trio.sleep(0.2)
