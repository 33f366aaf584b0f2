"""End-to-end latency: submit-to-result of a trivial task across real nodes; prints one JSON object.

Three real ``vmlend node start`` processes on loopback (a scheduler, a worker, an owner). One
warm-up task builds the image and lets the worker fetch it; then each run submits the same trivial
task (``true`` on the tiny OS) through the owner's RPC and waits for its result, so the image is
cached at the scheduler (assembly reuses it) and at the worker (no chunk is fetched). The baseline,
in the same run: plain ``qemu-system-x86_64`` booting the same kernel and initramfs with the same
guest init to the same result (``bench/vm.py``'s ``plain_qemu_boot``).

Each run is split into phases by the lines the worker logs as the lease moves (each timed as it
arrives here): submit -> leased (the scheduler takes the task and a worker's request gets it),
leased -> image ready (the image checked in the worker's cache), image ready -> VM started
(the domain defined and started), VM started -> task ended (the guest boots, runs ``true`` and
reports), task ended -> the owner has its result (published, reported, fetched and judged at
the scheduler, ``task.wait`` returns; the VM is torn down meanwhile).

The same runs are made twice: cold (every VM boots) and warm (the worker keeps a snapshot of a
booted guest, built after the warm-up task, and restores it for each task:
``worker_role/vm/warm.py``). The warm path's baseline, in the same run: plain ``virsh restore``
of that same snapshot file (copied before the nodes stop) onto fresh disk files, timed from the
command's start to its end, then destroyed.

Usage: .venv/bin/python bench/e2e.py [--runs 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import statistics
import subprocess
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
# The worker's log lines that end each phase (after "submitted"), and the phases' names.
MARKS = (
    ("leased", r"lease {task}/\d+#\d+ granted by"),
    ("image_ready", r"lease {task}/\d+#\d+ image ready"),
    ("vm_started", r"lease {task}/\d+#\d+ runs in"),
    ("task_ended", r"lease {task}/\d+#\d+ ended in its VM"),
)
PHASES = (
    "submit_to_leased", "leased_to_image_ready", "image_ready_to_vm_started",
    "vm_started_to_task_ended", "task_ended_to_owner_has_result",
)  # fmt: skip
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


WARM_READY = re.compile(r"warm snapshot \S+ ready")


async def e2e_runs(base: Path, runs: int, *, warm: bool, keep: Path) -> dict[str, Any]:
    """``runs`` timed tasks after a warm-up; with ``warm``, once the worker's snapshot is ready
    (and a copy of it is kept at ``keep`` for the plain restore)."""
    async with local_network(base, len(ROLES), roles=ROLES, warm=warm) as nodes:
        owner = nodes[2]
        with trio.fail_after(120):
            for n in nodes:
                await n.call("schedulers.wait", {"count": 1, "timeout": 110})

        lines: list[tuple[float, str]] = []
        nodes[1].on_line = lambda line: lines.append((time.monotonic(), line))

        async def one() -> tuple[float, dict[str, float]]:
            t0 = time.monotonic()
            with trio.fail_after(300):
                answer = await owner.call("task.submit", {"text": TASK, "base_dir": str(base)})
                status = await owner.call(
                    "task.wait", {"task_id": answer["task_id"], "timeout": 290}
                )
            t1 = time.monotonic()
            if status["state"] != "succeeded" or status["exit_code"] != 0:
                raise RuntimeError(f"task failed: {status}")
            return t1 - t0, phases(answer["task_id"], t0, t1, lines)

        warm_up, _ = await one()
        if warm:
            with trio.fail_after(120):
                while True:
                    if any(WARM_READY.search(line) for _, line in lines):
                        break
                    await trio.sleep(0.1)
            (save,) = (nodes[1].data_dir / "warm").glob("*/slot0.save")
            await trio.to_thread.run_sync(shutil.copyfile, save, keep)
        runs_ = [await one() for _ in range(runs)]
        restored = sum(1 for _, line in lines if "restored from a warm snapshot" in line)
    return {
        "warm_up_s": warm_up,
        "times": [t for t, _ in runs_],
        "phases": [p for _, p in runs_],
        "vms_restored": restored,
    }


def plain_virsh_restore(save: Path, runs: int, work: Path) -> list[float]:
    """Seconds of ``virsh restore`` of ``save`` onto fresh sparse disks, each destroyed after."""
    xml = _virsh("save-image-dumpxml", str(save))
    name = re.search(r"<name>([^<]+)</name>", xml)
    assert name is not None
    work.chmod(0o755)
    shutil.chown(work, "libvirt-qemu")  # QEMU binds the console ports' sockets here
    disks = {}
    for source in re.findall(r"<source [^>]*?(?:file|path)='([^']+)'", xml):
        if "/warm-spare/" in source:
            continue  # the worker's spare layer files are still there
        disks[source] = work / Path(source).name
    for old, new in disks.items():
        xml = xml.replace(f"'{old}'", f"'{new}'")
    times = []
    for _ in range(runs):
        for new in disks.values():
            if new.suffix == ".img":
                with new.open("wb") as f:
                    f.truncate(1 << 40)
        (work / "restore.xml").write_text(xml)
        t0 = time.monotonic()
        _virsh("restore", str(save), "--xml", str(work / "restore.xml"))
        times.append(time.monotonic() - t0)
        _virsh("destroy", name[1])
    return times


def _virsh(*args: str) -> str:
    done = subprocess.run(["virsh", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"virsh {args[0]}: {done.stderr.strip()}")
    return done.stdout


def phases(task_id: str, t0: float, t1: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds of each phase of one run, from when each mark's line arrived."""
    marks = [t0]
    for name, pattern in MARKS:
        wanted = re.compile(pattern.format(task=re.escape(task_id)))
        seen = [at for at, line in lines if wanted.search(line)]
        if not seen:
            raise RuntimeError(f"the worker never logged {name} for {task_id}")
        marks.append(seen[0])
    marks.append(t1)
    return {name: round(b - a, 3) for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}


async def main(runs: int) -> dict[str, Any]:
    load0 = round(psutil.getloadavg()[0], 1)
    async with open_backend() as backend:
        accel = backend.accel.accel
    with tempfile.TemporaryDirectory(prefix="vmlend-bench-e2e-", dir="/var/lib/vmlend") as tmp:
        await trio.Path(tmp).chmod(0o755)  # QEMU's user reaches the plain runs' files
        snapshot = Path(tmp) / "snapshot.save"
        e2e = await e2e_runs(Path(tmp) / "nodes", runs, warm=False, keep=snapshot)
        hot = await e2e_runs(Path(tmp) / "warm-nodes", runs, warm=True, keep=snapshot)
        work = Path(tmp) / "plain"
        work.mkdir()
        plain = await trio.to_thread.run_sync(_plain_qemu_boot(), runs, accel, work)
        restore_dir = Path(tmp) / "restore"
        restore_dir.mkdir()
        restores = await trio.to_thread.run_sync(plain_virsh_restore, snapshot, runs, restore_dir)
    e, p = statistics.median(e2e["times"]), statistics.median(plain)
    w, r = statistics.median(hot["times"]), statistics.median(restores)
    medians = {
        name: round(statistics.median(run[name] for run in e2e["phases"]), 3) for name in PHASES
    }
    warm_medians = {
        name: round(statistics.median(run[name] for run in hot["phases"]), 3) for name in PHASES
    }
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
        "phases_median_s": medians,
        "phases_s": e2e["phases"],
        "warm": {
            "vms_restored": hot["vms_restored"],
            "submit_to_result_s": [round(t, 2) for t in hot["times"]],
            "submit_to_result_median_s": round(w, 2),
            "plain_virsh_restore_s": [round(t, 2) for t in restores],
            "plain_virsh_restore_median_s": round(r, 2),
            "ratio_warm_over_plain_qemu": round(w / p, 2),
            "ratio_warm_over_plain_virsh_restore": round(w / r, 2),
            "phases_median_s": warm_medians,
            "phases_s": hot["phases"],
        },
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
