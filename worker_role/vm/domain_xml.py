"""Libvirt domain XML for one capped task VM, from its caps and image. Pure: no I/O, no libvirt.

Each cap maps to one mechanism, measured on QEMU 7.2 / libvirt 9.0:
- vcpus: ``<vcpu>``; cpu share: ``<global_quota>``, which caps the whole QEMU process (the per-vCPU
  ``<quota>`` leaves the emulator and I/O threads free: 51 % measured for a 50 % cap).
- memory: guest RAM here; the host-side hard limit is set live after start (see backend), because
  ``<memtune>`` in the XML needs CAP_SYS_RESOURCE which libvirtd may lack.
- disk: a scratch image of the cap's size; bytes/s and IOPS by ``<iotune>`` in one throttle group
  over every disk of the VM (``iotune`` needs ``pc``/``q35``; QEMU's ``microvm`` lacks it).
- network: none (no NIC: the guest has only ``lo``), or a user-mode NIC with ``restrict=on`` whose
  one way out is a guestfwd to the worker's egress proxy (libvirt has no XML for either option).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from catalog.caps import Caps, NetworkMode
from worker_role.vm.task import (
    CONTROL_PORT,
    LAYER_SERIAL,
    PROXY_GUEST_ADDR,
    PROXY_GUEST_PORT,
    RESULT_SERIAL,
    SCRATCH_SERIAL,
    STDERR_PORT,
    STDOUT_PORT,
    TASK_SERIAL,
    Layer,
)

NAME_PREFIX = "vmlend-"
METADATA_NS = "https://vmlend.org/xmlns/vm/1"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CPU_PERIOD_US = 100_000
# Disks are vda (task), vdb (scratch), vdc (result), then one per layer up to vdz.
MAX_LAYERS = 23
# TCG's translation cache defaults to 1 GiB of host memory. Measured here (bench/vm, tiny OS,
# 128 MiB guest): 64 MiB -> 73 MiB of private memory beyond guest RAM, boot to result 2.95 s;
# 32 -> 53 MiB, 3.02 s; 24 -> 44 MiB, 3.45 s; 16 -> 35 MiB, 3.78 s. Below 32 the cache thrashes
# while the guest boots.
TCG_TB_CACHE_MIB = 32
# A warm guest (worker_role/vm/warm.py) has this many layer devices whatever its task uses: the
# device set of a restored guest must be the one it was saved with.
WARM_LAYER_SLOTS = 6
# init_on_free: memory the guest frees before it is saved (the initramfs it unpacked, the
# kernel's init sections, caches it dropped) is zeros, which a save leaves out and a restore
# does not read.
WARM_CMDLINE_FLAG = "vmlend.warm=1 init_on_free=1"


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "qemu"  # libvirt's domain type for TCG


@dataclass(frozen=True, slots=True, kw_only=True)
class Owner:
    """The process that created a domain: a crashed owner's domains are leftovers to remove."""

    pid: int
    started: float
    """The owner's process start time (psutil ``create_time``), so a reused pid is not mistaken."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmDevices:
    """What makes a guest restorable from a warm snapshot (worker_role/vm/warm.py)."""

    uuid: str
    """The snapshot slot's: libvirt restores a saved domain only under its own name and UUID."""
    genid: str
    """The VM generation ID the snapshot is saved with; libvirt changes it on every restore."""
    control_socket: Path
    spare_layers: tuple[Path, ...]
    """Files behind the layer devices the task leaves empty, one per slot it leaves."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainPlan:
    """Everything the XML needs; paths must be reachable by QEMU's user."""

    name: str
    accel: Accel
    caps: Caps
    kernel: Path
    initrd: Path
    cmdline: str
    task_disk: Path
    scratch_disk: Path
    result_disk: Path
    layers: Sequence[Layer]
    console_log: Path
    stdout_socket: Path
    stderr_socket: Path
    owner: Owner
    proxy_port: int | None = None
    warm: WarmDevices | None = None

    def __post_init__(self) -> None:
        if self.warm is not None:
            if len(self.layers) + len(self.warm.spare_layers) != WARM_LAYER_SLOTS:
                raise ValueError(f"a warm guest has exactly {WARM_LAYER_SLOTS} layer devices")
            if self.proxy_port is not None:
                raise ValueError("a warm guest has no network")
        if len(self.layers) > MAX_LAYERS:
            raise ValueError(f"at most {MAX_LAYERS} layers, got {len(self.layers)}")
        if not self.name.startswith(NAME_PREFIX):
            raise ValueError(f"domain name must start with {NAME_PREFIX!r}: {self.name!r}")
        if (self.caps.network is NetworkMode.PROXY) != (self.proxy_port is not None):
            raise ValueError("a proxy port is needed exactly when the network mode is proxy")


def cpu_quota_us(caps: Caps) -> int:
    """The whole VM's CPU time per ``CPU_PERIOD_US``; cpu_share is in host CPUs."""
    return max(1000, round(caps.cpu_share * CPU_PERIOD_US))


def hard_limit_kib(caps: Caps, accel: Accel) -> int:
    """The host-side memory limit for the QEMU process: guest RAM plus QEMU's own needs.

    Measured: ~100 MiB of headroom is the least that does not get QEMU killed; under TCG a
    128 MiB guest that fills its RAM peaked at 298 MiB RSS (314 MiB with the page cache its disks
    charge to the cgroup), so TCG gets its translation cache and a margin on top.
    """
    headroom = 192 + (TCG_TB_CACHE_MIB if accel is Accel.TCG else 0)
    return (caps.memory_mib + headroom) * 1024


def build_domain_xml(plan: DomainPlan) -> str:
    caps = plan.caps
    dom = ET.Element("domain", {"type": plan.accel.value})
    ET.register_namespace("qemu", QEMU_NS)
    _text(dom, "name", plan.name)
    if plan.warm is not None:
        _text(dom, "uuid", plan.warm.uuid)
        _text(dom, "genid", plan.warm.genid)
    meta = ET.SubElement(dom, "metadata")
    ET.SubElement(
        meta,
        f"{{{METADATA_NS}}}vm",
        {"owner-pid": str(plan.owner.pid), "owner-started": repr(plan.owner.started)},
    )
    _text(dom, "memory", str(caps.memory_mib), unit="MiB")
    _text(dom, "vcpu", str(caps.vcpus))
    cputune = ET.SubElement(dom, "cputune")
    _text(cputune, "global_period", str(CPU_PERIOD_US))
    _text(cputune, "global_quota", str(cpu_quota_us(caps)))

    os_ = ET.SubElement(dom, "os")
    _text(os_, "type", "hvm", arch="x86_64", machine="pc")
    _text(os_, "kernel", str(plan.kernel))
    _text(os_, "initrd", str(plan.initrd))
    _text(os_, "cmdline", f"{plan.cmdline} {WARM_CMDLINE_FLAG}" if plan.warm else plan.cmdline)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")  # without it the guest's poweroff does not end the domain
    if plan.accel is Accel.TCG:
        tcg = ET.SubElement(features, "tcg")
        _text(tcg, "tb-cache", str(TCG_TB_CACHE_MIB), unit="MiB")
    else:
        ET.SubElement(dom, "cpu", {"mode": "host-passthrough"})
    ET.SubElement(dom, "clock", {"offset": "utc"})
    # Any end of the guest ends the domain: a panic reboots (panic=-1), a reboot destroys.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _text(dom, event, "destroy")

    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "controller", {"type": "usb", "model": "none"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    throttle = caps if caps.disk_bps > 0 or caps.disk_iops > 0 else None
    _disk(devices, plan.task_disk, "vda", TASK_SERIAL, readonly=True, caps=None)
    _disk(devices, plan.scratch_disk, "vdb", SCRATCH_SERIAL, readonly=False, caps=throttle)
    _disk(devices, plan.result_disk, "vdc", RESULT_SERIAL, readonly=False, caps=None)
    layer_paths = [layer.path for layer in plan.layers]
    if plan.warm is not None:
        layer_paths += plan.warm.spare_layers
    for i, layer_path in enumerate(layer_paths):
        _disk(
            devices,
            layer_path,
            f"vd{chr(ord('d') + i)}",
            LAYER_SERIAL.format(i),
            readonly=True,
            caps=throttle,
        )
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": str(plan.console_log)})
    ET.SubElement(serial, "target", {"port": "0"})
    ports = [(plan.stdout_socket, STDOUT_PORT), (plan.stderr_socket, STDERR_PORT)]
    if plan.warm is not None:
        ports.append((plan.warm.control_socket, CONTROL_PORT))
    for path, port in ports:
        channel = ET.SubElement(devices, "channel", {"type": "unix"})
        ET.SubElement(channel, "source", {"mode": "bind", "path": str(path)})
        ET.SubElement(channel, "target", {"type": "virtio", "name": port})

    if plan.proxy_port is not None:
        cmdline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        fwd = f"tcp:{PROXY_GUEST_ADDR}:{PROXY_GUEST_PORT}-chardev:vmlendfwd"
        for arg in (
            "-chardev",
            f"socket,id=vmlendfwd,host=127.0.0.1,port={plan.proxy_port},reconnect=1",
            "-netdev",
            f"user,id=vmlendnet,restrict=on,guestfwd={fwd}",
            "-device",
            # QEMU sees these args before libvirt's devices: a fixed slot far above the ones
            # libvirt hands out from 2 upward avoids "slot 2 ... in use by virtio-net-pci".
            "virtio-net-pci,netdev=vmlendnet,addr=0x1e",
        ):
            ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", {"value": arg})
    return ET.tostring(dom, encoding="unicode")


def _disk(
    devices: ET.Element, path: Path, target: str, serial: str, *, readonly: bool, caps: Caps | None
) -> None:
    disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
    ET.SubElement(disk, "driver", {"name": "qemu", "type": "raw"})
    ET.SubElement(disk, "source", {"file": str(path)})
    ET.SubElement(disk, "target", {"dev": target, "bus": "virtio"})
    _text(disk, "serial", serial)
    if readonly:
        ET.SubElement(disk, "readonly")
    if caps is not None:
        iotune = ET.SubElement(disk, "iotune")
        if caps.disk_bps:
            _text(iotune, "total_bytes_sec", str(caps.disk_bps))
        if caps.disk_iops:
            _text(iotune, "total_iops_sec", str(caps.disk_iops))
        # One group: the caps bound the VM's disk I/O together, not each disk separately.
        _text(iotune, "group_name", "vmlend")


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


def parse_owner(domain_xml: str) -> Owner | None:
    """The owner recorded in a domain's metadata, or None when the domain is not ours."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    vm = root.find(f"metadata/{{{METADATA_NS}}}vm")
    if vm is None:
        return None
    try:
        return Owner(pid=int(vm.attrib["owner-pid"]), started=float(vm.attrib["owner-started"]))
    except (KeyError, ValueError):
        return None
