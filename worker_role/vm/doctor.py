"""What ``vmlend doctor`` asks of the VM backend: can this machine run capped VMs, and how."""

from __future__ import annotations

from pathlib import Path

import trio

from worker_role.errors import WorkerError
from worker_role.tinyos import locate
from worker_role.vm.accel import AccelChoice, probe_accelerator

Check = tuple[str, bool, str]


def vm_checks(vm_dir: Path, *, refresh: bool = False) -> list[Check]:
    """(name, ok, detail) for the tiny OS, libvirt, the VM directory and the accelerator.

    Blocking (it may boot probe VMs, ~30 s the first time, cached after): call it outside trio.
    """
    checks: list[Check] = []
    try:
        tiny = locate()
        checks.append(("tiny os", True, f"{tiny.ident} (kernel {tiny.kernel_release})"))
    except WorkerError as e:
        return [("tiny os", False, str(e))]
    try:
        choice: AccelChoice = trio.run(_probe, vm_dir, refresh)
    except WorkerError as e:
        return [*checks, ("accelerator", False, str(e))]
    checks.append(("accelerator", True, choice.describe()))
    checks.append(
        (
            "vm caps",
            not choice.unsupported,
            "all enforceable"
            if not choice.unsupported
            else "not enforceable: " + ", ".join(sorted(choice.unsupported)),
        )
    )
    return checks


async def _probe(vm_dir: Path, refresh: bool) -> AccelChoice:
    return await probe_accelerator(runtime_dir=vm_dir, refresh=refresh)
