"""Run real ``vmlend node start`` processes on loopback: used by ``make demo`` and the e2e tests.

Each :class:`LocalNode` is a separate OS process of the real binary with its own data directory,
so what this drives is exactly what a user runs, with one difference, said out loud: every node
here shares 127.0.0.1, so a scheduler could never place two replicas on two networks nor have a
new worker's result confirmed from another one (``scheduler_role.trust``). Local nodes read a
"lab" first layer (``$VMLEND_BOOTSTRAP``, :data:`LAB_BOOTSTRAP`) that turns those two rules off;
their own ``node.toml`` still layers on top, and a test can pass ``lab=False``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from node.errors import VmlendError
from node.rpc_client import AsyncClient

START_TIMEOUT = 60.0

LAB_BOOTSTRAP = """\
# vmlend's local network (node/localnet.py): every node shares 127.0.0.1, so the scheduler's
# Sybil rules (replicas on distinct networks, earned trust) are off here, and only here.
[scheduler]
distinct_networks = false
trust_after = 0
"""
# Tests start many short-lived workers: building warm snapshots behind their tasks would only
# compete with them. A local node that wants warm starts says so (``LocalNode.warm``).
LAB_COLD = """\
[worker]
warm_budget = "0"
"""


def vmlend_command() -> list[str]:
    """The installed ``vmlend`` entry point of this interpreter's environment (the real binary)."""
    script = Path(sys.executable).with_name("vmlend")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "node.cli"]


class LocalNodeError(VmlendError):
    """A local node process did not start or stop as expected."""


@dataclass
class LocalNode:
    name: str
    data_dir: Path
    roles: Sequence[str]
    bootstrap: Sequence[str] = ()
    process: trio.Process | None = None
    peer_id: str = ""
    addrs: list[str] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    lab: bool = True  # read LAB_BOOTSTRAP first (see the module docstring)
    warm: bool = False  # with ``lab``: keep warm snapshots (the lab layer turns them off)
    on_line: Callable[[str], None] | None = None  # told every line, as it arrives

    @property
    def rpc_path(self) -> Path:
        return self.data_dir / "rpc.sock"

    def command(self) -> list[str]:
        cmd = [*vmlend_command(), "node", "start", "--data", str(self.data_dir)]
        cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--roles", ",".join(self.roles)]
        for addr in self.bootstrap:
            cmd += ["--bootstrap", addr]
        return cmd

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the process and return once it has printed its addresses and RPC socket."""
        self.output.clear()
        self.addrs = []
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        if self.lab and "VMLEND_BOOTSTRAP" not in self.env:
            env["VMLEND_BOOTSTRAP"] = str(
                await _lab_bootstrap(self.data_dir.parent, warm=self.warm)
            )
        self.process = await trio.lowlevel.open_process(
            self.command(), stdout=-1, stderr=-1, env=env
        )
        ready = trio.Event()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        nursery.start_soon(self._pump, self.process.stdout, ready)
        nursery.start_soon(self._pump, self.process.stderr, None)
        nursery.start_soon(self._reap, self.process)
        with trio.move_on_after(START_TIMEOUT) as scope:
            await ready.wait()
        if scope.cancelled_caught or not self.peer_id:
            tail = "\n".join(self.output[-20:])
            raise LocalNodeError(f"node {self.name} did not start; its output:\n{tail}")

    async def _pump(self, stream: trio.abc.ReceiveStream, ready: trio.Event | None) -> None:
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.output.append(line)
                if self.on_line is not None:
                    self.on_line(line)
                if ready is None:
                    continue
                if line.startswith("peer id: "):
                    self.peer_id = line.removeprefix("peer id: ")
                elif line.startswith("listening on "):
                    self.addrs.append(line.removeprefix("listening on "))
                elif line.startswith("rpc: "):
                    ready.set()
        if ready is not None:
            ready.set()  # the process died before it was ready; start() reports it

    @staticmethod
    async def _reap(process: trio.Process) -> None:
        """Kill the process if the nursery is cancelled first (a failing test), so no node
        outlives the test that started it."""
        try:
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()

    async def call(self, method: str, *params: Any) -> Any:
        """One RPC call; bound it with a cancel scope at the call site."""
        async with AsyncClient.connect(self.rpc_path) as client:
            return await client.call(method, *params, timeout=None)

    async def stop(self, *, grace: float = 30.0) -> int:
        """SIGTERM, then wait up to ``grace`` s for a clean exit (else SIGKILL and fail)."""
        return await self._signal_and_wait(signal.SIGTERM, grace)

    async def kill(self) -> int:
        return await self._signal_and_wait(signal.SIGKILL, 10.0)

    async def _signal_and_wait(self, sig: signal.Signals, grace: float) -> int:
        if self.process is None:
            raise LocalNodeError(f"node {self.name} was never started")
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(grace):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        raise LocalNodeError(f"node {self.name} did not exit within {grace} s of {sig.name}")


async def _lab_bootstrap(directory: Path, *, warm: bool) -> Path:
    path = trio.Path(directory) / ("lab-bootstrap-warm.toml" if warm else "lab-bootstrap.toml")
    await path.parent.mkdir(parents=True, exist_ok=True)
    await path.write_text(LAB_BOOTSTRAP if warm else LAB_BOOTSTRAP + LAB_COLD)
    return Path(path)


@asynccontextmanager
async def local_network(
    base_dir: Path,
    count: int,
    *,
    roles: Sequence[Sequence[str]] | None = None,
    warm: bool = False,
) -> AsyncIterator[list[LocalNode]]:
    """Start ``count`` nodes; the first is everyone's bootstrap peer. All are stopped on exit.
    ``warm`` lets their workers keep warm snapshots."""
    async with trio.open_nursery() as nursery:
        nodes: list[LocalNode] = []
        try:
            for i in range(count):
                node_roles = roles[i] if roles else ("worker", "owner")
                boot = nodes[0].addrs[:1] if nodes else ()
                local = LocalNode(f"node{i}", base_dir / f"node{i}", node_roles, boot, warm=warm)
                nodes.append(local)
                await local.start(nursery)
            yield nodes
        finally:
            await stop_all(nodes)
            nursery.cancel_scope.cancel()


async def stop_all(nodes: Sequence[LocalNode]) -> None:
    """Stop every node still running, even while the caller is being cancelled."""
    with trio.CancelScope(shield=True):
        for local in nodes:
            if local.process is not None and local.process.returncode is None:
                await local.stop()
