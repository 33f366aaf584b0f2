"""``vmlend doctor``: can this machine lend compute, and if not, why not.

Every check measures rather than assumes: the accelerator is chosen by booting a probe guest (a
/dev/kvm that opens can still be unusable, as on nested hosts), and libvirt by connecting to it.
Exit code 0 only when the node can lend. The VM backend's checks belong to the worker role, which
``node`` does not import: :mod:`node.cli` hands them in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from node.errors import ConfigError, IdentityError, VmlendError

MIN_FREE_DISK = 2 * 1024**3

VmChecks = Callable[[Path], Iterable[tuple[str, Literal["ok", "warn", "no"], str]]]
"""(name, status, detail) of each check the VM backend makes with its VM directory; "warn":
it works, but worse than it could (the node can still lend)."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False


def _check_config(data_flag: str | None) -> tuple[list[Check], Path | None, Path | None]:
    from node.config import load_config, resolve_data_dir

    try:
        data_dir = resolve_data_dir(data_flag)
        config = load_config(data_dir, {})
    except ConfigError as e:
        return [Check("config", False, str(e))], None, None
    checks = [Check("config", True, f"data dir {data_dir}")]
    key = data_dir / "identity.key"
    if key.exists():
        from node.identity import Identity

        try:
            Identity.load(key)
            checks.append(Check("identity", True, f"{key} (0600)"))
        except IdentityError as e:
            checks.append(Check("identity", False, str(e)))
    else:
        checks.append(Check("identity", True, f"{key} will be created on first start"))
    return checks, data_dir, config.worker.vm_dir


def _check_disk(path: Path, label: str) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    ok = free >= MIN_FREE_DISK
    return Check(f"disk ({label})", ok, f"{free / 1024**3:.1f} GiB free under {probe}")


def _check_vm(vm_dir: Path, vm_checks: VmChecks) -> list[Check]:
    try:
        return [
            Check(name, status != "no", detail, warning=status == "warn")
            for name, status, detail in vm_checks(vm_dir)
        ]
    except VmlendError as e:
        return [Check("vm backend", False, str(e))]


def run_doctor(data_flag: str | None, *, vm_checks: VmChecks, as_json: bool = False) -> int:
    checks, data_dir, vm_dir = _check_config(data_flag)
    if data_dir is not None:
        checks.append(_check_disk(data_dir, "data"))
    if vm_dir is not None:
        checks.append(_check_disk(vm_dir, "vm"))
        checks.extend(_check_vm(vm_dir, vm_checks))
    can_lend = all(c.ok for c in checks)
    if as_json:
        print(json.dumps({"can_lend": can_lend, "checks": [asdict(c) for c in checks]}))
    else:
        for c in checks:
            mark = "NO  " if not c.ok else "WARN" if c.warning else "ok  "
            print(f"{mark} {c.name:<14} {c.detail}")
        print("this node can lend compute" if can_lend else "this node cannot lend compute yet")
    return 0 if can_lend else 1
