"""``make demo``: a local federation on loopback, run by real ``vmlend`` processes.

Four nodes start: two schedulers (each also a worker), one more worker, and a task owner. Each
finds the others through the DHT from a single bootstrap address and finds both schedulers' signed
records. The owner runs a command with ``vmlend run`` through one scheduler (its output streams
back; the exit code is the task's) and a task file (``examples/hello.toml``) with ``vmlend submit``
through the other, then ``status``, ``wait`` and ``results``. Every task runs in a real capped VM on
a worker. A worker that ran a task keeps a snapshot of a booted guest and restores it for the next
task instead of booting (a warm start); the demo runs ``vmlend run`` again until a task lands on
such a worker and shows the difference. Then everything shuts down cleanly and the exit codes are
shown.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from node.localnet import LocalNode, local_network, vmlend_command

ROLES = [("worker",), ("scheduler", "worker"), ("scheduler", "worker"), ("owner",)]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def say(text: str) -> None:
    print(text, flush=True)


async def vmlend(owner: LocalNode, *args: str, capture: bool = False) -> tuple[int, str]:
    """Run ``vmlend ARGS --data <owner's data>`` and show it; (exit code, stdout if captured)."""
    cmd = [*vmlend_command(), *args[:1], "--data", str(owner.data_dir), *args[1:]]
    say(f"$ vmlend {shlex.join(args)}")
    done = await trio.run_process(cmd, check=False, capture_stdout=capture)
    out = done.stdout.decode() if capture else ""
    if out:
        say(out.rstrip())
    return done.returncode, out


async def run_federation(base: Path) -> tuple[list[LocalNode], bool]:
    say(f"== starting {len(ROLES)} vmlend nodes on loopback (data under {base})")
    ok = True
    async with local_network(base, len(ROLES), roles=ROLES, warm=True) as nodes:
        for n in nodes:
            say(f"   {n.name}: {n.peer_id}  roles={','.join(n.roles)}  {n.addrs[0]}")
        say("== finding both schedulers through the DHT (each node bootstrapped only from node0)")
        with trio.fail_after(120):
            for n in nodes:
                found = await n.call("schedulers.wait", {"count": 2, "timeout": 110})
                names = ", ".join(_name_of(nodes, s["peer_id"]) for s in found)
                say(f"   {n.name} found schedulers {names}")
        owner, alpha, beta = nodes[3], nodes[1], nodes[2]
        with trio.fail_after(600):
            say(f"== vmlend run through scheduler {alpha.name}: output streams back")
            script = "echo hello from a capped VM on a lender; uname -sr; exit 7"
            code, _ = await vmlend(owner, "run", "--scheduler", alpha.peer_id, "--memory",
                                   "128MiB", "--", "sh", "-c", script)  # fmt: skip
            say(f"   vmlend run exited with {code} (the task's own exit code)")
            ok &= code == 7
            say(f"== a task file (examples/hello.toml) through scheduler {beta.name}")
            code, out = await vmlend(owner, "submit", str(EXAMPLES / "hello.toml"),
                                     "--scheduler", beta.peer_id, capture=True)  # fmt: skip
            task_id = out.strip()
            ok &= code == 0 and bool(task_id)
            await vmlend(owner, "status", task_id)
            code, _ = await vmlend(owner, "wait", task_id)
            ok &= code == 0
            await vmlend(owner, "status", task_id)
            results = base / "results"
            code, _ = await vmlend(owner, "results", task_id, "-o", str(results))
            ok &= code == 0
            stdout = (results / "stdout").read_text() if code == 0 else ""
            say(f"   the task's stdout: {stdout!r}")
            ok &= stdout == "hello from x86_64\n"
            await warm_runs(owner, nodes)
        say("== shutting down (SIGTERM)")
        for n in nodes:
            code = await n.stop()
            say(f"   {n.name} exited with {code}")
    return nodes, ok


WARM_READY = re.compile(r"warm snapshot \S+ ready")
RESTORED = "restored from a warm snapshot"


async def warm_runs(owner: LocalNode, nodes: list[LocalNode]) -> None:
    """Run ``vmlend run`` until one lands on a worker with a warm snapshot (at most 4 times)."""
    with trio.move_on_after(90):
        while True:
            if any(WARM_READY.search(line) for n in nodes for line in n.output):
                break
            await trio.sleep(0.2)
    say("== vmlend run again: a worker that ran a task restores a snapshot instead of booting")
    for _ in range(4):
        before = sum(RESTORED in line for n in nodes for line in n.output)
        started = time.monotonic()
        code, _ = await vmlend(owner, "run", "--memory", "128MiB", "--", "echo", "hi")
        took = time.monotonic() - started
        await trio.sleep(0.2)  # the worker's log line is on its way
        warm = sum(RESTORED in line for n in nodes for line in n.output) > before
        say(f"   exit {code} in {took:.1f} s: its VM was " + ("restored" if warm else "booted"))
        if warm:
            return


def _name_of(nodes: list[LocalNode], peer_id: str) -> str:
    return next((n.name for n in nodes if n.peer_id == peer_id), peer_id)


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="vmlend-demo-"))
    try:
        nodes, ok = trio.run(run_federation, base)
        clean = all(n.process is not None and n.process.returncode == 0 for n in nodes)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    say("== demo " + ("finished cleanly" if clean and ok else "FAILED"))
    return 0 if clean and ok else 1


if __name__ == "__main__":
    sys.exit(main())
