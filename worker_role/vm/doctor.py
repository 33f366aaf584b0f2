"""What ``vmlend doctor`` asks of the VM backend: can this machine run capped VMs, and how."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import trio

from worker_role.errors import WorkerError
from worker_role.tinyos import locate
from worker_role.vm.accel import AccelChoice, probe_accelerator
from worker_role.vm.domain_xml import Accel

Check = tuple[str, Literal["ok", "warn", "no"], str]


def vm_checks(vm_dir: Path, *, refresh: bool = False) -> list[Check]:
    """(name, status, detail) for the tiny OS, libvirt, the VM directory and the accelerator:
    "warn" where VMs run but worse than they could (software emulation).

    Blocking (it may boot probe VMs, ~30 s the first time, cached after): call it outside trio.
    """
    checks: list[Check] = []
    try:
        tiny = locate()
        checks.append(("tiny os", "ok", f"{tiny.ident} (kernel {tiny.kernel_release})"))
    except WorkerError as e:
        return [("tiny os", "no", str(e))]
    try:
        choice: AccelChoice = trio.run(_probe, vm_dir, refresh)
    except WorkerError as e:
        return [*checks, ("accelerator", "no", str(e))]
    if choice.accel is Accel.KVM:
        checks.append(("accelerator", "ok", choice.describe()))
    else:
        advice = (
            "VMs run, but many times slower than under KVM; to lend at full speed, enable "
            "virtualization (VT-x/AMD-V) in the firmware, or nested virtualization on a VM host"
        )
        checks.append(("accelerator", "warn", f"{choice.describe()}. {advice}"))
    checks.append(
        (
            "vm caps",
            "ok" if not choice.unsupported else "no",
            "all enforceable"
            if not choice.unsupported
            else "not enforceable: " + ", ".join(sorted(choice.unsupported)),
        )
    )
    return checks


async def _probe(vm_dir: Path, refresh: bool) -> AccelChoice:
    return await probe_accelerator(runtime_dir=vm_dir, refresh=refresh)
