"""The VM backend: one capped libvirt domain per task, driven from trio.

``open_backend()`` connects, removes what a crashed run left, and settles the accelerator (probing
by booting, cached). ``VmBackend.start()`` is an async context manager owning one VM: it prepares
the VM's files, creates the domain, streams the guest's stdout/stderr, and on exit destroys the
domain and deletes every file, whatever happened inside. ``RunningVm.wait()`` returns the result or
raises :class:`GuestFailedError` with the console's last lines.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import libvirt
import trio

from catalog.caps import Caps, NetworkMode
from node.supervise import one_error
from worker_role.egress_proxy import EgressProxy
from worker_role.errors import (
    CapUnsupportedError,
    GuestFailedError,
    GuestTimeoutError,
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
from worker_role.vm.task import (
    END_MARKER_PREFIX,
    GuestCommand,
    GuestResult,
    read_result,
    task_archive,
)

log = logging.getLogger("vmlend.worker.vm")
OUTPUT_TAIL_BYTES = 1 << 20
CONSOLE_TAIL_LINES = 40
# After the domain stops, QEMU has closed the sockets; what is left to read is already buffered.
_DRAIN_SECONDS = 5.0
# What the guest's init prints on the console as it starts the task (worker_role/guest/init.sh).
TASK_STARTED = b"vmlend-init: starting task"
TASK_START_POLL_S = 0.25
# Past the time limit, counted from the task's start: for the guest to write its result.
TASK_GRACE_S = 10.0
_CONSOLE_READ = 64 * 1024
_CONSOLE_TAIL_BYTES = 64 * 1024


class RunningVm:
    """A started VM, valid inside ``VmBackend.start()``."""

    def __init__(
        self, backend: VmBackend, name: str, vm_dir: Path, task: GuestCommand, started: float
    ) -> None:
        self.name = name
        self.dir = vm_dir
        self.task = task
        self.started_at = started
        self.deadline = started + task.timeout_s + backend.boot_allowance_s
        self.stopped = backend.conn.watch(name)
        self.proxy: EgressProxy | None = None
        self._backend = backend
        self._tails = {"stdout": bytearray(), "stderr": bytearray()}
        self._readers_done = trio.Event()
        # The guest ends each output stream with this marker once the result is on its disk, so
        # the result is known without waiting ~1.3 s for libvirt to stop the domain.
        self.end_token = secrets.token_hex(16).encode()
        self.end_marker = END_MARKER_PREFIX + self.end_token
        self._ended: set[str] = set()
        self.guest_done = trio.Event()

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> list[str]:
        """The console's last ``lines`` lines, read from its last ``_CONSOLE_TAIL_BYTES`` only:
        the guest writes the console file, as much as it likes."""
        try:
            with self.console_log.open("rb") as f:
                f.seek(max(0, f.seek(0, 2) - _CONSOLE_TAIL_BYTES))
                text = f.read(_CONSOLE_TAIL_BYTES).decode(errors="replace")
        except OSError:
            return []
        return [line.rstrip("\r") for line in text.splitlines()[-lines:]]

    async def _count_from_the_task_start(self, limit: trio.CancelScope) -> None:
        seen = b""
        offset = 0
        while TASK_STARTED not in seen:
            await trio.sleep(TASK_START_POLL_S)
            more = await trio.to_thread.run_sync(_read_from, self.console_log, offset)
            offset += len(more)
            seen = seen[-len(TASK_STARTED) :] + more  # the marker may straddle two reads
        started = trio.current_time()
        limit.deadline = min(limit.deadline, started + self.task.timeout_s + TASK_GRACE_S)
        self.deadline = limit.deadline

    def qemu_pid(self) -> int:
        """The QEMU process's pid (libvirt's pid file), for measuring what the VM costs the host."""
        path = Path("/run/libvirt/qemu") / f"{self.name}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError) as e:
            raise VmError(f"no QEMU pid for {self.name} in {path}: {e}") from e

    async def wait(self) -> VmResult:
        """Wait for the guest to finish (up to its deadline) and read its result.

        Until the guest says on its console that the task started, the deadline allows for the
        boot; from then on the host counts the time limit itself (plus a little grace for the
        result), so a task that kills the guest's own watchdog gains nothing."""
        with trio.move_on_at(self.deadline) as limit:
            async with trio.open_nursery() as nursery:
                for event in (self.stopped, self.guest_done):
                    nursery.start_soon(_cancel_when_set, event, nursery.cancel_scope)
                nursery.start_soon(self._count_from_the_task_start, limit)
        if not (self.stopped.is_set() or self.guest_done.is_set()):
            tail = await trio.to_thread.run_sync(self.console_tail)
            await self.destroy()
            raise GuestTimeoutError(
                f"guest {self.name} gave no result within {self.deadline - self.started_at:.0f} s "
                f"(time limit {self.task.timeout_s} s, counted from the task's start once the "
                "guest started it, from the boot with an allowance before)",
                console_tail=tail,
            )
        if not self.guest_done.is_set():
            with trio.move_on_after(_DRAIN_SECONDS):
                await self._readers_done.wait()
        result = await trio.to_thread.run_sync(read_result, self.dir / "result.img")
        tail = await trio.to_thread.run_sync(self.console_tail)
        if result is None:
            raise GuestFailedError(f"guest {self.name} ended without a result", console_tail=tail)
        return self._result(result, tail)

    def _result(self, r: GuestResult, tail: list[str]) -> VmResult:
        stderr = bytes(self._tails["stderr"])
        if r.out_tar is None:
            # The guest could not write /out whole: say so where the owner looks, never drop it
            # silently (the note keeps stderr within what a worker may report).
            note = (
                f"\nvmlend: /out did not fit on the {self._backend.out_mib} MiB result disk "
                "and was not kept\n"
            ).encode()
            stderr = stderr[max(0, len(stderr) + len(note) - OUTPUT_TAIL_BYTES) :] + note
        return VmResult(
            exit_code=r.exit_code,
            timed_out=r.timed_out,
            stdout=bytes(self._tails["stdout"]),
            stderr=stderr,
            out_tar=r.out_tar,
            console_tail=tuple(tail),
            elapsed_s=trio.current_time() - self.started_at,
            egress=self.proxy.statistics() if self.proxy else None,
        )

    async def destroy(self) -> None:
        """Stop the guest now (idempotent)."""
        await self._backend._destroy(self.name)

    async def _pump(
        self, stream: str, path: Path, output: trio.MemorySendChannel[OutputChunk] | None
    ) -> None:
        tail = self._tails[stream]
        pending = bytearray()

        async def emit(data: bytes) -> None:
            nonlocal output
            if not data:
                return
            tail.extend(data)
            del tail[:-OUTPUT_TAIL_BYTES]
            if output is not None:
                try:
                    await output.send((stream, data))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    output = None  # the consumer left; keep collecting the tail

        try:
            sock = await trio.open_unix_socket(str(path))
        except OSError as e:
            # A guest that wrote nothing can power off before we connect (its writes would block
            # until we do): then QEMU and its socket are gone, and there is simply no output.
            if await self._backend._is_gone(self.name):
                return
            raise VmError(f"cannot connect to the guest's {stream} at {path}: {e}") from e
        async with sock:
            while True:
                try:
                    data = await sock.receive_some(65536)
                except trio.BrokenResourceError:
                    break  # QEMU went away: the domain ended
                if not data:
                    break
                pending += data
                end = pending.find(self.end_marker)
                if end >= 0:
                    await emit(bytes(pending[:end]))
                    self._ended.add(stream)
                    if self._ended == {"stdout", "stderr"}:
                        self.guest_done.set()
                    return
                # Hold back only a tail that could be the start of a marker split across reads;
                # the marker starts with NUL ESC, so live text output is never held.
                cut = len(pending) - _marker_prefix_at_end(pending, self.end_marker)
                await emit(bytes(pending[:cut]))
                del pending[:cut]
        await emit(bytes(pending))


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
        self._owner = this_process()

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
        name = f"{NAME_PREFIX}{secrets.token_hex(6)}"
        self._running[name] = caps
        try:
            async with self._start(name, image, task, caps, output, accel, enforce) as vm:
                yield vm
        finally:
            del self._running[name]

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
    ) -> AsyncIterator[RunningVm]:
        owner: dict[str, object] = {"pid": self._owner.pid, "started": self._owner.started}
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
                await self._prepare_disks(vm_dir, image, task, caps, vm.end_token)
                plan = DomainPlan(
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
                    owner=self._owner,
                    proxy_port=proxy_port,
                )
                created = False  # nothing to destroy (and no misleading error) before
                try:
                    # AUTODESTROY: libvirtd destroys the domain if our connection dies with us.
                    dom = await self.conn.call(
                        f"create {name}",
                        self.conn.raw.createXML,
                        build_domain_xml(plan),
                        libvirt.VIR_DOMAIN_START_AUTODESTROY,
                    )
                    created = True
                    if enforce:
                        await self.conn.call(
                            f"memory hard limit of {name}",
                            dom.setMemoryParameters,
                            {"hard_limit": hard_limit_kib(caps, plan.accel)},
                            libvirt.VIR_DOMAIN_AFFECT_LIVE,
                        )
                    nursery.start_soon(self._pumps, vm, output)
                    yield vm
                finally:
                    if created:
                        with trio.CancelScope(shield=True):
                            await self._destroy(name)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                self.conn.unwatch(name)
                await trio.to_thread.run_sync(shutil.rmtree, vm_dir, True)

    async def _pumps(
        self, vm: RunningVm, output: trio.MemorySendChannel[OutputChunk] | None
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vm._pump, "stdout", vm.dir / "stdout.sock", output)
            nursery.start_soon(vm._pump, "stderr", vm.dir / "stderr.sock", output)
        vm._readers_done.set()

    async def _prepare_disks(
        self, vm_dir: Path, image: Image, task: GuestCommand, caps: Caps, end_token: bytes
    ) -> None:
        archive = task_archive(
            task, image.layers, network=caps.network is NetworkMode.PROXY, end_token=end_token
        )

        def files() -> None:
            (vm_dir / "task.img").write_bytes(archive)
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


def _marker_prefix_at_end(data: bytearray, marker: bytes) -> int:
    """The length of the longest tail of ``data`` that is a proper prefix of ``marker``."""
    start = data.find(marker[:1], max(0, len(data) - len(marker) + 1))
    while start >= 0:
        if marker.startswith(data[start:]):
            return len(data) - start
        start = data.find(marker[:1], start + 1)
    return 0


def _read_from(path: Path, offset: int) -> bytes:
    """At most ``_CONSOLE_READ`` bytes of ``path`` from ``offset`` (none yet if it is missing)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(_CONSOLE_READ)
    except FileNotFoundError:
        return b""


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


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
) -> AsyncIterator[VmBackend]:
    """Connect to libvirt, sweep leftovers, settle the accelerator; yield the backend.

    ``accel`` forces an accelerator (skipping the probe); ``qemu_user`` is the user QEMU runs as
    (None for ``qemu:///session``); ``boot_allowance_s`` is added to each task's time limit for
    the host-side deadline (TCG boots take ~5 s idle, much more on a loaded host); ``policy``,
    when given, refuses (``PolicyViolation``) a VM that would take the running ones beyond it.
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
        yield backend


def _make_runtime(runtime: Path) -> None:
    try:
        runtime.mkdir(parents=True, exist_ok=True)
        runtime.chmod(0o755)
    except OSError as e:
        raise VmSetupError(f"cannot create the VM runtime directory {runtime}: {e}") from e
