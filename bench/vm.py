"""Benchmark of the VM backend; prints one JSON object.

- boot_to_result: a trivial command (``true``) through the backend vs plain ``qemu-system-x86_64``
  with the same kernel, initramfs, guest init, disks and accelerator, in the same run (median of N
  and the ratio). The backend's time includes preparing the disks, libvirt and the stop event.
- idle_vm_memory: host memory of one idle 128 MiB VM (QEMU RSS/PSS) beyond what its guest uses,
  booted; idle_warm_vm_memory: the same of one restored from a warm snapshot (issue 16's goal,
  at most 40 MiB of private memory beyond guest RAM, is printed beside them).
- concurrent_vms: how many 128 MiB VMs boot and stay responsive at once here (measured up to
  --max-vms), and the memory- and CPU-bound estimates beyond that.

Usage: .venv/bin/python bench/vm.py [--runs 5] [--max-vms 12]
"""

from __future__ import annotations

import argparse
import json
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

from catalog.caps import Caps
from worker_role.tinyos import locate
from worker_role.vm import GuestCommand, Image, VmBackend, open_backend
from worker_role.vm.backend import OutputChunk
from worker_role.vm.domain_xml import TCG_TB_CACHE_MIB, Accel
from worker_role.vm.task import parse_result, task_archive

GUEST_MIB = 128
IDLE = ("sh", "-c", "echo ready; sleep 3600")


async def backend_boot(backend: VmBackend, runs: int) -> tuple[list[float], list[float]]:
    """(seconds until the result is in hand, seconds until the VM is also torn down)."""
    to_result, to_gone = [], []
    task = GuestCommand(argv=("true",), timeout_s=60)
    for _ in range(runs):
        t0 = trio.current_time()
        async with backend.start(Image.tiny(), task, Caps(memory_mib=GUEST_MIB)) as vm:
            result = await vm.wait()
            to_result.append(trio.current_time() - t0)
        to_gone.append(trio.current_time() - t0)
        if result.exit_code != 0:
            raise RuntimeError(f"backend run failed: {result}")
    return to_result, to_gone


def plain_qemu_boot(runs: int, accel: Accel, work: Path) -> list[float]:
    tiny = locate()
    task = work / "task.img"
    task.write_bytes(task_archive(GuestCommand(argv=("true",), timeout_s=60), [], network=False))
    times = []
    for _ in range(runs):
        scratch, result = work / "scratch.img", work / "result.img"
        for path, mib in ((scratch, 256), (result, 64)):
            path.unlink(missing_ok=True)
            with path.open("wb") as f:
                f.truncate(mib << 20)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", "-O", "^has_journal", str(scratch)],
            check=True,
        )
        cmd = [
            "qemu-system-x86_64",
            "-machine",
            f"pc,accel={'kvm' if accel is Accel.KVM else 'tcg'}",
            "-m",
            str(GUEST_MIB),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{work / 'console.log'}",
            "-kernel",
            str(tiny.kernel),
            "-initrd",
            str(tiny.initrd),
            "-append",
            tiny.cmdline,
        ]
        for path, serial, ro in (
            (task, "vmlend-task", True),
            (scratch, "vmlend-scratch", False),
            (result, "vmlend-result", False),
        ):
            ident = serial.split("-")[1]
            cmd += [
                "-drive",
                f"file={path},format=raw,if=none,id={ident}" + (",readonly=on" if ro else ""),
                "-device",
                f"virtio-blk-pci,drive={ident},serial={serial}",
            ]
        cmd += ["-device", "virtio-serial-pci"]
        for name in ("stdout", "stderr"):
            cmd += [
                "-chardev",
                f"file,id={name},path={work / name}",
                "-device",
                f"virtserialport,chardev={name},name=vmlend.{name}",
            ]
        t0 = time.monotonic()
        subprocess.run(cmd, check=True, timeout=120)
        got = parse_result(result.read_bytes()[: 1 << 20])
        times.append(time.monotonic() - t0)
        if got is None or got.exit_code != 0:
            raise RuntimeError(f"plain QEMU run failed: {(work / 'console.log').read_text()}")
    return times


async def wait_ready(receive: trio.MemoryReceiveChannel[OutputChunk]) -> None:
    seen = b""
    async for _stream, data in receive:
        seen += data
        if b"ready" in seen:
            return


def private_beyond_guest_ram(pid: int, guest_mib: int) -> int:
    """Bytes of private memory (dirty or anonymous, resident or swapped) of process ``pid``
    outside its guest RAM (its largest mapping of exactly ``guest_mib``), from its smaps."""
    mappings: list[list[int]] = []  # [size KiB, private KiB] per mapping
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "Size":
            mappings.append([int(rest.split()[0]), 0])
        elif key in ("Private_Dirty", "Swap") and mappings:
            mappings[-1][1] += int(rest.split()[0])
    guest = max((p for size, p in mappings if size == guest_mib * 1024), default=0)
    return (sum(p for _, p in mappings) - guest) * 1024


async def idle_memory(backend: VmBackend, *, warm: bool = False) -> dict[str, Any]:
    send, receive = trio.open_memory_channel[OutputChunk](16)
    task = GuestCommand(argv=IDLE, timeout_s=3600)
    async with backend.start(Image.tiny(), task, Caps(memory_mib=GUEST_MIB), output=send) as vm:
        if vm.warm != warm:
            raise RuntimeError(f"asked for a {'warm' if warm else 'cold'} VM, got the other")
        with trio.fail_after(120):
            await wait_ready(receive)
        qemu = psutil.Process(vm.qemu_pid())
        cpu0, t0 = sum(qemu.cpu_times()[:2]), trio.current_time()
        await trio.sleep(5)  # measuring window of idle CPU
        cpu1, t1 = sum(qemu.cpu_times()[:2]), trio.current_time()
        full = qemu.memory_full_info()
        private = private_beyond_guest_ram(qemu.pid, GUEST_MIB)
        await vm.destroy()
    return {
        "started": "restored from a warm snapshot" if warm else "booted",
        "guest_ram_mib": GUEST_MIB,
        "qemu_rss_mib": round(full.rss / 2**20, 1),
        "qemu_pss_mib": round(full.pss / 2**20, 1),
        "qemu_uss_mib": round(full.uss / 2**20, 1),
        "rss_beyond_guest_ram_mib": round(full.rss / 2**20 - GUEST_MIB, 1),
        "private_beyond_guest_ram_mib": round(private / 2**20, 1),
        "tcg_tb_cache_mib": TCG_TB_CACHE_MIB,
        "idle_cpu_fraction": round((cpu1 - cpu0) / (t1 - t0), 3),
        "note": "RSS counts the guest RAM the guest touched, QEMU's own memory (TCG's translation "
        "cache included) and file pages shared with every VM (the kernel file, QEMU's binary). "
        "private_beyond_guest_ram: the memory only this VM holds, outside its guest RAM (what "
        "another VM costs the host beyond the RAM it was given)",
    }


async def warm_idle_memory(warm_dir: Path) -> dict[str, Any]:
    """:func:`idle_memory` of a VM restored from a snapshot, as a worker with warm starts on
    runs its tasks: its translation cache holds only what ran since the restore."""
    async with open_backend(warm_dir=warm_dir, warm_budget_mib=1024) as backend:
        caps = Caps(memory_mib=GUEST_MIB)
        first = GuestCommand(argv=("true",), timeout_s=60)
        async with backend.start(Image.tiny(), first, caps) as vm:  # asks for the shape
            await vm.wait()
        pool = backend.warm
        assert pool is not None
        key = pool.key_for(Image.tiny(), caps)
        if isinstance(key, str):
            raise RuntimeError(f"no warm starts here: {key}")
        with trio.fail_after(180):
            while not pool.ready(key):  # noqa: ASYNC110 -- the pool has no event for it
                await trio.sleep(0.2)
        return await idle_memory(backend, warm=True)


async def concurrent(backend: VmBackend, max_vms: int, idle: dict[str, Any]) -> dict[str, Any]:
    ready = 0
    uss: list[float] = []
    t0 = trio.current_time()
    avail0 = psutil.virtual_memory().available
    async with trio.open_nursery() as nursery:
        done = trio.Event()
        count = {"ready": 0}

        async def one() -> None:
            send, receive = trio.open_memory_channel[OutputChunk](16)
            task = GuestCommand(argv=IDLE, timeout_s=3600)
            async with backend.start(
                Image.tiny(), task, Caps(memory_mib=GUEST_MIB), output=send
            ) as vm:
                await wait_ready(receive)
                uss.append(psutil.Process(vm.qemu_pid()).memory_full_info().uss)
                count["ready"] += 1
                if count["ready"] == max_vms:
                    done.set()
                await trio.sleep_forever()

        for _ in range(max_vms):
            nursery.start_soon(one)
        with trio.move_on_after(600):
            await done.wait()
        ready = count["ready"]
        boot_all_s = trio.current_time() - t0
        used = avail0 - psutil.virtual_memory().available
        nursery.cancel_scope.cancel()
    # Each QEMU's unique memory is what one more VM costs; the drop in available memory also
    # moves with whatever else runs on the host, so it is reported but not used.
    per_vm = statistics.mean(uss) if uss else 0.0
    total_mem = psutil.virtual_memory().total
    cpus = psutil.cpu_count() or 1
    return {
        "measured_running_at_once": ready,
        "asked": max_vms,
        "seconds_until_all_ready": round(boot_all_s, 1),
        "qemu_uss_per_vm_mib": round(per_vm / 2**20, 1),
        "available_memory_drop_per_vm_mib": round(used / max(ready, 1) / 2**20, 1),
        "memory_bound_estimate": int(0.9 * total_mem / per_vm) if per_vm else 0,
        "cpu_bound_estimate_idle": int(cpus / idle["idle_cpu_fraction"])
        if idle["idle_cpu_fraction"] > 0
        else None,
        "host_load_average_1m": round(psutil.getloadavg()[0], 1),
        "note": "measured up to 'asked'; estimates extrapolate from each QEMU's unique memory "
        "(90% of host RAM) and idle CPU (all host CPUs), the smaller one bounds",
    }


async def main(runs: int, max_vms: int) -> dict[str, Any]:
    # Other work on the host skews every number here; the load average says how much.
    load0 = round(psutil.getloadavg()[0], 1)
    async with open_backend() as backend:
        accel = backend.accel
        backend_times, teardown_times = await backend_boot(backend, runs)
        with tempfile.TemporaryDirectory(prefix="vmlend-bench-") as tmp:
            plain_times = await trio.to_thread.run_sync(
                plain_qemu_boot, runs, accel.accel, Path(tmp)
            )
        idle = await idle_memory(backend)
        with tempfile.TemporaryDirectory(prefix="vmlend-bench-warm-") as tmp:
            idle_warm = await warm_idle_memory(Path(tmp))
        many = await concurrent(backend, max_vms, idle)
    b, p = statistics.median(backend_times), statistics.median(plain_times)
    return {
        "bench": "vm",
        "accelerator": accel.accel.value,
        "accelerator_reason": accel.reason,
        "host": {
            "cpus": psutil.cpu_count(),
            "memory_mib": psutil.virtual_memory().total >> 20,
            "load_average_1m_at_start": load0,
        },
        "boot_to_result": {
            "command": "true",
            "guest_ram_mib": GUEST_MIB,
            "runs": runs,
            "backend_s": [round(t, 2) for t in backend_times],
            "plain_qemu_s": [round(t, 2) for t in plain_times],
            "backend_median_s": round(b, 2),
            "plain_qemu_median_s": round(p, 2),
            "ratio_backend_over_plain": round(b / p, 2),
            "backend_until_torn_down_s": [round(t, 2) for t in teardown_times],
            "backend_until_torn_down_median_s": round(statistics.median(teardown_times), 2),
            "note": "backend: from start() to wait() returning the result, including disk "
            "preparation and libvirt; the guest's end marker gives the result before libvirt has "
            "stopped the domain (the second list: until it is torn down). plain: "
            "qemu-system-x86_64 from exec to exit, disks prepared beforehand",
        },
        "idle_vm_memory": idle,
        "idle_warm_vm_memory": idle_warm,
        "idle_goal_private_beyond_guest_ram_mib": 40,
        "concurrent_vms": many,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-vms", type=int, default=12)
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("qemu-system-x86_64 not found")
    print(json.dumps(trio.run(main, args.runs, args.max_vms), indent=1))
