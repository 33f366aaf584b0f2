"""The libvirt side of warm starts (worker_role/vm/warm.py): build a snapshot, restore one.

Both go through :func:`warm_plan`, so a restored guest has exactly the devices it was saved with:
the task, scratch and result disks, :data:`WARM_LAYER_SLOTS` layer devices (spare files fill
the ones a task leaves empty) and the control port.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
import trio

from catalog.caps import Caps
from worker_role.errors import VmError
from worker_role.vm.domain_xml import (
    WARM_LAYER_SLOTS,
    DomainPlan,
    WarmDevices,
    build_domain_xml,
)
from worker_role.vm.interface import Image
from worker_role.vm.paths import make_vm_dir
from worker_role.vm.running_vm import console_says
from worker_role.vm.warm import DISK_CAPACITY, Slot

if TYPE_CHECKING:
    from worker_role.vm.backend import VmBackend

log = logging.getLogger("vmlend.worker.vm")
# What the guest's init prints once it waits for its task on the control port.
WARM_WAITING = b"vmlend-init: warm and waiting"
_POLL_S = 0.1
# A restored guest's control socket appears with QEMU; connecting is retried this long.
_CONTROL_CONNECT_S = 5.0


def spare_layers(spare: Path) -> tuple[Path, ...]:
    """The sparse files behind layer devices no task uses (created once, read-only)."""
    spare.mkdir(parents=True, exist_ok=True)
    spare.chmod(0o755)
    paths = []
    for i in range(WARM_LAYER_SLOTS):
        path = spare / f"layer{i}.img"
        if not path.exists() or path.stat().st_size != DISK_CAPACITY:
            with path.open("wb") as f:
                f.truncate(DISK_CAPACITY)
            path.chmod(0o444)
        paths.append(path)
    return tuple(paths)


def warm_plan(cold: DomainPlan, slot: Slot, spare_dir: Path) -> DomainPlan:
    """``cold`` as a guest restored from ``slot`` (or saved as it): its devices and identity."""
    spares = spare_layers(spare_dir)
    return dataclasses.replace(
        cold,
        name=slot.name,
        warm=WarmDevices(
            uuid=slot.uuid,
            genid=slot.genid,
            control_socket=cold.console_log.with_name("control.sock"),
            spare_layers=spares[len(cold.layers) :],
        ),
    )


async def build_snapshot(backend: VmBackend, slot: Slot, image: Image, caps: Caps) -> None:
    """Boot a warm guest of ``slot``'s shape on sparse disks and save it once it waits."""
    name = slot.name
    owner: dict[str, object] = {"pid": backend.owner.pid, "started": backend.owner.started}
    vm_dir = await trio.to_thread.run_sync(
        make_vm_dir, backend.runtime, name, backend.qemu_user, owner
    )
    created = False
    try:
        await trio.to_thread.run_sync(_sparse_disks, vm_dir)
        shape = Caps(memory_mib=caps.memory_mib, vcpus=caps.vcpus, cpu_share=caps.vcpus)
        assert backend.warm is not None
        cold = backend.plan_for(name, dataclasses.replace(image, layers=()), shape, vm_dir)
        plan = await trio.to_thread.run_sync(warm_plan, cold, slot, backend.warm.spare_dir)
        dom = await backend.create(plan)
        created = True
        with trio.move_on_after(backend.boot_allowance_s) as waited:
            await console_says(vm_dir / "console.log", WARM_WAITING, _POLL_S)
        if waited.cancelled_caught:
            raise VmError(
                f"the warm guest {name} did not come up within {backend.boot_allowance_s:.0f} s"
            )
        await backend.conn.call(f"save {name}", dom.save, str(slot.save_path))
        created = False  # a saved domain is gone
    finally:
        with trio.CancelScope(shield=True):
            if created:
                await backend._destroy(name)
            await trio.to_thread.run_sync(shutil.rmtree, vm_dir, True)


async def restore(backend: VmBackend, slot: Slot, plan: DomainPlan) -> Any:
    """Restore ``slot`` as ``plan`` (paused), hold it to its memory limit, run it and hand it
    its task. Returns the domain; on VmError the caller destroys what may be left."""
    assert plan.warm is not None
    name = plan.name
    await backend.conn.call(
        f"restore {name} from its snapshot",
        backend.conn.raw.restoreFlags,
        str(slot.save_path),
        build_domain_xml(plan),
        libvirt.VIR_DOMAIN_SAVE_PAUSED,
    )
    dom = await backend.conn.call(f"look up {name}", backend.conn.raw.lookupByName, name)
    await backend.limit_memory(dom, plan)
    await backend.conn.call(f"resume {name}", dom.resume)
    return dom


async def hand_over(control_socket: Path, task_bytes: int) -> trio.SocketStream:
    """Tell a restored guest to go: the time, a seed of its own and its task archive's length.
    The stream stays open for the VM's life (closing it early could drop the line before QEMU
    reads it)."""
    line = f"GO {int(time.time())} {secrets.token_hex(32)} {task_bytes}\n".encode()
    stream: trio.SocketStream | None = None
    with trio.move_on_after(_CONTROL_CONNECT_S):
        while stream is None:
            try:
                stream = await trio.open_unix_socket(str(control_socket))
            except OSError:
                await trio.sleep(0.01)
    if stream is None:
        raise VmError(f"the restored guest's control port {control_socket} never opened")
    try:
        await stream.send_all(line)
    except (trio.BrokenResourceError, OSError) as e:
        await stream.aclose()
        raise VmError(f"handing the task to the restored guest: {e}") from e
    return stream


def _sparse_disks(vm_dir: Path) -> None:
    for name in ("task.img", "scratch.img", "result.img"):
        with (vm_dir / name).open("wb") as f:
            f.truncate(DISK_CAPACITY)
