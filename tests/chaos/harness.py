"""A chaos run: a stream of tasks through real ``vmlend`` nodes and real VMs while workers are
killed, frozen and cut off and the scheduler is killed and restarted.

Every node runs on its own host of the network lab (``tests/netlab``), so a partition is a real
one: the host's cable is pulled (:meth:`Lab.cut`) and frames vanish in both directions. Nodes
listen on fixed ports so that a restarted node comes back where it was, as a restarted service
does. Used by ``tests/chaos`` (a few tasks, one fault of each kind) and ``bench/chaos.py`` (100 or
more tasks); :mod:`tests.chaos.accounting` turns what a run saw into its report.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.errors import VmlendError
from node.localnet import stop_all
from tests.chaos.accounting import (
    FaultKind,
    FaultRecord,
    Line,
    Report,
    Run,
    TaskOutcome,
    account,
    runs,
)
from tests.netlab.lab import Lab, NetNode
from tests.netlab.topology import HostSpec, Topology

PORT = 4100
DOMAIN_POLL = 0.5
STATUS_POLL = 0.25
PICK_TIMEOUT = 60.0  # waiting for a worker to run a VM it can be struck in
ORPHAN_GRACE = 30.0  # after the last task: a fault's VM is destroyed by then or is an orphan


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    hold: float  # seconds down, frozen or cut off


@dataclass(frozen=True)
class ChaosPlan:
    workers: int = 2
    tasks: int = 8
    task_seconds: float = 3.0
    lease_timeout: float = 6.0
    faults: tuple[Fault, ...] = ()
    gap: float = 4.0  # after a fault is healed, before the next one strikes
    bound: float = 600.0  # the whole run, faults and all
    seed: str = field(default_factory=lambda: secrets.token_hex(4))


def topology(plan: ChaosPlan) -> Topology:
    hosts = ("sched", "own", *(f"w{i}" for i in range(plan.workers)))
    return Topology("chaos", public=tuple(HostSpec(h) for h in hosts))


def task_text(n: int, plan: ChaosPlan) -> tuple[str, bytes]:
    """Task ``n``'s file and the stdout only it can produce."""
    tag = f"chaos-{plan.seed}-{n}"
    command = f"echo {tag}; sleep {plan.task_seconds:g}; echo end-{n}"
    text = (
        f'name = "chaos{n}"\nos = "tiny"\ncommand = {command!r}\n'
        f'[resources]\nmemory = "128MiB"\n[limits]\nmax_runtime = "3m"\n'
    )
    return text, f"{tag}\nend-{n}\n".encode()


class Chaos:
    """One run in a built lab. :meth:`run` returns its report; every node is stopped (a frozen
    one thawed first) and every fault healed however the run ends."""

    def __init__(self, lab: Lab, base: Path, plan: ChaosPlan) -> None:
        self.lab, self.base, self.plan = lab, base, plan
        self.lines: list[Line] = []
        self.domains: dict[str, tuple[float, float]] = {}
        self.baseline: set[str] = set()
        self.faults: list[FaultRecord] = []
        self.expected: dict[str, bytes] = {}
        self.finished: set[str] = set()
        self.sched = self._node("sched", ("scheduler",))
        self.owner = self._node("own", ("owner",))
        self.workers = [self._node(f"w{i}", ("worker",)) for i in range(plan.workers)]
        self._frozen: NetNode | None = None
        self._cut: str | None = None

    @property
    def nodes(self) -> list[NetNode]:
        return [self.sched, self.owner, *self.workers]

    def _node(self, host: str, roles: tuple[str, ...]) -> NetNode:
        data = self.base / host
        data.mkdir(parents=True, exist_ok=True)
        if "scheduler" in roles:
            (data / "node.toml").write_text(
                f'[scheduler]\nlease_timeout = "{self.plan.lease_timeout:g}s"\n'
            )
        node = self.lab.node(host, data, roles, port=PORT)
        node.on_line = lambda text: self.lines.append(Line(trio.current_time(), host, text))
        return node

    async def run(self) -> Report:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(self.plan.bound):
                    report = await self._run(nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await self._heal_all()
                    await stop_all(self.nodes)
                    self._write_log()
                nursery.cancel_scope.cancel()
        return report

    def _write_log(self) -> None:
        """Every line every node logged, in arrival order, beside the nodes' data dirs."""
        t0 = self.lines[0].at if self.lines else 0.0
        with (self.base / "chaos.log").open("w") as f:
            for line in self.lines:
                f.write(f"{line.at - t0:9.3f} {line.node:6} {line.text}\n")

    async def _run(self, nursery: trio.Nursery) -> Report:
        deadline = trio.current_time() + self.plan.bound - ORPHAN_GRACE - 10
        self.baseline = await running_domains()
        await self.sched.start(nursery)
        for node in self.nodes[1:]:
            node.bootstrap = self.sched.addrs[:1]
            await node.start(nursery)
        with trio.fail_after(60):
            for node in self.nodes:
                await node.call("schedulers.wait", {"count": 1, "timeout": 60})
        nursery.start_soon(self._watch_domains)
        started = trio.current_time()
        for n in range(self.plan.tasks):
            text, stdout = task_text(n, self.plan)
            params = {"text": text, "base_dir": str(self.base)}
            answer = await self.owner.call("task.submit", params)
            self.expected[answer["task_id"]] = stdout
        async with trio.open_nursery() as collecting:
            outcomes: list[TaskOutcome] = []
            collecting.start_soon(self._collect, outcomes, deadline)
            for fault in self.plan.faults:
                await self._strike(fault, nursery)
                await trio.sleep(self.plan.gap)
        wall = trio.current_time() - started
        orphans = await self._orphans()
        peers = {n.name: n.peer_id for n in self.nodes}
        report = account(
            self.lines, self.domains, self.faults, outcomes, peers, orphans, started_at=started
        )
        report.wall_s = round(wall, 3)
        return report

    # ---- faults ----------------------------------------------------------------------------

    async def _strike(self, fault: Fault, nursery: trio.Nursery) -> None:
        if fault.kind == "scheduler-restart":
            node, run = self.sched, None
        else:
            node, run = await self._busy_worker()
        record = FaultRecord(fault.kind, node.name, trio.current_time())
        if run is not None:
            record.task_id, record.replica, record.attempt = run.task_id, run.replica, run.attempt
        self.faults.append(record)
        async with trio.open_nursery() as watching:
            if run is not None:
                watching.start_soon(self._watch_requeue, record, node.peer_id)
            await self._hold(fault, node, record, nursery)

    async def _hold(
        self, fault: Fault, node: NetNode, record: FaultRecord, nursery: trio.Nursery
    ) -> None:
        assert node.process is not None
        if fault.kind in ("kill", "scheduler-restart"):
            await node.kill()
            await trio.sleep(fault.hold)
            record.healed_at = trio.current_time()
            await node.start(nursery)
            record.ready_at = trio.current_time()
        elif fault.kind == "freeze":
            with self._frozen_node(node):
                await trio.sleep(fault.hold)
            record.healed_at = trio.current_time()
        else:
            await self.lab.cut(node.name)
            self._cut = node.name
            await trio.sleep(fault.hold)
            await self.lab.mend(node.name)
            self._cut = None
            record.healed_at = trio.current_time()

    @contextmanager
    def _frozen_node(self, node: NetNode) -> Iterator[None]:
        assert node.process is not None
        os.kill(node.process.pid, signal.SIGSTOP)
        self._frozen = node
        try:
            yield
        finally:
            os.kill(node.process.pid, signal.SIGCONT)
            self._frozen = None

    async def _heal_all(self) -> None:
        if self._frozen is not None and self._frozen.process is not None:
            os.kill(self._frozen.process.pid, signal.SIGCONT)
        if self._cut is not None:
            await self.lab.mend(self._cut)

    async def _busy_worker(self) -> tuple[NetNode, Run | None]:
        """A worker whose VM runs an unfinished task right now (the one struck loses work), or
        the first worker if none does within :data:`PICK_TIMEOUT`."""
        struck = {f.task_id for f in self.faults}
        by_name = {w.name: w for w in self.workers}
        candidates: list[Run] = []
        with trio.move_on_after(PICK_TIMEOUT):
            while True:
                running = await running_domains()
                candidates = [
                    run
                    for run in runs(self.lines)
                    if run.domain in running
                    and run.node in by_name
                    and run.task_id not in self.finished
                ]
                # Faults strike tasks at random in life: a task hit again and again would
                # rightly fail after its max_attempts, which is not what this run measures.
                for run in candidates:
                    if run.task_id not in struck:
                        return by_name[run.node], run
                await trio.sleep(DOMAIN_POLL)
        for run in candidates:  # none fresh in all that time: a task struck before, then
            return by_name[run.node], run
        return self.workers[0], None

    async def _watch_requeue(self, record: FaultRecord, struck_peer: str) -> None:
        """Until the scheduler gives up the struck worker's replica of the task."""
        assert record.task_id is not None
        with trio.move_on_after(self.plan.bound):
            while True:
                try:
                    with trio.fail_after(5):
                        status = await self.owner.call("task.status", {"task_id": record.task_id})
                except (VmlendError, trio.TooSlowError):
                    status = None
                if status is not None and _given_up(status, record, struck_peer):
                    record.requeued_at = trio.current_time()
                    return
                await trio.sleep(STATUS_POLL)

    # ---- what the run saw ------------------------------------------------------------------

    async def _watch_domains(self) -> None:
        while True:
            now = trio.current_time()
            for name in await running_domains() - self.baseline:
                first, _ = self.domains.get(name, (now, now))
                self.domains[name] = (first, now)
            await trio.sleep(DOMAIN_POLL)

    async def _collect(self, outcomes: list[TaskOutcome], deadline: float) -> None:
        """Every task's outcome; one not finished by ``deadline`` is lost (no status)."""
        pending = dict(self.expected)
        with trio.move_on_at(deadline):
            for task_id, expected in self.expected.items():
                status = await self._ask_until_answered("task.wait", task_id, timeout=30)
                while not status["finished"]:
                    status = await self._ask_until_answered("task.wait", task_id, timeout=30)
                self.finished.add(task_id)
                stdout = None
                if status["state"] == "succeeded":
                    results = await self._ask_until_answered("task.results", task_id)
                    stdout = results["stdout"]
                outcomes.append(TaskOutcome(task_id, expected, status, stdout))
                del pending[task_id]
        outcomes += [TaskOutcome(t, e, None, None) for t, e in pending.items()]

    async def _ask_until_answered(self, method: str, task_id: str, **more: Any) -> Any:
        """The owner's answer, asked again while its scheduler is down or cut off."""
        while True:
            try:
                with trio.fail_after(60):
                    return await self.owner.call(method, {"task_id": task_id, **more})
            except (VmlendError, trio.TooSlowError) as e:
                self.lines.append(Line(trio.current_time(), "harness", f"{method}: {e}"))
            await trio.sleep(1)

    async def _orphans(self) -> list[str]:
        """Domains this run started that still run :data:`ORPHAN_GRACE` s after its last task."""
        with trio.move_on_after(ORPHAN_GRACE):
            while await running_domains() - self.baseline:  # noqa: ASYNC110 (libvirt's state)
                await trio.sleep(DOMAIN_POLL)
        return sorted(await running_domains() - self.baseline)


def _given_up(status: dict[str, Any], record: FaultRecord, struck_peer: str) -> bool:
    """Whether the scheduler no longer counts on the struck lease (a restarted worker may be
    leased the same replica again: that is a new attempt)."""
    if status.get("finished"):
        return True
    return not any(
        r.get("index") == record.replica
        and r.get("attempts") == record.attempt
        and r.get("worker") == struck_peer
        and r.get("state") in ("leased", "running")
        for r in status.get("replicas", [])
    )


async def running_domains() -> set[str]:
    out = await trio.run_process(
        ["virsh", "-c", "qemu:///system", "list", "--name"], capture_stdout=True
    )
    return {x.strip() for x in out.stdout.decode().splitlines() if x.strip().startswith("vmlend-")}


async def run_chaos(prefix: str, base: Path, plan: ChaosPlan) -> Report:
    """Build the lab under ``prefix``, run ``plan`` in it, tear it all down."""
    async with Lab(topology(plan), prefix, base / "lab") as lab:
        return await Chaos(lab, base, plan).run()
