"""The domain XML from caps, without libvirt: each cap lands where QEMU enforces it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog.caps import Caps, NetworkMode
from worker_role.vm.domain_xml import (
    CPU_PERIOD_US,
    METADATA_NS,
    QEMU_NS,
    WARM_CMDLINE_FLAG,
    WARM_LAYER_SLOTS,
    Accel,
    DomainPlan,
    Owner,
    WarmDevices,
    build_domain_xml,
    hard_limit_kib,
    parse_owner,
)
from worker_role.vm.task import CONTROL_PORT, Layer, LayerFormat

OWNER = Owner(pid=1234, started=1700000000.25)


def plan(
    caps: Caps, *, accel: Accel = Accel.TCG, layers: tuple[Layer, ...] = (), port: int | None = None
) -> DomainPlan:
    d = Path("/var/lib/vmlend/vm/vmlend-x")
    return DomainPlan(
        name="vmlend-x",
        accel=accel,
        caps=caps,
        kernel=Path("/k/vmlinux"),
        initrd=Path("/k/initramfs.cpio"),
        cmdline="console=ttyS0",
        task_disk=d / "task.img",
        scratch_disk=d / "scratch.img",
        result_disk=d / "result.img",
        layers=layers,
        console_log=d / "console.log",
        stdout_socket=d / "stdout.sock",
        stderr_socket=d / "stderr.sock",
        owner=OWNER,
        proxy_port=port,
    )


def parse(caps: Caps, **kw: object) -> ET.Element:
    return ET.fromstring(build_domain_xml(plan(caps, **kw)))  # type: ignore[arg-type]


@given(
    vcpus=st.integers(1, 8),
    share_frac=st.floats(0.01, 1.0),
    memory=st.integers(32, 8192),
    disk=st.integers(1, 100_000),
)
def test_cpu_and_memory_caps(vcpus: int, share_frac: float, memory: int, disk: int) -> None:
    caps = Caps(vcpus=vcpus, cpu_share=share_frac * vcpus, memory_mib=memory, disk_mib=disk)
    dom = parse(caps)
    assert dom.findtext("vcpu") == str(vcpus)
    assert dom.find("memory").attrib["unit"] == "MiB"  # type: ignore[union-attr]
    assert dom.findtext("memory") == str(memory)
    # The whole VM's quota (global_*), not only the vCPU threads' (<quota>).
    assert dom.findtext("cputune/global_period") == str(CPU_PERIOD_US)
    quota = int(dom.findtext("cputune/global_quota") or 0)
    assert quota == max(1000, round(caps.cpu_share * CPU_PERIOD_US))  # 1 ms: the kernel's floor
    assert dom.find("cputune/quota") is None
    # memtune in the XML would fail without CAP_SYS_RESOURCE: the hard limit is set live instead.
    assert dom.find("memtune") is None
    assert hard_limit_kib(caps, Accel.TCG) > memory * 1024 + 100 * 1024


def test_machine_devices_and_lifecycle() -> None:
    dom = parse(Caps())
    assert dom.attrib["type"] == "qemu"
    assert dom.find("os/type").attrib["machine"] == "pc"  # type: ignore[union-attr]  # iotune needs pc/q35
    assert dom.find("features/acpi") is not None  # poweroff ends the domain
    assert dom.findtext("features/tcg/tb-cache") is not None
    assert [dom.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    assert dom.find("devices/interface") is None  # network none: no NIC at all
    assert dom.find(f"{{{QEMU_NS}}}commandline") is None
    serials = [d.findtext("serial") for d in dom.findall("devices/disk")]
    assert serials == ["vmlend-task", "vmlend-scratch", "vmlend-result"]
    ports = [c.find("target").attrib["name"] for c in dom.findall("devices/channel")]  # type: ignore[union-attr]
    assert ports == ["vmlend.stdout", "vmlend.stderr"]
    assert parse(Caps(), accel=Accel.KVM).attrib["type"] == "kvm"


def test_disk_caps_throttle_scratch_and_layers_as_one_group() -> None:
    layers = (Layer(Path("/l/a.sqfs")), Layer(Path("/l/b.erofs"), LayerFormat.EROFS))
    dom = parse(Caps(disk_bps=10 << 20, disk_iops=300), layers=layers)
    disks = {d.findtext("serial"): d for d in dom.findall("devices/disk")}
    for serial in ("vmlend-scratch", "vmlend-layer0", "vmlend-layer1"):
        iotune = disks[serial].find("iotune")
        assert iotune is not None
        assert iotune.findtext("total_bytes_sec") == str(10 << 20)
        assert iotune.findtext("total_iops_sec") == "300"
        assert iotune.findtext("group_name") == "vmlend"
    assert disks["vmlend-layer1"].find("readonly") is not None
    assert disks["vmlend-task"].find("iotune") is None
    assert parse(Caps()).find("devices/disk/iotune") is None  # unlimited: no throttle at all


def test_proxy_network_is_restricted_user_mode_with_one_forward() -> None:
    dom = parse(Caps(network=NetworkMode.PROXY, net_allow=("x:80",)), port=4321)
    args = [a.attrib["value"] for a in dom.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    netdev = args[args.index("-netdev") + 1]
    assert "restrict=on" in netdev
    assert "guestfwd=tcp:10.0.2.100:3128-chardev:vmlendfwd" in netdev
    chardev = args[args.index("-chardev") + 1]
    assert "port=4321" in chardev
    assert "host=127.0.0.1" in chardev
    with pytest.raises(ValueError, match="proxy port"):
        plan(Caps(network=NetworkMode.PROXY))
    with pytest.raises(ValueError, match="proxy port"):
        plan(Caps(), port=1)


def test_owner_metadata_round_trips() -> None:
    xml = build_domain_xml(plan(Caps()))
    assert parse_owner(xml) == OWNER
    assert METADATA_NS in xml
    assert parse_owner("<domain><name>vmlend-y</name></domain>") is None
    assert parse_owner("not xml") is None


def test_name_must_carry_our_prefix() -> None:
    p = plan(Caps())
    fields = {f: getattr(p, f) for f in p.__dataclass_fields__}
    fields["name"] = "other"
    with pytest.raises(ValueError, match="vmlend-"):
        DomainPlan(**fields)


def warm_devices(spares: int) -> WarmDevices:
    return WarmDevices(
        uuid="8d3c7a52-93c4-5b4e-9d1f-0a6f1c2b3d4e",
        genid="1b0f5c4e-2a9d-5e6f-8a7b-9c0d1e2f3a4b",
        control_socket=Path("/v/control.sock"),
        spare_layers=tuple(Path(f"/spare/layer{i}.img") for i in range(spares)),
    )


def test_a_warm_guest_has_the_same_devices_whatever_its_task_uses() -> None:
    one = Layer(Path("/layers/a.sqfs"))
    shapes = []
    for layers in ((), (one,), (one, one)):
        warm = warm_devices(WARM_LAYER_SLOTS - len(layers))
        root = ET.fromstring(build_domain_xml(replace(plan(Caps(), layers=layers), warm=warm)))
        assert root.findtext("uuid") == warm.uuid
        assert root.findtext("genid") == warm.genid
        assert root.findtext("os/cmdline", "").endswith(WARM_CMDLINE_FLAG)
        ports = [c.find("target").get("name") for c in root.iter("channel")]  # type: ignore[union-attr]
        assert CONTROL_PORT in ports
        shapes.append(
            [(d.find("target").get("dev"), d.findtext("serial"), d.find("readonly") is not None)  # type: ignore[union-attr]
             for d in root.iter("disk")]
        )  # fmt: skip
    assert shapes[0] == shapes[1] == shapes[2]
    assert len(shapes[0]) == 3 + WARM_LAYER_SLOTS
    # No warm devices, no warm guest: a cold plan is as it was.
    cold = parse(Caps())
    assert cold.find("genid") is None
    assert WARM_CMDLINE_FLAG not in cold.findtext("os/cmdline", "")


def test_a_warm_plan_refuses_what_its_snapshot_could_not_have() -> None:
    with pytest.raises(ValueError, match="layer devices"):
        replace(plan(Caps()), warm=warm_devices(WARM_LAYER_SLOTS - 1))
    with pytest.raises(ValueError, match="no network"):
        replace(
            plan(Caps(network=NetworkMode.PROXY, net_allow=("a.org:443",)), port=3128),
            warm=warm_devices(WARM_LAYER_SLOTS),
        )
