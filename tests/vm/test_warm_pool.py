"""The warm pool's bookkeeping without libvirt: slots' lifecycle, what may start warm, the disk
budget, and verification (a builder here writes bytes where libvirt would save a guest)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio.testing import MockClock

from catalog.caps import Caps, NetworkMode
from worker_role.vm.interface import Image
from worker_role.vm.task import Layer
from worker_role.vm.warm import (
    MAX_WANTED,
    TRANSITIONS,
    Slot,
    SlotEvent,
    SlotState,
    SlotTransitionError,
    WarmKey,
    WarmPool,
)


async def until(condition: Callable[[], object], seconds: float) -> None:
    with trio.fail_after(seconds):
        while True:
            if condition():
                return
            await trio.sleep(0.1)


SHAPE = Caps(memory_mib=128)
KEY = WarmKey(os="o", platform="p", memory_mib=128, vcpus=1)


@pytest.fixture
def clock() -> MockClock:
    # Verification hashes in a thread: jump only when nothing, threads included, is running.
    return MockClock(autojump_threshold=0.5)


@given(st.lists(st.sampled_from(list(SlotEvent)), max_size=30))
def test_a_slot_only_moves_along_its_table_and_gone_is_final(events: list[SlotEvent]) -> None:
    slot = Slot(KEY, 0, Path("/nonexistent"), SlotState.BUILDING)
    for event in events:
        before = slot.state
        if (before, event) in TRANSITIONS:
            slot.fire(event)
            assert slot.state is TRANSITIONS[(before, event)]
        else:
            with pytest.raises(SlotTransitionError):
                slot.fire(event)
            assert slot.state is before
    # Only a ready slot is ever handed out, and nothing leaves GONE.
    assert {s for (s, e) in TRANSITIONS if e is SlotEvent.TAKEN} == {SlotState.READY}
    assert not any(s is SlotState.GONE for (s, _e) in TRANSITIONS)


def image_in(tmp_path: Path, *layers: Layer) -> Image:
    kernel, initrd = tmp_path / "vmlinux", tmp_path / "initrd"
    if not kernel.exists():
        kernel.write_bytes(b"k" * 100)
        initrd.write_bytes(b"i" * 100)
    return Image(kernel=kernel, initrd=initrd, cmdline="console=ttyS0", layers=layers)


class Builds:
    """A builder that 'saves' ``size`` bytes and counts its calls."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.calls: list[Slot] = []
        self.fail = False

    async def __call__(self, slot: Slot, image: Image, caps: Caps) -> None:
        self.calls.append(slot)
        if self.fail:
            from worker_role.errors import VmError

            raise VmError("the guest did not come up")
        slot.save_path.write_bytes(os.urandom(self.size))


def pool_in(
    tmp_path: Path, *, budget: int = 1 << 30, slots: int = 1, platform: str = "p"
) -> WarmPool:
    return WarmPool(
        tmp_path / "warm",
        spare_dir=tmp_path / "spare",
        budget_bytes=budget,
        slots_per_shape=slots,
        platform=platform,
    )


@asynccontextmanager
async def running(
    pool: WarmPool, builds: Builds, idle: list[bool] | None = None
) -> AsyncIterator[None]:
    flag = idle if idle is not None else [True]
    async with trio.open_nursery() as nursery:
        await pool.open()
        await nursery.start(pool.run, builds, lambda: flag[0])
        yield
        nursery.cancel_scope.cancel()


async def ready(pool: WarmPool, key: WarmKey, count: int = 1) -> None:
    await until(lambda: pool.ready(key) >= count, 30)


def test_what_cannot_start_warm_says_why(tmp_path: Path) -> None:
    pool = pool_in(tmp_path)
    odd = tmp_path / "odd.sqfs"
    odd.write_bytes(b"x" * 5000)
    assert "network" in str(
        pool.key_for(image_in(tmp_path), Caps(network=NetworkMode.PROXY, net_allow=("a.org:443",)))
    )
    many = tuple(Layer(odd) for _ in range(7))
    assert "layers" in str(pool.key_for(image_in(tmp_path, *many), SHAPE))
    assert "whole pages" in str(pool.key_for(image_in(tmp_path, Layer(odd)), SHAPE))
    even = tmp_path / "even.sqfs"
    even.write_bytes(b"x" * 8192)
    key = pool.key_for(image_in(tmp_path, Layer(even)), SHAPE)
    assert isinstance(key, WarmKey)
    assert key.memory_mib == 128
    assert key.vcpus == 1
    # The key is the OS's: another initrd is another key.
    (tmp_path / "initrd").write_bytes(b"j" * 100)
    assert pool.key_for(image_in(tmp_path), SHAPE) != key


async def test_a_shape_is_built_when_first_asked_for_then_restored_again_and_again(
    tmp_path: Path, clock: MockClock
) -> None:
    pool, builds = pool_in(tmp_path), Builds()
    image = image_in(tmp_path)
    key = pool.key_for(image, SHAPE)
    assert isinstance(key, WarmKey)
    async with running(pool, builds):
        assert pool.take(key, image, SHAPE) is None  # the first VM of a shape boots
        await ready(pool, key)
        for _ in range(3):
            slot = pool.take(key, image, SHAPE)
            assert slot is not None
            assert slot.state is SlotState.IN_USE
            assert pool.take(key, image, SHAPE) is None  # one slot: the next one boots
            pool.release(slot)
            assert pool.ready(key) == 1
        assert len(builds.calls) == 1


async def test_builds_wait_for_an_idle_machine(tmp_path: Path, clock: MockClock) -> None:
    pool, builds = pool_in(tmp_path), Builds()
    image = image_in(tmp_path)
    key = pool.key_for(image, SHAPE)
    assert isinstance(key, WarmKey)
    idle = [False]
    async with running(pool, builds, idle):
        pool.take(key, image, SHAPE)
        await trio.sleep(3)  # three looks at the machine
        assert builds.calls == []
        idle[0] = True
        await ready(pool, key)


async def test_the_budget_evicts_the_least_recently_used_shape_and_never_overflows(
    tmp_path: Path, clock: MockClock
) -> None:
    pool, builds = pool_in(tmp_path, budget=10_000), Builds(size=6000)
    image = image_in(tmp_path)
    small, large = Caps(memory_mib=64), Caps(memory_mib=128)
    k_small, k_large = pool.key_for(image, small), pool.key_for(image, large)
    assert isinstance(k_small, WarmKey)
    assert isinstance(k_large, WarmKey)
    async with running(pool, builds):
        pool.take(k_small, image, small)
        await ready(pool, k_small)
        pool.take(k_large, image, large)
        await ready(pool, k_large)
        assert pool.ready(k_small) == 0  # evicted, its file gone
        assert pool.usage_bytes() <= 10_000
        assert len(list((tmp_path / "warm").rglob("*.save"))) == 1
    # A snapshot larger than the whole budget is dropped once built, and not built again.
    tiny, builds2 = pool_in(tmp_path / "t", budget=100), Builds(size=6000)
    async with running(tiny, builds2):
        for _ in range(3):
            tiny.take(k_large, image, large)
            await trio.sleep(5)
        assert len(builds2.calls) == 1
        assert tiny.ready(k_large) == 0
        assert list((tmp_path / "t").rglob("*.save")) == []


async def test_a_failed_build_leaves_nothing_and_is_tried_again_when_asked(
    tmp_path: Path, clock: MockClock
) -> None:
    pool, builds = pool_in(tmp_path), Builds()
    builds.fail = True
    image = image_in(tmp_path)
    key = pool.key_for(image, SHAPE)
    assert isinstance(key, WarmKey)
    async with running(pool, builds):
        pool.take(key, image, SHAPE)
        await until(lambda: builds.calls, 10)
        await trio.sleep(1)
        assert pool.slots == []
        assert list((tmp_path / "warm").rglob("slot*")) == []
        builds.fail = False
        pool.take(key, image, SHAPE)
        await ready(pool, key)


async def test_a_snapshot_changed_on_disk_is_never_handed_out(
    tmp_path: Path, clock: MockClock
) -> None:
    pool, builds = pool_in(tmp_path), Builds()
    image = image_in(tmp_path)
    key = pool.key_for(image, SHAPE)
    assert isinstance(key, WarmKey)
    async with running(pool, builds):
        pool.take(key, image, SHAPE)
        await ready(pool, key)
        (slot,) = pool.slots
        # Same size, same mtime: only the change time gives it away, and that cannot be reset.
        st = slot.save_path.stat()
        with slot.save_path.open("r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 8)
        os.utime(slot.save_path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert pool.take(key, image, SHAPE) is None
        assert not slot.save_path.exists()


async def test_at_start_only_whole_verified_snapshots_of_this_platform_are_kept(
    tmp_path: Path, clock: MockClock
) -> None:
    image = image_in(tmp_path)
    keys = []
    pool = pool_in(tmp_path, slots=1)
    async with running(pool, Builds()):
        for mib in (64, 96, 128):
            caps = Caps(memory_mib=mib)
            key = pool.key_for(image, caps)
            assert isinstance(key, WarmKey)
            keys.append(key)
            pool.take(key, image, caps)
            await ready(pool, key)
    good, rotten, unrecorded = (next(s for s in pool.slots if s.key == k) for k in keys)
    with rotten.save_path.open("r+b") as f:  # rot: same size, other bytes
        f.seek(10)
        f.write(b"\x00" * 16)
    unrecorded.meta_path.write_text(json.dumps({"key": "?"}))

    again = pool_in(tmp_path, slots=1)
    async with running(again, Builds()):
        await ready(again, keys[0])
        assert {s.key for s in again.slots} == {keys[0]}
    assert not rotten.save_path.exists()
    assert not unrecorded.save_path.exists()
    assert good.save_path.exists()

    other = pool_in(tmp_path, slots=1, platform="another QEMU")
    async with running(other, Builds()):
        await trio.sleep(1)
        assert other.slots == []
    assert list((tmp_path / "warm").iterdir()) == []


async def test_a_scheduler_asking_for_ever_new_shapes_leaves_a_bounded_wish_list(
    tmp_path: Path, clock: MockClock
) -> None:
    pool, builds = pool_in(tmp_path), Builds()
    image = image_in(tmp_path)
    idle = [False]
    async with running(pool, builds, idle):
        shapes = [Caps(memory_mib=64 + i) for i in range(40)]
        for caps in shapes:
            key = pool.key_for(image, caps)
            assert isinstance(key, WarmKey)
            assert pool.take(key, image, caps) is None
        idle[0] = True
        await until(lambda: len(builds.calls) >= MAX_WANTED, 30)
        await trio.sleep(3)
        # Only the latest shapes asked for were built, no more than the list holds.
        assert len(builds.calls) == MAX_WANTED
        assert {s.key.memory_mib for s in builds.calls} == {c.memory_mib for c in shapes[-8:]}
