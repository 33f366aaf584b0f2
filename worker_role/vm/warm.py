"""Warm starts: a lease restores a saved, freshly booted guest instead of booting one.

A snapshot is libvirt's saved state of a guest booted with ``vmlend.warm=1``, whose init waits on
the control port before it touches a disk (``worker_role/guest/init.sh``). A lease restores a
copy of it with the task's own files behind the same devices, a new VM generation ID (the guest
kernel reseeds its RNG when it changes) and, through the control port, the time and a fresh seed.
A snapshot is only ever restored: nothing a task did is saved again.

Three facts of libvirt and the guest kernel shape this module:

- libvirt restores a saved domain only under the name and UUID it was saved with, so each VM
  running at once from one shape needs a snapshot of its own: a shape has *slots*.
- The guest probed its disks before the snapshot and keeps their sizes; libvirt cannot resize a
  read-only disk. So every device of a warm guest claims :data:`DISK_CAPACITY` (sparse files at
  build time) and a task's file must be whole pages no larger than that: the guest reads only
  what its file systems hold, and a page past the end of a file would be an I/O error.
- The device set and the guest's shape (memory, vCPUs) are part of the saved state; the CPU share,
  disk throttles and memory hard limit are not and are set for each task.

A slot's lifecycle is :data:`TRANSITIONS`. A slot is verified (its SHA-256 against the one
recorded when it was built) before every use, off the task path: after a build, at start, and
after every restore of it. A snapshot whose key no longer matches (the OS, kernel, init, QEMU or
libvirt changed) is deleted when the pool opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import trio

from catalog.caps import Caps, NetworkMode
from worker_role.errors import VmError
from worker_role.vm.domain_xml import NAME_PREFIX, WARM_LAYER_SLOTS
from worker_role.vm.interface import Image

log = logging.getLogger("vmlend.worker.vm")

# Bump when the warm device layout or the guest's warm contract changes in a way the keys below
# do not see (the initrd's hash covers init.sh).
SNAPSHOT_FORMAT = 1
DISK_CAPACITY = 1 << 40
PAGE = 4096
_UUID_NAMESPACE = uuid.UUID("5d0c1f8e-3b53-4f55-9d38-7a8e0f6f2b1c")
_HASH_CHUNK = 1 << 20
# Shapes waiting for a build, and OS files whose digest is remembered: a scheduler that asks
# for ever new shapes or images must not grow either without bound.
MAX_WANTED = 8
MAX_OS_DIGESTS = 64


class SlotState(StrEnum):
    BUILDING = "building"
    VERIFYING = "verifying"
    READY = "ready"
    IN_USE = "in use"
    GONE = "gone"


class SlotEvent(StrEnum):
    BUILT = "built"
    VERIFIED = "verified"
    FAILED = "failed"
    TAKEN = "taken"
    RELEASED = "released"
    EVICTED = "evicted"


TRANSITIONS: dict[tuple[SlotState, SlotEvent], SlotState] = {
    (SlotState.BUILDING, SlotEvent.BUILT): SlotState.READY,
    (SlotState.BUILDING, SlotEvent.FAILED): SlotState.GONE,
    (SlotState.VERIFYING, SlotEvent.VERIFIED): SlotState.READY,
    (SlotState.VERIFYING, SlotEvent.FAILED): SlotState.GONE,
    (SlotState.READY, SlotEvent.TAKEN): SlotState.IN_USE,
    (SlotState.READY, SlotEvent.EVICTED): SlotState.GONE,
    (SlotState.READY, SlotEvent.FAILED): SlotState.GONE,
    (SlotState.IN_USE, SlotEvent.RELEASED): SlotState.READY,
    (SlotState.IN_USE, SlotEvent.FAILED): SlotState.GONE,
}


class SlotTransitionError(VmError):
    """A slot was asked to do what its state does not allow (a bug, never a peer's doing)."""


@dataclass(frozen=True, slots=True)
class WarmKey:
    """What a snapshot is only good for: this OS on this QEMU, in this shape."""

    os: str
    """Digest of the kernel, initrd and command line."""
    platform: str
    """Digest of the QEMU binary, libvirt's version, the accelerator and :data:`SNAPSHOT_FORMAT`."""
    memory_mib: int
    vcpus: int

    @property
    def digest(self) -> str:
        text = f"{self.os}:{self.platform}:{self.memory_mib}:{self.vcpus}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return {
            "os": self.os,
            "platform": self.platform,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
        }

    @classmethod
    def from_json(cls, raw: object) -> WarmKey | None:
        if not isinstance(raw, dict):
            return None
        try:
            key = cls(
                os=str(raw["os"]),
                platform=str(raw["platform"]),
                memory_mib=int(raw["memory_mib"]),
                vcpus=int(raw["vcpus"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return key


@dataclass(eq=False, slots=True)
class Slot:
    """One snapshot of a key: a save file and what it was built as."""

    key: WarmKey
    index: int
    dir: Path
    state: SlotState
    sha256: str = ""
    size: int = 0
    stamp: tuple[int, int, int] = (0, 0, 0)
    """inode, mtime and ctime of the file when it was verified; ctime moves on any write and
    cannot be set back."""
    used_at: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        # Of this pool's directory too: nodes sharing a host must not share a domain name.
        place = hashlib.sha256(f"{self.dir.resolve()}".encode()).hexdigest()[:10]
        return f"{NAME_PREFIX}w{place}-{self.index}"

    @property
    def uuid(self) -> str:
        return str(uuid.uuid5(_UUID_NAMESPACE, self.name))

    @property
    def genid(self) -> str:
        """The VM generation ID it is saved with. It must be in the XML a restore gives, and
        libvirt gives every restored domain a new one (and the guest kernel reseeds)."""
        return str(uuid.uuid5(_UUID_NAMESPACE, f"{self.name}/genid"))

    @property
    def save_path(self) -> Path:
        return self.dir / f"slot{self.index}.save"

    @property
    def meta_path(self) -> Path:
        return self.dir / f"slot{self.index}.json"

    def fire(self, event: SlotEvent) -> None:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise SlotTransitionError(f"snapshot {self.name}: {event} while {self.state}")
        self.state = new

    def unchanged_on_disk(self) -> bool:
        """Whether the save file is still the one last verified."""
        try:
            st = self.save_path.stat()
        except OSError:
            return False
        return st.st_size == self.size and _stamp(st) == self.stamp

    def note_file(self) -> None:
        st = self.save_path.stat()
        self.size, self.stamp = st.st_size, _stamp(st)


Builder = Callable[[Slot, Image, Caps], Awaitable[None]]
"""Boots a warm guest for the slot's key and saves it to ``slot.save_path``."""


class WarmPool:
    """The snapshots a worker keeps, within a disk budget, and the builds it still owes.

    ``take`` and ``release`` are called on the task path and never wait; building and verifying
    happen in :meth:`run`, only while ``idle()`` says no task VM runs, one at a time.
    """

    def __init__(
        self,
        root: Path,
        *,
        spare_dir: Path,
        budget_bytes: int,
        slots_per_shape: int,
        platform: str,
    ) -> None:
        if slots_per_shape < 1:
            raise ValueError("slots_per_shape must be >= 1")
        self.root = root
        self.spare_dir = spare_dir
        """Where the files behind unused layer devices live: QEMU's user must reach them."""
        self.budget_bytes = budget_bytes
        self.slots_per_shape = slots_per_shape
        self.platform = platform
        self.slots: list[Slot] = []
        self._wanted: dict[WarmKey, tuple[Image, Caps]] = {}
        self._wake = trio.Event()
        self._os_digests: dict[tuple[str, int, int], str] = {}
        self._too_big: set[WarmKey] = set()

    # -- on the task path ------------------------------------------------------------------

    def key_for(self, image: Image, caps: Caps) -> WarmKey | str:
        """The key a task's VM would restore from, or why it cannot start warm."""
        if caps.network is not NetworkMode.NONE:
            return "it uses the network"
        if len(image.layers) > WARM_LAYER_SLOTS:
            return f"it has more than {WARM_LAYER_SLOTS} layers"
        for layer in image.layers:
            try:
                size = layer.path.stat().st_size
            except OSError as e:
                return f"layer {layer.path}: {e}"
            if size % PAGE or size > DISK_CAPACITY:
                return f"layer {layer.path.name} is not whole pages ({size} bytes)"
        try:
            os_digest = self._os_digest(image)
        except OSError as e:
            return f"cannot read the OS: {e}"
        return WarmKey(
            os=os_digest, platform=self.platform, memory_mib=caps.memory_mib, vcpus=caps.vcpus
        )

    def take(self, key: WarmKey, image: Image, caps: Caps) -> Slot | None:
        """A verified snapshot of ``key`` for one VM, or None (and a build is owed if the
        shape has room for another slot)."""
        mine = [s for s in self.slots if s.key == key]
        for slot in mine:
            if slot.state is SlotState.READY:
                if not slot.unchanged_on_disk():
                    log.warning("snapshot %s changed on disk since it was verified", slot.name)
                    self._drop(slot)
                    continue
                slot.fire(SlotEvent.TAKEN)
                slot.used_at = trio.current_time()
                return slot
        live = [s for s in mine if s.state is not SlotState.GONE]
        if len(live) < self.slots_per_shape:
            self._want(key, image, caps)
        return None

    def release(self, slot: Slot, *, failed: str | None = None) -> None:
        """The VM restored from ``slot`` is gone; ``failed`` says why the restore did not work."""
        if failed is not None:
            log.warning("snapshot %s failed (%s); it is removed", slot.name, failed)
            self._drop(slot)
            return
        slot.fire(SlotEvent.RELEASED)
        self._wake.set()

    # -- in the background -----------------------------------------------------------------

    async def open(self) -> None:
        """Load what the root holds: a snapshot of another platform, or one not fully
        recorded, is deleted; the rest wait for verification."""
        self.slots = await trio.to_thread.run_sync(self._load)
        self._wake.set()

    async def run(
        self,
        build: Builder,
        idle: Callable[[], bool],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            for slot in [s for s in self.slots if s.state is SlotState.VERIFYING]:
                await self._verify(slot)
            while self._wanted and idle():
                key, (image, caps) = next(iter(self._wanted.items()))
                del self._wanted[key]
                await self._build(key, image, caps, build)
            if self._wanted:
                # Builds wait for an idle machine; look again soon.
                with trio.move_on_after(1.0):
                    await self._wake.wait()
                self._wake.set()

    def ready(self, key: WarmKey) -> int:
        return sum(1 for s in self.slots if s.key == key and s.state is SlotState.READY)

    def usage_bytes(self) -> int:
        return sum(s.size for s in self.slots if s.state is not SlotState.GONE)

    async def _verify(self, slot: Slot) -> None:
        try:
            digest = await trio.to_thread.run_sync(_sha256, slot.save_path)
        except OSError as e:
            digest = f"unreadable: {e}"
        if digest == slot.sha256 and slot.unchanged_on_disk():
            slot.fire(SlotEvent.VERIFIED)
        else:
            log.warning("snapshot %s does not match what was built; it is removed", slot.name)
            self._drop(slot)

    async def _build(self, key: WarmKey, image: Image, caps: Caps, build: Builder) -> None:
        taken = {s.index for s in self.slots if s.key == key and s.state is not SlotState.GONE}
        if len(taken) >= self.slots_per_shape:
            return
        if key in self._too_big:
            return
        index = min(set(range(self.slots_per_shape)) - taken)
        slot = Slot(key, index, self.root / key.digest, SlotState.BUILDING)
        self.slots.append(slot)
        started = trio.current_time()
        try:
            await trio.to_thread.run_sync(_prepare_dir, slot)
            await build(slot, image, caps)
            await trio.to_thread.run_sync(_record, slot)
        except (VmError, OSError) as e:
            log.warning("building snapshot %s failed: %s", slot.name, e)
            self._drop(slot)
            return
        slot.fire(SlotEvent.BUILT)
        if not self._make_room(slot):
            self._too_big.add(key)
            log.info(
                "no warm snapshot for %d MiB x %d vCPU: one takes %d MiB, more than the "
                "snapshot budget (%d MiB) leaves",
                key.memory_mib,
                key.vcpus,
                slot.size >> 20,
                self.budget_bytes >> 20,
            )
            self._drop(slot)
            return
        log.info(
            "warm snapshot %s ready (%d MiB, built in %.1f s)",
            slot.name,
            slot.size >> 20,
            trio.current_time() - started,
        )
        # One more slot of a shape in demand is built next, while the machine stays idle.
        if len(taken) + 1 < self.slots_per_shape:
            self._want(key, image, caps)

    def _want(self, key: WarmKey, image: Image, caps: Caps) -> None:
        self._wanted.pop(key, None)  # the latest asked for goes last, the oldest goes first
        self._wanted[key] = (image, caps)
        while len(self._wanted) > MAX_WANTED:
            del self._wanted[next(iter(self._wanted))]
        self._wake.set()

    def _make_room(self, new: Slot) -> bool:
        """Evict the least recently used ready snapshots of other shapes until ``new`` fits
        within the budget; False if it cannot."""
        victims = sorted(
            (s for s in self.slots if s.state is SlotState.READY and s.key != new.key),
            key=lambda s: s.used_at,
        )
        while self.usage_bytes() > self.budget_bytes:
            if not victims:
                return False
            victim = victims.pop(0)
            victim.fire(SlotEvent.EVICTED)
            _remove(victim)
        self.slots = [s for s in self.slots if s.state is not SlotState.GONE]
        return True

    def _drop(self, slot: Slot) -> None:
        if slot.state is not SlotState.GONE:
            slot.fire(SlotEvent.FAILED)
        _remove(slot)
        self.slots = [s for s in self.slots if s is not slot]

    def _os_digest(self, image: Image) -> str:
        h = hashlib.sha256(image.cmdline.encode())
        for path in (image.kernel, image.initrd):
            st = path.stat()
            cache_key = (str(path), st.st_size, st.st_mtime_ns)
            if cache_key not in self._os_digests:
                if len(self._os_digests) >= MAX_OS_DIGESTS:
                    del self._os_digests[next(iter(self._os_digests))]
                self._os_digests[cache_key] = _sha256(path)
            h.update(self._os_digests[cache_key].encode())
        return h.hexdigest()[:32]

    def _load(self) -> list[Slot]:
        slots: list[Slot] = []
        self.root.mkdir(parents=True, exist_ok=True)
        for d in sorted(self.root.iterdir()):
            kept = False
            for meta in sorted(d.glob("slot*.json")) if d.is_dir() else []:
                slot = _read_slot(d, meta)
                if (
                    slot is not None
                    and slot.key.platform == self.platform
                    and slot.key.digest == d.name
                    and slot.index < self.slots_per_shape
                ):
                    slots.append(slot)
                    kept = True
                else:
                    meta.unlink(missing_ok=True)
                    (d / meta.name.replace(".json", ".save")).unlink(missing_ok=True)
            if not kept:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        return slots


def _read_slot(d: Path, meta: Path) -> Slot | None:
    try:
        raw = json.loads(meta.read_text())
        key = WarmKey.from_json(raw.get("key"))
        if key is None:
            return None
        slot = Slot(key, int(raw["index"]), d, SlotState.VERIFYING, sha256=str(raw["sha256"]))
        slot.note_file()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if meta.name != slot.meta_path.name:
        return None
    return slot


def _prepare_dir(slot: Slot) -> None:
    slot.dir.mkdir(parents=True, exist_ok=True)
    slot.save_path.unlink(missing_ok=True)
    slot.meta_path.unlink(missing_ok=True)


def _record(slot: Slot) -> None:
    """Hash what was saved and record it beside, the record written last and atomically."""
    slot.note_file()
    slot.sha256 = _sha256(slot.save_path)
    tmp = slot.meta_path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"key": slot.key.to_json(), "index": slot.index, "sha256": slot.sha256})
    )
    os.replace(tmp, slot.meta_path)


def _remove(slot: Slot) -> None:
    slot.meta_path.unlink(missing_ok=True)
    slot.save_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        slot.dir.rmdir()  # only once its last slot is gone


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
