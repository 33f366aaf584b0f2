"""Choosing the accelerator by booting, never by the presence of /dev/kvm.

Seen on this kind of machine: /dev/kvm opens and creates VMs, but it is a nested implementation
under which a real kernel crawls and then dies with "KVM internal error ... emulation failure". So
KVM is chosen only if a probe guest boots under it and returns a result within a short deadline;
otherwise TCG, which must then boot too. The same probe VM checks, live, which caps this libvirt
can enforce. The answer is cached per (tiny OS, host kernel, libvirt, QEMU).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
import trio

from catalog.caps import Caps
from worker_role.errors import GuestFailedError, VmError, VmSetupError
from worker_role.tinyos import locate
from worker_role.vm.domain_xml import Accel, cpu_quota_us, hard_limit_kib

if TYPE_CHECKING:
    from worker_role.vm.backend import VmBackend

log = logging.getLogger("vmlend.worker.vm")
KVM_DEADLINE_S = 20.0
CACHE_FILE = "accel.json"
_PROBE_CAPS = Caps(vcpus=1, cpu_share=0.5, memory_mib=128, disk_mib=16, disk_bps=10 << 20)


@dataclass(frozen=True, slots=True)
class AccelChoice:
    """The accelerator VMs use here, why, and which caps cannot be enforced (cap -> reason)."""

    accel: Accel
    reason: str
    boot_s: float | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    cached: bool = False

    @classmethod
    def forced(cls, accel: Accel) -> AccelChoice:
        return cls(accel=accel, reason="forced by configuration (not probed)")

    def describe(self) -> str:
        name = "KVM" if self.accel is Accel.KVM else "TCG (software emulation)"
        boot = f", probe boot-to-result {self.boot_s:.1f} s" if self.boot_s is not None else ""
        missing = ", ".join(f"{k} ({v})" for k, v in self.unsupported.items())
        caps = f"; caps not enforceable: {missing}" if missing else "; all caps enforceable"
        return f"{name}: {self.reason}{boot}{caps}{' [cached]' if self.cached else ''}"


async def choose(backend: VmBackend, *, refresh: bool = False) -> AccelChoice:
    """The cached choice for this machine, or a fresh probe (which boots one or two VMs)."""
    key = await _cache_key(backend)
    cache = backend.runtime / CACHE_FILE
    if not refresh:
        cached = await trio.to_thread.run_sync(_read_cache, cache, key)
        if cached is not None:
            return cached
    choice = await _probe(backend)
    await trio.to_thread.run_sync(_write_cache, cache, key, choice)
    return choice


async def _probe(backend: VmBackend) -> AccelChoice:
    from worker_role.vm.backend import Image

    image = Image.tiny()
    kvm_why = await _kvm_unavailable(backend)
    if kvm_why is None:
        try:
            with trio.fail_after(KVM_DEADLINE_S):
                boot_s, unsupported = await _boot(backend, image, Accel.KVM)
        except trio.TooSlowError:
            kvm_why = f"a probe guest under KVM gave no result within {KVM_DEADLINE_S:.0f} s"
        except VmError as e:
            kvm_why = f"a probe guest under KVM failed: {_first_line(e)}"
        else:
            return AccelChoice(Accel.KVM, "a probe guest booted under KVM", boot_s, unsupported)
    try:
        boot_s, unsupported = await _boot(backend, image, Accel.TCG)
    except VmError as e:
        raise VmSetupError(f"no accelerator works: {kvm_why}; TCG probe failed: {e}") from e
    return AccelChoice(Accel.TCG, f"KVM not usable: {kvm_why}", boot_s, unsupported)


async def _boot(backend: VmBackend, image: Any, accel: Accel) -> tuple[float, dict[str, str]]:
    """Boot a probe guest under ``accel`` and check live tuning on it.

    Returns (boot-to-result seconds, unsupported caps).
    """
    from worker_role.vm.task import GuestCommand

    task = GuestCommand(argv=("echo", "vmlend-probe"), timeout_s=10)
    async with backend.start(image, task, _PROBE_CAPS, accel=accel, enforce=False) as vm:
        unsupported = await _check_live_caps(backend, vm.name, accel)
        result = await vm.wait()
    if result.exit_code != 0 or b"vmlend-probe" not in result.stdout:
        raise GuestFailedError(
            f"probe guest returned {result.exit_code}", console_tail=result.console_tail
        )
    return result.elapsed_s, unsupported


async def _check_live_caps(backend: VmBackend, name: str, accel: Accel) -> dict[str, str]:
    unsupported: dict[str, str] = {}
    net = await trio.to_thread.run_sync(_user_netdev_available)
    if net is not None:
        unsupported["network"] = net

    def tune() -> None:
        dom = backend.conn.raw.lookupByName(name)
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE
        checks: list[tuple[str, Any]] = [
            (
                "cpu_share",
                lambda: dom.setSchedulerParametersFlags(
                    {"global_quota": cpu_quota_us(_PROBE_CAPS)}, live
                ),
            ),
            (
                "memory_mib",
                lambda: dom.setMemoryParameters(
                    {"hard_limit": hard_limit_kib(_PROBE_CAPS, accel)}, live
                ),
            ),
            (
                "disk_bps",
                lambda: dom.setBlockIoTune(
                    "vdb", {"total_bytes_sec": _PROBE_CAPS.disk_bps, "group_name": "vmlend"}, live
                ),
            ),
        ]
        for cap, check in checks:
            try:
                check()
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise VmError("probe guest ended before its caps could be checked") from e
                unsupported[cap] = e.get_error_message() or str(e)
        if "disk_bps" in unsupported:
            unsupported["disk_iops"] = unsupported["disk_bps"]

    await trio.to_thread.run_sync(tune)
    return unsupported


def _user_netdev_available() -> str | None:
    try:
        proc = subprocess.run(
            ["qemu-system-x86_64", "-netdev", "help"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot ask QEMU for its network backends: {e}"
    if "user" not in proc.stdout.split():
        return "this QEMU has no user-mode network (slirp)"
    return None


async def _kvm_unavailable(backend: VmBackend) -> str | None:
    if not await trio.Path("/dev/kvm").exists():
        return "no /dev/kvm"

    def domcaps() -> str | None:
        try:
            backend.conn.raw.getDomainCapabilities(None, "x86_64", "pc", "kvm", 0)
        except libvirt.libvirtError as e:
            return f"libvirt offers no KVM domains: {e.get_error_message()}"
        return None

    return await trio.to_thread.run_sync(domcaps)


async def _cache_key(backend: VmBackend) -> str:
    def versions() -> tuple[int, int]:
        return backend.conn.raw.getLibVersion(), backend.conn.raw.getVersion()

    lib, hv = await backend.conn.call("versions", versions)
    return f"{locate().ident}/{os.uname().release}/libvirt {lib}/qemu {hv}"


def _read_cache(path: Path, key: str) -> AccelChoice | None:
    try:
        raw = json.loads(path.read_text())
        if raw.get("key") != key:
            return None
        return AccelChoice(
            accel=Accel(raw["accel"]),
            reason=raw["reason"],
            boot_s=raw["boot_s"],
            unsupported=dict(raw["unsupported"]),
            cached=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, key: str, choice: AccelChoice) -> None:
    data = asdict(choice)
    data.update(key=key, accel=choice.accel.value, cached=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


async def probe_accelerator(
    *, uri: str | None = None, runtime_dir: Path | None = None, refresh: bool = False
) -> AccelChoice:
    """For ``vmlend doctor``: the accelerator VMs use here and why (probing if not cached)."""
    from worker_role.vm.backend import open_backend
    from worker_role.vm.conn import DEFAULT_URI

    async with open_backend(
        uri=uri or DEFAULT_URI, runtime_dir=runtime_dir, refresh_probe=refresh
    ) as backend:
        return backend.accel
