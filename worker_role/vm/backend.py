"""The VM backend: one capped libvirt domain per task, driven from trio.

``open_backend()`` connects, removes what a crashed run left, and settles the accelerator (probing
by booting, cached). ``VmBackend.start()`` is an async context manager owning one VM: it prepares
the VM's files, creates the domain, streams the guest's stdout/stderr, and on exit destroys the
domain and deletes every file, whatever happened inside. ``RunningVm.wait()`` returns the result or
raises :class:`GuestFailedError` with the console's last lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import trio

from catalog.caps import Caps, NetworkMode
from node.supervise import one_error
from worker_role.egress_proxy import EgressProxy
from worker_role.errors import (
    CapUnsupportedError,
    VmError,
    VmSetupError,
)
from worker_role.policy import LendingPolicy
from worker_role.vm import accel as accel_mod
from worker_role.vm.cleanup import SweepReport, sweep, this_process
from worker_role.vm.conn import DEFAULT_URI, Connection, open_connection
from worker_role.vm.domain_xml import (
    NAME_PREFIX,
    Accel,
    DomainPlan,
    build_domain_xml,
    hard_limit_kib,
)
from worker_role.vm.interface import Image as Image
from worker_role.vm.interface import OutputChunk as OutputChunk
from worker_role.vm.interface import VmResult as VmResult
from worker_role.vm.paths import (
    DEFAULT_QEMU_USER,
    QemuUser,
    check_reachable,
    default_runtime_dir,
    make_vm_dir,
)
from worker_role.vm.running_vm import OUTPUT_TAIL_BYTES as OUTPUT_TAIL_BYTES
from worker_role.vm.running_vm import TASK_GRACE_S as TASK_GRACE_S
from worker_role.vm.running_vm import RunningVm as RunningVm
from worker_role.vm.task import (
    GuestCommand,
    task_archive,
)
from worker_role.vm.warm import SNAPSHOT_FORMAT, Slot, WarmKey, WarmPool
from worker_role.vm.warm_vm import build_snapshot, hand_over, restore, warm_plan

log = logging.getLogger("vmlend.worker.vm")
# A restored guest that neither starts its task nor reports within this long condemns its
# snapshot: else every task given that snapshot would wait out its boot allowance.
WARM_GRACE_S = 20.0
# Beyond the largest read-ahead a guest does on the task disk.
WARM_TASK_READAHEAD = 4 << 20


class VmBackend:
    """Creates capped VMs (a :class:`worker_role.vm.interface.Backend`). Get one from
    :func:`open_backend`."""

    def __init__(
        self,
        conn: Connection,
        *,
        runtime: Path,
        qemu_user: QemuUser,
        accel: accel_mod.AccelChoice,
        boot_allowance_s: float,
        out_mib: int,
        policy: LendingPolicy | None = None,
    ) -> None:
        self.conn = conn
        self.policy = policy
        self._running: dict[str, Caps] = {}
        self.runtime = runtime
        self.qemu_user = qemu_user
        self.accel = accel
        self.boot_allowance_s = boot_allowance_s
        self.out_mib = out_mib
        self.owner = this_process()
        self.warm: WarmPool | None = None
        """Warm snapshots to restore instead of booting; None boots every VM."""

    @property
    def problem(self) -> str | None:
        return self.conn.problem

    async def heal(self) -> None:
        try:
            await self.conn.ensure_open()
        except VmSetupError as e:
            log.info("libvirt still unreachable: %s", e)

    def unsupported(self, caps: Caps) -> dict[str, str]:
        """The caps ``caps`` needs that this machine cannot enforce, with the reason for each."""
        needed = {"memory_mib"}
        if caps.cpu_share < caps.vcpus:
            needed.add("cpu_share")
        if caps.disk_bps:
            needed.add("disk_bps")
        if caps.disk_iops:
            needed.add("disk_iops")
        if caps.network is NetworkMode.PROXY:
            needed.add("network")
        return {k: v for k, v in self.accel.unsupported.items() if k in needed}

    def check(self, caps: Caps) -> None:
        missing = self.unsupported(caps)
        if missing:
            raise CapUnsupportedError(missing)

    async def run(
        self,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        *,
        output: trio.MemorySendChannel[OutputChunk] | None = None,
    ) -> VmResult:
        async with self.start(image, task, caps, output=output) as vm:
            return await vm.wait()

    @contextlib.asynccontextmanager
    async def start(
        self,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        *,
        output: trio.MemorySendChannel[OutputChunk] | None = None,
        accel: Accel | None = None,
        enforce: bool = True,
    ) -> AsyncIterator[RunningVm]:
        """Start a VM for ``task``; leaving the block destroys it and deletes its files.

        ``accel`` and ``enforce=False`` are for the accelerator probe, which boots before the
        machine's enforceable caps are known.
        """
        key: WarmKey | str | None = None
        if enforce and accel is None and self.warm is not None:
            # In a thread: the first VM of an OS hashes its kernel and initrd (then cached).
            key = await trio.to_thread.run_sync(self.warm.key_for, image, caps)
        if enforce:
            # Policy first: a request beyond what the lender allows is refused before anything
            # is created. Checking and registering with no await between keeps it race-free.
            if self.policy is not None:
                self.policy.check(caps, list(self._running.values()))
            self.check(caps)
        for path, what in [(image.kernel, "kernel"), (image.initrd, "initrd")] + [
            (layer.path, "layer") for layer in image.layers
        ]:
            check_reachable(self.qemu_user, path, what=what)
        slot = self._warm_slot(key, image, caps)
        name = slot.name if slot is not None else f"{NAME_PREFIX}{secrets.token_hex(6)}"
        self._running[name] = caps
        failures: list[str] = []
        started: RunningVm | None = None
        try:
            async with self._start(
                name, image, task, caps, output, accel, enforce, slot, failures
            ) as vm:
                started = vm
                yield vm
        finally:
            del self._running[name]
            if slot is not None and self.warm is not None:
                if started is not None and not failures and _never_came_to_life(started):
                    failures.append(
                        f"a guest restored from it did nothing for {WARM_GRACE_S:.0f} s"
                    )
                self.warm.release(slot, failed=failures[0] if failures else None)

    def _warm_slot(self, key: WarmKey | str | None, image: Image, caps: Caps) -> Slot | None:
        if self.warm is None or key is None:
            return None
        if not isinstance(key, WarmKey):
            log.debug("a cold boot: %s", key)
            return None
        return self.warm.take(key, image, caps)

    def running(self) -> dict[str, Caps]:
        """The caps of every VM this backend is running, by domain name."""
        return dict(self._running)

    @contextlib.asynccontextmanager
    async def _start(
        self,
        name: str,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        output: trio.MemorySendChannel[OutputChunk] | None,
        accel: Accel | None,
        enforce: bool,
        slot: Slot | None,
        failures: list[str],
    ) -> AsyncIterator[RunningVm]:
        owner: dict[str, object] = {"pid": self.owner.pid, "started": self.owner.started}
        vm_dir = await trio.to_thread.run_sync(
            make_vm_dir, self.runtime, name, self.qemu_user, owner
        )
        try:
            async with one_error(), trio.open_nursery() as nursery:
                vm = RunningVm(self, name, vm_dir, task, trio.current_time())
                proxy_port = None
                if caps.network is NetworkMode.PROXY:
                    # Without a policy, whoever runs the backend is the lender (vmlend vm run).
                    lender = caps.net_allow if self.policy is None else self.policy.net_allow
                    vm.proxy = EgressProxy(caps.net_allow, caps.net_bps, lender=lender)
                    proxy_port = await nursery.start(vm.proxy.run)
                await self._prepare_disks(
                    vm_dir, image, task, caps, vm.end_token, warm=slot is not None
                )
                plan = self.plan_for(name, image, caps, vm_dir, accel=accel, proxy_port=proxy_port)
                created = False  # nothing to destroy (and no misleading error) before
                try:
                    if slot is not None:
                        created = True
                        try:
                            await self._restore(vm, slot, plan)
                        except VmError as e:
                            failures.append(str(e))
                            log.warning("warm start of %s failed (%s); booting it", name, e)
                            with trio.CancelScope(shield=True):
                                await self._destroy(name)
                            created = False
                    if not vm.warm:  # (a restored one runs its task, its memory limit set)
                        dom = await self.create(plan)
                        created = True
                        if enforce:
                            await self.limit_memory(dom, plan)
                    nursery.start_soon(self._pumps, vm, output)
                    yield vm
                finally:
                    if created:
                        with trio.CancelScope(shield=True):
                            await self._destroy(name)
                    if vm.control is not None:
                        await vm.control.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self.conn.unwatch(name)
                await trio.to_thread.run_sync(shutil.rmtree, vm_dir, True)

    async def create(self, plan: DomainPlan) -> Any:
        """Create and start ``plan``'s domain; libvirtd destroys it if our connection dies."""
        return await self.conn.call(
            f"create {plan.name}",
            self.conn.raw.createXML,
            build_domain_xml(plan),
            libvirt.VIR_DOMAIN_START_AUTODESTROY,
        )

    async def limit_memory(self, dom: Any, plan: DomainPlan) -> None:
        """Hold a running domain to its caps' host memory limit (set live: see domain_xml)."""
        await self.conn.call(
            f"memory hard limit of {plan.name}",
            dom.setMemoryParameters,
            {"hard_limit": hard_limit_kib(plan.caps, plan.accel)},
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )

    def plan_for(
        self,
        name: str,
        image: Image,
        caps: Caps,
        vm_dir: Path,
        *,
        accel: Accel | None = None,
        proxy_port: int | None = None,
    ) -> DomainPlan:
        """The plan of a VM booting ``image`` with its files in ``vm_dir``."""
        return DomainPlan(
            name=name,
            accel=accel or self.accel.accel,
            caps=caps,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            task_disk=vm_dir / "task.img",
            scratch_disk=vm_dir / "scratch.img",
            result_disk=vm_dir / "result.img",
            layers=image.layers,
            console_log=vm_dir / "console.log",
            stdout_socket=vm_dir / "stdout.sock",
            stderr_socket=vm_dir / "stderr.sock",
            owner=self.owner,
            proxy_port=proxy_port,
        )

    async def _restore(self, vm: RunningVm, slot: Slot, cold: DomainPlan) -> None:
        assert self.warm is not None
        plan = await trio.to_thread.run_sync(warm_plan, cold, slot, self.warm.spare_dir)
        assert plan.warm is not None
        await restore(self, slot, plan)
        task_bytes = len(task_archive(vm.task, cold.layers, network=False, end_token=vm.end_token))
        vm.control = await hand_over(plan.warm.control_socket, task_bytes)
        vm.warm = True

    async def build_snapshot(self, slot: Slot, image: Image, caps: Caps) -> None:
        """Build ``slot``'s snapshot (the warm pool's builder)."""
        await build_snapshot(self, slot, image, caps)

    async def _pumps(
        self, vm: RunningVm, output: trio.MemorySendChannel[OutputChunk] | None
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm._pump, "stdout", vm.dir / "stdout.sock", output)
            nursery.start_soon(vm._pump, "stderr", vm.dir / "stderr.sock", output)
        vm._readers_done.set()

    async def _prepare_disks(
        self,
        vm_dir: Path,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        end_token: bytes,
        *,
        warm: bool = False,
    ) -> None:
        archive = task_archive(
            task, image.layers, network=caps.network is NetworkMode.PROXY, end_token=end_token
        )

        def files() -> None:
            with (vm_dir / "task.img").open("wb") as f:
                f.write(archive)
                if warm:
                    # A restored guest believes the disk is DISK_CAPACITY long and reads the
                    # archive's length (given with the task): what it reads ahead past the
                    # archive must be zeros, not the end of the file.
                    f.truncate(len(archive) + WARM_TASK_READAHEAD)
            with (vm_dir / "scratch.img").open("wb") as f:
                f.truncate(caps.disk_mib * 1024 * 1024)
            with (vm_dir / "result.img").open("wb") as f:
                f.truncate(self.out_mib * 1024 * 1024)

        await trio.to_thread.run_sync(files)
        # No journal: the scratch disk dies with the VM, so crash consistency buys nothing.
        proc = await trio.run_process(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-b",
                "4096",
                "-O",
                "^has_journal",
                "-E",
                "nodiscard",
                str(vm_dir / "scratch.img"),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        if proc.returncode != 0:
            raise VmSetupError(f"mkfs.ext4 for the scratch disk failed: {proc.stderr.decode()}")

    async def _destroy(self, name: str) -> None:
        def destroy() -> None:
            try:
                self.conn.raw.lookupByName(name).destroy()
            except libvirt.libvirtError as e:
                # Already gone (it powered off, or was destroyed) is the goal reached.
                if e.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise VmError(f"destroy {name}: {e}") from e

        # Through the connection, which is reopened if libvirtd dropped it: a domain created
        # with AUTODESTROY on the lost one is gone already, and lookupByName says so.
        await self.conn.call(f"destroy {name}", destroy)

    async def _is_gone(self, name: str) -> bool:
        def gone() -> bool:
            try:
                return not self.conn.raw.lookupByName(name).isActive()
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return True
                raise VmError(f"state of {name}: {e}") from e

        return await trio.to_thread.run_sync(gone)

    async def sweep(self) -> SweepReport:
        """Remove domains and files left by crashed owners (never those of a live process)."""
        return await self.conn.call("sweep leftovers", sweep, self.conn.raw, self.runtime)

    async def our_domains(self) -> list[str]:
        def names() -> list[str]:
            return [d.name() for d in self.conn.raw.listAllDomains(0)]

        all_names = await self.conn.call("list domains", names)
        return [n for n in all_names if n.startswith(NAME_PREFIX)]


@contextlib.asynccontextmanager
async def open_backend(
    *,
    uri: str = DEFAULT_URI,
    runtime_dir: Path | None = None,
    qemu_user: str | None = DEFAULT_QEMU_USER,
    accel: Accel | None = None,
    boot_allowance_s: float = 60.0,
    out_mib: int = 64,
    refresh_probe: bool = False,
    policy: LendingPolicy | None = None,
    warm_dir: Path | None = None,
    warm_budget_mib: int = 0,
    warm_slots: int = 1,
) -> AsyncIterator[VmBackend]:
    """Connect to libvirt, sweep leftovers, settle the accelerator; yield the backend.

    ``accel`` forces an accelerator (skipping the probe); ``qemu_user`` is the user QEMU runs as
    (None for ``qemu:///session``); ``boot_allowance_s`` is added to each task's time limit for
    the host-side deadline (TCG boots take ~5 s idle, much more on a loaded host); ``policy``,
    when given, refuses (``PolicyViolation``) a VM that would take the running ones beyond it.
    ``warm_dir`` keeps warm snapshots (``warm_slots`` per guest shape, ``warm_budget_mib`` in
    all; 0 boots every VM): see :mod:`worker_role.vm.warm`. The files QEMU reads beside them go
    in the runtime directory.
    """
    runtime = runtime_dir or default_runtime_dir()
    user = QemuUser.lookup(qemu_user)
    await trio.to_thread.run_sync(_make_runtime, runtime)
    check_reachable(user, runtime, what="VM runtime directory")
    async with open_connection(uri) as conn:
        backend = VmBackend(
            conn,
            runtime=runtime,
            qemu_user=user,
            accel=accel_mod.AccelChoice.forced(accel or Accel.TCG),
            boot_allowance_s=boot_allowance_s,
            out_mib=out_mib,
            policy=policy,
        )
        report = await backend.sweep()
        if report.destroyed or report.removed_dirs:
            log.info("swept leftovers: %s", report)
        if accel is None:
            backend.accel = await accel_mod.choose(backend, refresh=refresh_probe)
        if warm_dir is None or warm_budget_mib <= 0:
            yield backend
            return
        pool = WarmPool(
            warm_dir,
            spare_dir=runtime / "warm-spare",
            budget_bytes=warm_budget_mib << 20,
            slots_per_shape=warm_slots,
            platform=await _platform(conn, backend.accel.accel),
        )
        await pool.open()
        backend.warm = pool
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run, backend.build_snapshot, lambda: not backend.running())
            try:
                yield backend
            finally:
                backend.warm = None
                nursery.cancel_scope.cancel()


def _never_came_to_life(vm: RunningVm) -> bool:
    alive = vm.task_started or vm.guest_done.is_set()
    return vm.warm and not alive and trio.current_time() - vm.started_at > WARM_GRACE_S


async def _platform(conn: Connection, accel: Accel) -> str:
    """What a snapshot depends on besides its OS: QEMU's binary, libvirt, the accelerator."""

    def versions() -> str:
        qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        try:
            st = Path(qemu).stat()
            binary = f"{qemu}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            binary = qemu
        return f"{binary}:{conn.raw.getVersion()}:{conn.raw.getLibVersion()}"

    text = await conn.call("versions", versions)
    return hashlib.sha256(f"{SNAPSHOT_FORMAT}:{accel.value}:{text}".encode()).hexdigest()[:32]


def _make_runtime(runtime: Path) -> None:
    try:
        runtime.mkdir(parents=True, exist_ok=True)
        runtime.chmod(0o755)
    except OSError as e:
        raise VmSetupError(f"cannot create the VM runtime directory {runtime}: {e}") from e
