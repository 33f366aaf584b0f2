"""Backend logic that needs no VM: leftover sweeping (with a fake libvirt), path checks, caps."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from catalog.caps import Caps, NetworkMode
from worker_role.errors import CapUnsupportedError, VmSetupError
from worker_role.policy import LendingPolicy, PolicyViolation
from worker_role.vm import GuestCommand, Image
from worker_role.vm.accel import AccelChoice
from worker_role.vm.backend import RunningVm, VmBackend
from worker_role.vm.cleanup import sweep, this_process
from worker_role.vm.domain_xml import Accel, Owner
from worker_role.vm.paths import QemuUser, check_reachable, make_vm_dir


def _dead_owner() -> Owner:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return Owner(pid=proc.pid, started=started)


class FakeDomain:
    def __init__(self, name: str, owner: Owner | None) -> None:
        self._name = name
        self.owner = owner
        self.active = True
        self.destroyed = False

    def name(self) -> str:
        return self._name

    def XMLDesc(self, _flags: int) -> str:
        meta = ""
        if self.owner is not None:
            meta = (
                '<metadata><v:vm xmlns:v="https://vmlend.org/xmlns/vm/1" '
                f'owner-pid="{self.owner.pid}" owner-started="{self.owner.started!r}"/></metadata>'
            )
        return f"<domain><name>{self._name}</name>{meta}</domain>"

    def isActive(self) -> bool:
        return self.active

    def isPersistent(self) -> bool:
        return False

    def destroy(self) -> None:
        self.active = False
        self.destroyed = True


class FakeConn:
    def __init__(self, domains: list[FakeDomain]) -> None:
        self.domains = domains

    def listAllDomains(self, _flags: int) -> list[FakeDomain]:
        return self.domains


def test_sweep_removes_only_leftovers_of_dead_owners(tmp_path: Path) -> None:
    me, dead = this_process(), _dead_owner()
    user = QemuUser.lookup(None)
    doms = [
        FakeDomain("vmlend-dead", dead),
        FakeDomain("vmlend-live", me),
        FakeDomain("vmlend-nometa", None),
        FakeDomain("someone-else", dead),
    ]
    make_vm_dir(tmp_path, "vmlend-dead", user, {"pid": dead.pid, "started": dead.started})
    make_vm_dir(tmp_path, "vmlend-live", user, {"pid": me.pid, "started": me.started})
    make_vm_dir(tmp_path, "vmlend-orphan", user, {"pid": dead.pid, "started": dead.started})
    (tmp_path / "vmlend-noowner").mkdir()
    (tmp_path / "unrelated").mkdir()
    report = sweep(FakeConn(doms), tmp_path)
    assert report.destroyed == ["vmlend-dead"]
    assert [d.destroyed for d in doms] == [True, False, False, False]
    assert sorted(report.removed_dirs) == ["vmlend-dead", "vmlend-noowner", "vmlend-orphan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated", "vmlend-live"]


def test_pid_reuse_is_not_mistaken_for_the_owner() -> None:
    me = this_process()
    impostor = Owner(pid=me.pid, started=me.started - 1000)
    dom = FakeDomain("vmlend-reused", impostor)
    assert sweep(FakeConn([dom]), Path("/nonexistent")).destroyed == ["vmlend-reused"]


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temp dir QEMU's user can reach (pytest's own are under a 0700 /tmp/pytest-of-root)."""
    base = Path("/var/lib/vmlend")
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(dir=base, prefix="test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_unreachable_paths_are_named(tmp_path: Path, public_tmp: Path) -> None:
    qemu = QemuUser(uid=64055, gids=frozenset({64055}))
    with pytest.raises(VmSetupError, match="cannot enter /tmp/pytest-of"):
        check_reachable(qemu, tmp_path, what="layer")
    locked = public_tmp / "locked"
    locked.mkdir(mode=0o700)
    target = locked / "vmlinux"
    target.write_bytes(b"x")
    with pytest.raises(VmSetupError, match=r"cannot enter .*locked"):
        check_reachable(qemu, target, what="kernel")
    locked.chmod(0o755)
    target.chmod(0o600)
    with pytest.raises(VmSetupError, match="not readable"):
        check_reachable(qemu, target, what="kernel")
    target.chmod(0o644)
    check_reachable(qemu, target, what="kernel")


def test_caps_this_machine_cannot_enforce_are_refused_by_name() -> None:
    choice = AccelChoice(
        Accel.TCG, "test", unsupported={"cpu_share": "no cgroup cpu", "network": "no slirp"}
    )
    backend = VmBackend(
        Any,  # type: ignore[arg-type]  # no libvirt call happens on this path
        runtime=Path("/nonexistent"),
        qemu_user=QemuUser.lookup(None),
        accel=choice,
        boot_allowance_s=1,
        out_mib=1,
    )
    backend.check(Caps(vcpus=1, cpu_share=1.0))  # a full CPU needs no quota
    with pytest.raises(CapUnsupportedError) as info:
        backend.check(Caps(cpu_share=0.5, network=NetworkMode.PROXY))
    assert info.value.unsupported == {"cpu_share": "no cgroup cpu", "network": "no slirp"}
    assert "cpu_share: no cgroup cpu" in str(info.value)


class Untouchable:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"libvirt touched ({name}) before the policy refused")


async def test_policy_refuses_before_any_vm_starts(tmp_path: Path) -> None:
    policy = LendingPolicy(ceilings={"vcpus": 2, "memory_mib": 512}, max_concurrent_vms=1)
    backend = VmBackend(
        Untouchable(),  # type: ignore[arg-type]
        runtime=tmp_path,
        qemu_user=QemuUser.lookup(None),
        accel=AccelChoice(Accel.TCG, "test"),
        boot_allowance_s=1,
        out_mib=1,
        policy=policy,
    )
    image = Image(kernel=Path("/nonexistent"), initrd=Path("/nonexistent"), cmdline="")
    task = GuestCommand(argv=("true",))
    with pytest.raises(PolicyViolation, match="memory"):
        async with backend.start(image, task, Caps(memory_mib=1024)):
            pass
    assert list(await trio.Path(tmp_path).iterdir()) == []
    assert backend.running() == {}


def test_the_console_tail_reads_only_the_end_of_a_huge_console_log(tmp_path: Path) -> None:
    """The guest writes the console file as fast as it likes; a failure report reads its end."""
    with (tmp_path / "console.log").open("wb") as f:
        f.truncate(256 << 20)  # sparse: 256 MiB of NULs before the last lines
        f.seek(0, 2)
        f.write(b"\nvmlend-init: the last words\r\n")
    vm = RunningVm.__new__(RunningVm)  # only its directory is used here
    vm.dir = tmp_path
    tracemalloc.start()
    try:
        tail = vm.console_tail()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tail[-1] == "vmlend-init: the last words"
    assert peak < 4 << 20
