"""Warm starts on real libvirt + QEMU: a task's VM restored from a snapshot of a booted guest.

Each test keeps its snapshots in its own directory, builds one the way a worker does (the first
VM of a shape asks for it), then starts tasks from it.
"""

from __future__ import annotations

import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from catalog.caps import Caps
from worker_role.vm import GuestCommand, Image, Layer, VmBackend, VmResult, open_backend
from worker_role.vm.domain_xml import hard_limit_kib
from worker_role.vm.warm import SlotState, WarmKey, WarmPool, _record


async def until(condition: Callable[[], object], seconds: float) -> None:
    with trio.fail_after(seconds):
        while True:
            if condition():
                return
            await trio.sleep(0.1)


SHAPE = Caps(memory_mib=128, vcpus=1)
BOOT_ALLOWANCE_S = 60.0


@pytest.fixture(scope="module")
def shared_warm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Snapshots the tests that leave them whole share: each builds one only if none is there
    (a pool verifies what it finds when it opens)."""
    return tmp_path_factory.mktemp("warm")


@pytest.fixture
async def warm(shared_warm_dir: Path) -> AsyncIterator[VmBackend]:
    async with open_backend(
        boot_allowance_s=BOOT_ALLOWANCE_S, warm_dir=shared_warm_dir, warm_budget_mib=1024
    ) as backend:
        yield backend
        names = [n for n in await backend.our_domains() if "-w" in n]
        assert all(not (backend.runtime / n).exists() for n in names)


def pool_of(backend: VmBackend) -> WarmPool:
    assert backend.warm is not None
    return backend.warm


async def snapshot_ready(backend: VmBackend, image: Image, caps: Caps = SHAPE) -> WarmKey:
    """Ask for the shape as a first VM would (unless one is there already), and wait for its
    snapshot."""
    pool = pool_of(backend)
    key = pool.key_for(image, caps)
    assert isinstance(key, WarmKey), key
    await until(lambda: all(s.state is not SlotState.VERIFYING for s in pool.slots), 30)
    if pool.ready(key):
        return key
    assert pool.take(key, image, caps) is None
    await until(lambda: pool.ready(key), 120)
    return key


async def run_watching(
    backend: VmBackend, image: Image, task: GuestCommand, caps: Caps
) -> tuple[VmResult, ET.Element]:
    """Run the task; also return the domain's live XML, read while it ran."""
    async with backend.start(image, task, caps) as vm:
        dom = await backend.conn.call("look up", backend.conn.raw.lookupByName, vm.name)
        xml = ET.fromstring(await backend.conn.call("xml", dom.XMLDesc, 0))
        params = await backend.conn.call("memtune", dom.memoryParameters, 0)
        xml.set("hard-limit-kib", str(params["hard_limit"]))
        return await vm.wait(), xml


RANDOM_AND_FORK = GuestCommand(
    argv=(
        "sh",
        "-c",
        "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo;"
        "dmesg | grep -c 'crng reseeded due to virtual machine fork';"
        "cat /layer/hello.txt /lower/e.txt; date +%s",
    ),
    timeout_s=30,
)


async def test_two_tasks_restored_from_one_snapshot_see_their_own_random_bytes_and_generation_id(
    warm: VmBackend, squashfs_layer: Layer, erofs_layer: Layer
) -> None:
    image = Image.tiny((squashfs_layer, erofs_layer))
    await snapshot_ready(warm, image)
    seen = []
    for _ in range(2):
        before = trio.current_time()
        result, xml = await run_watching(warm, image, RANDOM_AND_FORK, SHAPE)
        assert result.warm, "a ready snapshot of the shape was there to restore"
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.decode().split("\n")
        random_hex, reseeds, layer1, layer2, guest_time = lines[:5]
        assert re.fullmatch(r"[0-9a-f]{64}", random_hex)
        # The restored guest's kernel saw its generation ID change and reseeded at once.
        assert int(reseeds) >= 1
        assert (layer1, layer2) == ("hello from a layer", "hello from erofs")
        assert abs(int(guest_time) - time.time()) < 30, "the clock is today's, not the snapshot's"
        genid = xml.findtext("genid")
        assert genid
        seen.append((random_hex, genid))
        logging.getLogger(__name__).info("warm run took %.2f s", trio.current_time() - before)
    (r1, g1), (r2, g2) = seen
    assert r1 != r2, "two clones of one snapshot drew the same random bytes"
    assert g1 != g2
    (slot,) = pool_of(warm).slots
    assert slot.genid not in (g1, g2)


async def test_caps_hold_on_a_restored_vm_as_on_a_booted_one(warm: VmBackend) -> None:
    image = Image.tiny()
    await snapshot_ready(warm, image)
    caps = Caps(memory_mib=128, vcpus=1, cpu_share=0.5, disk_mib=32, disk_bps=8 << 20)
    task = GuestCommand(
        argv=(
            "sh",
            "-c",
            "grep MemTotal /proc/meminfo; nproc;"
            "dd if=/dev/zero of=/fill bs=1M count=64 2>/dev/null && echo filled || echo disk full",
        ),
        timeout_s=60,
    )
    result, xml = await run_watching(warm, image, task, caps)
    assert result.warm
    out = result.stdout.decode()
    mem_kib = int(re.search(r"MemTotal:\s+(\d+) kB", out)[1])  # type: ignore[index]
    assert 64 * 1024 < mem_kib <= 128 * 1024
    assert out.split("\n")[1] == "1"
    assert "disk full" in out  # 64 MiB do not fit on a 32 MiB scratch disk
    assert xml.findtext("cputune/global_quota") == "50000"
    bps = {d.findtext("iotune/total_bytes_sec") for d in xml.iter("disk")}
    assert str(8 << 20) in bps
    assert int(xml.get("hard-limit-kib", "0")) == hard_limit_kib(caps, warm.accel.accel)


async def test_a_snapshot_corrupted_at_rest_is_dropped_and_the_task_boots(tmp_path: Path) -> None:
    image = Image.tiny()
    task = GuestCommand(argv=("echo", "booted"), timeout_s=30)
    async with open_backend(
        boot_allowance_s=BOOT_ALLOWANCE_S, warm_dir=tmp_path / "warm", warm_budget_mib=1024
    ) as backend:
        await snapshot_ready(backend, image)
        (slot,) = pool_of(backend).slots
    with slot.save_path.open("r+b") as f:  # rot in the middle, same size
        f.seek(slot.size // 2)
        f.write(b"\xa5" * 4096)
    async with open_backend(
        boot_allowance_s=BOOT_ALLOWANCE_S, warm_dir=tmp_path / "warm", warm_budget_mib=1024
    ) as backend:
        # Verified at start, found wrong, removed.
        await until(lambda: not pool_of(backend).slots, 30)
        result = await backend.run(image, task, SHAPE)
        assert not result.warm
        assert result.stdout == b"booted\n"


async def test_a_restore_that_fails_falls_back_to_a_cold_boot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = Image.tiny()
    async with open_backend(
        boot_allowance_s=BOOT_ALLOWANCE_S, warm_dir=tmp_path / "warm", warm_budget_mib=1024
    ) as warm:
        await snapshot_ready(warm, image)
        (slot,) = pool_of(warm).slots
        # Damage QEMU's part of the file and record it as verified: only the restore can tell.
        with slot.save_path.open("r+b") as f:
            f.seek(64 * 1024)
            f.write(b"\x00garbage" * 8192)
        _record(slot)
        result = await warm.run(image, GuestCommand(argv=("echo", "booted"), timeout_s=30), SHAPE)
        assert not result.warm
        assert result.stdout == b"booted\n"
        assert result.exit_code == 0
        assert "warm start of" in caplog.text
        assert "booting it" in caplog.text
        assert not slot.save_path.exists()
        assert pool_of(warm).slots == []


async def test_a_snapshot_whose_guests_never_start_their_task_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker_role.vm.backend as backend_module
    from worker_role.errors import GuestTimeoutError

    async def silent_hand_over(control_socket: Path, task_bytes: int) -> trio.SocketStream:
        return await trio.open_unix_socket(str(control_socket))  # connected, never says GO

    image = Image.tiny()
    async with open_backend(
        boot_allowance_s=BOOT_ALLOWANCE_S, warm_dir=tmp_path / "warm", warm_budget_mib=1024
    ) as backend:
        await snapshot_ready(backend, image)
        monkeypatch.setattr(backend_module, "hand_over", silent_hand_over)
        monkeypatch.setattr(backend_module, "WARM_GRACE_S", 3.0)
        backend.boot_allowance_s = 3.0  # the task's host deadline: 1 + 3 s
        with pytest.raises(GuestTimeoutError):
            await backend.run(image, GuestCommand(argv=("true",), timeout_s=1), SHAPE)
        assert pool_of(backend).slots == []  # condemned, not handed to the next task
