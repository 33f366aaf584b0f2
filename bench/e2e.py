"""End-to-end latency: submit-to-result of a trivial task across real nodes; prints one JSON object.

Three real ``vmlend node start`` processes on loopback (a scheduler, a worker, an owner). One
warm-up task builds the image and lets the worker fetch it; then each run submits the same trivial
task (``true`` on the tiny OS) through the owner's RPC and waits for its result, so the image is
cached at the scheduler (assembly reuses it) and at the worker (no chunk is fetched). The baseline,
in the same run: plain ``qemu-system-x86_64`` booting the same kernel and initramfs with the same
guest init to the same result (``bench/vm.py``'s ``plain_qemu_boot``).

Usage: .venv/bin/python bench/e2e.py [--runs 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from node.localnet import local_network
from worker_role.vm import open_backend

ROLES = [("scheduler",), ("worker",), ("owner",)]
TASK = """\
name = "trivial"
os = "tiny"
command = ["true"]
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""


def _plain_qemu_boot() -> Any:
    spec = importlib.util.spec_from_file_location("bench_vm", Path(__file__).with_name("vm.py"))
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plain_qemu_boot


async def e2e_runs(base: Path, runs: int) -> dict[str, Any]:
    async with local_network(base, len(ROLES), roles=ROLES) as nodes:
        owner = nodes[2]
        with trio.fail_after(120):
            for n in nodes:
                await n.call("schedulers.wait", {"count": 1, "timeout": 110})

        async def one() -> float:
            t0 = time.monotonic()
            with trio.fail_after(300):
                answer = await owner.call("task.submit", {"text": TASK, "base_dir": str(base)})
                status = await owner.call(
                    "task.wait", {"task_id": answer["task_id"], "timeout": 290}
                )
            if status["state"] != "succeeded" or status["exit_code"] != 0:
                raise RuntimeError(f"task failed: {status}")
            return time.monotonic() - t0

        warm_up = await one()
        times = [await one() for _ in range(runs)]
    return {"warm_up_s": warm_up, "times": times}


async def main(runs: int) -> dict[str, Any]:
    load0 = round(psutil.getloadavg()[0], 1)
    async with open_backend() as backend:
        accel = backend.accel.accel
    with tempfile.TemporaryDirectory(prefix="vmlend-bench-e2e-") as tmp:
        e2e = await e2e_runs(Path(tmp) / "nodes", runs)
        work = Path(tmp) / "plain"
        work.mkdir()
        plain = await trio.to_thread.run_sync(_plain_qemu_boot(), runs, accel, work)
    e, p = statistics.median(e2e["times"]), statistics.median(plain)
    return {
        "bench": "e2e",
        "accelerator": accel.value,
        "host": {"cpus": psutil.cpu_count(), "load_average_1m_at_start": load0},
        "runs": runs,
        "task": "true on the tiny OS, 128 MiB, image cached at scheduler and worker",
        "warm_up_s (image built and fetched)": round(e2e["warm_up_s"], 2),
        "submit_to_result_s": [round(t, 2) for t in e2e["times"]],
        "plain_qemu_s": [round(t, 2) for t in plain],
        "submit_to_result_median_s": round(e, 2),
        "plain_qemu_median_s": round(p, 2),
        "ratio_e2e_over_plain": round(e / p, 2),
        "note": "e2e: owner RPC task.submit until task.wait returns the agreed result (p2p to "
        "the scheduler, lease pull by the worker, libvirt VM, result blobs fetched back, judged). "
        "plain: qemu-system-x86_64 from exec to exit, disks prepared beforehand",
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(trio.run(main, args.runs), indent=1))
    sys.exit(0)
