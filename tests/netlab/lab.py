"""Build a topology of network namespaces, run real ``vmlend`` nodes in it, tear it all down.

Everything a lab makes lives in namespaces named ``<prefix>...``: devices, addresses, routes,
iptables rules, and the processes started in them (the forwarder, the nodes). Deleting the
namespaces after killing their processes therefore removes everything, and :func:`down` can find
what a crashed run left behind from the prefix alone. A test lab's prefix carries the pid of the
process that made it, so :func:`sweep_orphans` removes the labs of dead processes only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from node.localnet import LocalNode, LocalNodeError
from tests.netlab.netns import NETNS_DIR
from tests.netlab.topology import Host, Plan, Topology, plan

ROOT = Path(__file__).resolve().parents[2]
LAB_ROOT = "vlab-"
CLI_PREFIX = "vlab-cli-"
FORWARDER_START = 30.0


class LabError(LocalNodeError):
    """The lab could not be built or torn down."""


def test_prefix() -> str:
    """A fresh prefix owned by this process: ``vlab-<pid>-<4 hex>-``."""
    return f"{LAB_ROOT}{os.getpid()}-{secrets.token_hex(2)}-"


def namespaces(prefix: str = LAB_ROOT) -> list[str]:
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _pids_in(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def down(prefix: str) -> list[str]:
    """Kill every process in a namespace named ``prefix*``, then delete those namespaces (and
    with them their devices and iptables rules). Returns the namespaces removed. Synchronous,
    so a fixture's finaliser and a person's ``scripts/netlab down`` can both call it."""
    if not prefix.startswith(LAB_ROOT):
        raise LabError(f"refusing to tear down {prefix!r}: lab prefixes start with {LAB_ROOT}")
    found = namespaces(prefix)
    pids = {pid for ns in found for pid in _pids_in(ns)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        _wait_gone(pid)
    for ns in found:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    return found


def _wait_gone(pid: int) -> None:
    """Wait (bounded) until ``pid`` is dead: gone from /proc, or a zombie its parent will reap."""
    for _ in range(500):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat.rpartition(")")[2].split()[:1] == ["Z"]:
            return
        time.sleep(0.01)


def sweep_orphans() -> list[str]:
    """Tear down the test labs whose creating process is gone."""
    removed: list[str] = []
    for ns in namespaces(LAB_ROOT):
        pid = ns.removeprefix(LAB_ROOT).split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            removed += down(f"{LAB_ROOT}{pid}-")
    return removed


@dataclass
class NetNode(LocalNode):
    """A real ``vmlend node start`` in a lab namespace, listening on its lab address."""

    netns: str = ""
    ip: str = ""
    port: int = 0  # 0: any; a fixed one lets a restarted node come back where it was

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--listen") + 1] = f"/ip4/{self.ip}/tcp/{self.port}"
        return ["ip", "netns", "exec", self.netns, *cmd]


class Lab:
    """One built topology. ``async with Lab(topology, prefix, log_dir) as lab`` builds it and
    tears it down however the body ends."""

    def __init__(self, topology: Topology, prefix: str, log_dir: Path) -> None:
        self.topology = topology
        self.plan: Plan = plan(topology, prefix)
        self.log_dir = log_dir
        self._forwarder: subprocess.Popen[bytes] | None = None

    @property
    def prefix(self) -> str:
        return self.plan.prefix

    def host(self, name: str) -> Host:
        try:
            return self.plan.hosts[name]
        except KeyError:
            raise LabError(f"no host {name!r} in topology {self.topology.name}") from None

    def netns_of(self, name: str) -> str:
        """The namespace of host or router ``name`` (a router is named by its home)."""
        if name in self.plan.routers:
            return self.plan.routers[name].netns
        return self.host(name).netns

    def up(self) -> None:
        """Build the topology (synchronous: a module-scoped fixture and the CLI use it too)."""
        try:
            for cmd in self.plan.commands:
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise LabError(f"{' '.join(cmd)}: {done.stderr.strip()}")
            if self.plan.taps:
                self._start_forwarder()
        except BaseException:
            self.down()
            raise

    def _start_forwarder(self) -> None:
        links = [
            {"a": [t.a_netns, t.a_dev], "b": [t.b_netns, t.b_dev], "delay_ms": t.delay_ms,
             "loss": t.loss, "seed": i}
            for i, t in enumerate(self.plan.taps)
        ]  # fmt: skip
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["ip", "netns", "exec", self.plan.switch, sys.executable, "-m",
               "tests.netlab.forwarder", json.dumps(links)]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with (self.log_dir / "forwarder.log").open("ab") as log:
            self._forwarder = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env, start_new_session=True
            )
        assert self._forwarder.stdout is not None
        with self._forwarder.stdout as out:
            ready, _, _ = select.select([out], [], [], FORWARDER_START)
            line = out.readline() if ready else b""
        if line != b"ready\n":
            raise LabError(f"the forwarder did not start; see {self.log_dir / 'forwarder.log'}")

    def down(self) -> list[str]:
        removed = down(self.prefix)
        if self._forwarder is not None:
            self._forwarder.kill()
            self._forwarder.wait(timeout=10)
        return removed

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    async def __aenter__(self) -> Lab:
        await trio.to_thread.run_sync(self.up)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.down)

    def node(
        self,
        host: str,
        data_dir: Path,
        roles: tuple[str, ...],
        bootstrap: tuple[str, ...] = (),
        *,
        port: int = 0,
    ) -> NetNode:
        """A node (not yet started) on ``host``; start it with ``await node.start(nursery)``."""
        h = self.host(host)
        return NetNode(host, data_dir, roles, bootstrap, netns=h.netns, ip=h.ip, port=port)

    async def cut(self, name: str) -> None:
        """Cut host (or home) ``name`` off: its link's far end leaves the bridge, so every frame
        either side sends is dropped in silence, as on a dead cable (no reset, no error)."""
        ns, dev, _ = self._port(name)
        await self._ip(ns, "link", "set", dev, "nomaster")

    async def mend(self, name: str) -> None:
        """Undo :meth:`cut`."""
        ns, dev, bridge = self._port(name)
        await self._ip(ns, "link", "set", dev, "master", bridge)

    def _port(self, name: str) -> tuple[str, str, str]:
        try:
            return self.plan.ports[name]
        except KeyError:
            raise LabError(f"no host or home {name!r} in topology {self.topology.name}") from None

    async def _ip(self, ns: str, *args: str) -> None:
        done = await trio.run_process(["ip", "-n", ns, *args], capture_stderr=True, check=False)
        if done.returncode != 0:
            raise LabError(f"ip -n {ns} {' '.join(args)}: {done.stderr.decode().strip()}")

    async def exec(self, name: str, *cmd: str) -> subprocess.CompletedProcess[bytes]:
        """Run ``cmd`` in host or router ``name``'s namespace and capture its output."""
        return await trio.run_process(
            ["ip", "netns", "exec", self.netns_of(name), *cmd],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
