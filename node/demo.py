"""``make demo``: a local federation on loopback, run by real ``vmlend`` processes.

Three nodes start (one of them a scheduler); each finds the others through the DHT from a single
bootstrap address; every node finds the scheduler's signed record; a real capped VM runs a command
through ``vmlend vm run``; then everything shuts down cleanly and the exit codes are shown.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from node.localnet import LocalNode, local_network, vmlend_command

ROLES = [("scheduler", "worker"), ("worker", "owner"), ("worker", "owner")]


def say(text: str) -> None:
    print(text, flush=True)


async def run_federation(base: Path) -> list[LocalNode]:
    say(f"== starting {len(ROLES)} vmlend nodes on loopback (data under {base})")
    async with local_network(base, len(ROLES), roles=ROLES) as nodes:
        for n in nodes:
            say(f"   {n.name}: {n.peer_id}  roles={','.join(n.roles)}  {n.addrs[0]}")
        say("== waiting for DHT discovery (each node bootstrapped only from node0)")
        with trio.fail_after(90):
            for n in nodes:
                peers = await n.call("peers.wait", {"count": len(nodes) - 1, "timeout": 60})
                names = sorted(_name_of(nodes, p["peer_id"]) for p in peers)
                say(f"   {n.name} sees {', '.join(names)}")
        say("== looking up scheduler records in the DHT")
        with trio.fail_after(90):
            for n in nodes:
                found = await n.call("schedulers.wait", {"count": 1, "timeout": 60})
                for s in found:
                    who = _name_of(nodes, s["peer_id"])
                    say(f"   {n.name} found scheduler {s['name']!r} = {who} at {s['addrs'][0]}")
        say("== shutting down (SIGTERM)")
        for n in nodes:
            code = await n.stop()
            say(f"   {n.name} exited with {code}")
    return nodes


def _name_of(nodes: list[LocalNode], peer_id: str) -> str:
    return next((n.name for n in nodes if n.peer_id == peer_id), peer_id)


def run_vm_step() -> int:
    script = "echo hello from a capped VM; uname -sr; nproc; exit 7"
    args = ["vm", "run", "--cpus", "1", "--memory", "128MiB", "--timeout", "60s"]
    cmd = [*vmlend_command(), *args, "--", "sh", "-c", script]
    say(f"== running a command in a real capped VM: vmlend {' '.join(args)} -- sh -c {script!r}")
    result = subprocess.run(cmd, check=False)
    say(f"   vm run exited with {result.returncode} (the guest command's own exit code)")
    return 0 if result.returncode == 7 else 1


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="vmlend-demo-"))
    try:
        nodes = trio.run(run_federation, base)
        clean = all(n.process is not None and n.process.returncode == 0 for n in nodes)
        status = run_vm_step()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    say("== demo " + ("finished cleanly" if clean and status == 0 else "FAILED"))
    return 0 if clean and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
