"""An in-memory VM backend and lease blobs for the worker agent's tests.

:class:`FakeBackend` satisfies :class:`worker_role.vm.interface.Backend` (its ``open`` is a
:class:`BackendFactory`): each VM it starts runs until the test finishes or fails it, or returns
``result`` at once when one is set. It applies the lending policy it is opened with, as the libvirt
backend does, and records every VM, destroyed or not, with what it was asked to run.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import blake3
import trio

from catalog.caps import Caps
from catalog.dispatch import LeaseGrant
from catalog.manifest import ImageManifest
from worker_role.errors import VmError, WorkerError
from worker_role.policy import LendingPolicy
from worker_role.vm.interface import Image, OutputChunk, VmResult
from worker_role.vm.task import GuestCommand

IMAGE = Image(kernel=Path("/fake/vmlinuz"), initrd=Path("/fake/initrd"), cmdline="console=ttyS0")
FAKE_IMAGE_BYTES = 64 << 20  # what the fake fetch says the image holds


def manifest(
    *, command: Sequence[str] = ("sh", "-c", "echo hi"), timeout_s: int = 3600
) -> ImageManifest:
    return ImageManifest(
        os="tiny", os_version="1", kernel="a" * 64, initramfs="b" * 64, cmdline="console=ttyS0",
        layers=(), caps=Caps(), command=tuple(command), env=(("LANG", "C"),), cwd="/work",
        timeout_s=timeout_s,
    )  # fmt: skip


def vm_result(
    *, exit_code: int = 0, stdout: bytes = b"", stderr: bytes = b"", out_tar: bytes | None = None
) -> VmResult:
    return VmResult(
        exit_code=exit_code, timed_out=False, stdout=stdout, stderr=stderr, out_tar=out_tar,
        console_tail=(), elapsed_s=1.0, egress=None,
    )  # fmt: skip


class Changes:
    """Lets a test wait, without sleeping, until a fake's state satisfies a condition."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()


class FakeVm:
    def __init__(self, name: str, image: Image, task: GuestCommand, caps: Caps) -> None:
        self.name = name
        self.image = image
        self.task = task
        self.caps = caps
        self.started_at = trio.current_time()
        self.destroyed = False
        self.warm = False
        self._done = trio.Event()
        self._outcome: VmResult | VmError | None = None

    def finish(self, result: VmResult) -> None:
        self._outcome = result
        self._done.set()

    def fail(self, error: VmError) -> None:
        self._outcome = error
        self._done.set()

    async def wait(self) -> VmResult:
        await self._done.wait()
        if isinstance(self._outcome, VmError):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


class FakeBackend:
    def __init__(
        self,
        *,
        result: VmResult | None = None,
        output: Sequence[OutputChunk] = (),
        open_error: WorkerError | None = None,
        teardown_s: float = 0.0,
        teardown_error: VmError | OSError | None = None,
    ) -> None:
        """``result``: every VM returns it at once; ``output``: what every VM prints first;
        ``open_error``: opening fails with it (a machine that cannot run VMs); ``teardown_s``:
        how long (virtual) destroying a VM takes; ``teardown_error``: destroying one fails so."""
        self.teardown_s = teardown_s
        self.teardown_error = teardown_error
        self.vms: list[FakeVm] = []
        self.policy: LendingPolicy | None = None
        self.runtime_dir: Path | None = None
        self.changes = Changes()
        self._result = result
        self._output = tuple(output)
        self._open_error = open_error
        self.problem: str | None = None  # why VMs cannot run now (a test sets it)
        self.start_error: VmError | None = None  # every start fails with it, before a VM
        self.heals = 0
        self.healed: str | None = None  # what problem is once healed (None: healthy)

    async def heal(self) -> None:
        await trio.lowlevel.checkpoint()
        self.heals += 1
        self.problem = self.healed
        self.changes.changed()

    @property
    def running(self) -> list[FakeVm]:
        return [vm for vm in self.vms if not vm.destroyed]

    @asynccontextmanager
    async def open(self, *, runtime_dir: Path, policy: LendingPolicy) -> AsyncIterator[FakeBackend]:
        if self._open_error is not None:
            raise self._open_error
        self.runtime_dir, self.policy = runtime_dir, policy
        yield self

    @asynccontextmanager
    async def start(
        self,
        image: Image,
        task: GuestCommand,
        caps: Caps,
        *,
        output: trio.MemorySendChannel[OutputChunk] | None = None,
    ) -> AsyncIterator[FakeVm]:
        if self.policy is not None:
            self.policy.check(caps, [vm.caps for vm in self.running])
        if self.start_error is not None:
            raise self.start_error
        vm = FakeVm(f"fake-{len(self.vms)}", image, task, caps)
        self.vms.append(vm)
        self.changes.changed()
        try:
            for chunk in self._output:
                if output is not None:
                    await output.send(chunk)
            if self._result is not None:
                vm.finish(self._result)
            yield vm
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(self.teardown_s)
            vm.destroyed = True
            self.changes.changed()
            if self.teardown_error is not None:
                raise self.teardown_error


class FakeLeaseBlobs:
    """Every grant's image is :data:`IMAGE` with ``manifest`` and takes ``fetch_s`` (virtual)
    seconds to fetch; published bytes stay in memory."""

    def __init__(self, manifest: ImageManifest, *, fetch_s: float = 0.0) -> None:
        self.manifest = manifest
        self.grants: list[LeaseGrant] = []  # every grant whose image was asked for, in order
        self.published: dict[bytes, bytes] = {}
        self._fetch_s = fetch_s
        self._images: set[bytes] = set()

    @property
    def images(self) -> frozenset[bytes]:
        return frozenset(self._images)

    async def image(
        self, grant: LeaseGrant, addrs: list[str], fetched: Callable[[int], None] = lambda n: None
    ) -> tuple[Image, ImageManifest]:
        self.grants.append(grant)
        for n in range(1, 5):  # the image arrives in four parts over the fetch time
            await trio.sleep(self._fetch_s / 4)
            fetched(n * FAKE_IMAGE_BYTES // 4)
        self._images.add(grant.image_id)
        return IMAGE, self.manifest

    async def publish(self, data: bytes) -> bytes:
        await trio.lowlevel.checkpoint()
        blob = blake3.blake3(data).digest()
        self.published[blob] = data
        return blob
