"""Fixtures for tests that boot real VMs: ``vms`` owns every VM a test starts.

Every VM started through ``vms`` is destroyed when the test ends, pass or fail, and its files are
gone; the fixture then checks libvirt holds none of them. The console log of each VM is kept and
printed in the report of a failed test (the VM's own files are deleted with it).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog.caps import Caps
from worker_role.vm import (
    GuestCommand,
    Image,
    Layer,
    LayerFormat,
    RunningVm,
    VmBackend,
    VmResult,
    open_backend,
)
from worker_role.vm.backend import OutputChunk

# Under TCG on 2 busy cores a boot takes 4-10 s; the host deadline is the time limit plus this.
BOOT_ALLOWANCE_S = 60.0
# Layers must be readable by QEMU's user: not under pytest's 0700 tmp dirs.
LAYER_DIR = Path("/var/lib/vmlend/test-layers")


class VmFactory:
    """Starts VMs for one test and owns them: whatever the test does, they are destroyed.

    ``start`` is an async context manager (VMs hold a nursery, so their lifetime must nest with
    the test's own nurseries); the fixture's teardown destroys any VM a test left running anyway.
    """

    def __init__(self, backend: VmBackend, node: Any) -> None:
        self.backend = backend
        self._node = node
        self.names: list[str] = []

    @contextlib.asynccontextmanager
    async def start(
        self,
        task: GuestCommand,
        caps: Caps | None = None,
        *,
        layers: tuple[Layer, ...] = (),
        output: Any = None,
    ) -> AsyncIterator[RunningVm]:
        image = Image.tiny(layers)
        async with self.backend.start(image, task, caps or Caps(), output=output) as vm:
            self.names.append(vm.name)
            try:
                yield vm
            finally:
                try:
                    text = vm.console_log.read_text(errors="replace")
                except OSError as e:
                    text = f"(no console log: {e})"
                self._node.vmlend_consoles.append((vm.name, text))

    async def run(self, task: GuestCommand, caps: Caps | None = None, **kw: Any) -> VmResult:
        async with self.start(task, caps, **kw) as vm:
            return await vm.wait()


@pytest.fixture
async def vms(request: pytest.FixtureRequest) -> AsyncIterator[VmFactory]:
    request.node.vmlend_consoles = []
    async with open_backend(boot_allowance_s=BOOT_ALLOWANCE_S) as backend:
        factory = VmFactory(backend, request.node)
        try:
            yield factory
        finally:
            with trio.CancelScope(shield=True):
                for name in factory.names:
                    await backend._destroy(name)
        # Everything the test started is gone: no domain, no directory.
        left = set(await backend.our_domains()) & set(factory.names)
        assert not left, f"domains left behind: {left}"
        dirs = [n for n in factory.names if (backend.runtime / n).exists()]
        assert not dirs, f"VM directories left behind: {dirs}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    consoles = getattr(item, "vmlend_consoles", None)
    if report.failed and consoles and not getattr(item, "vmlend_consoles_shown", False):
        item.vmlend_consoles_shown = True  # type: ignore[attr-defined]
        for name, text in consoles:
            report.sections.append((f"console of {name}", text[-8000:]))


@pytest.fixture
def squashfs_layer() -> Iterator[Layer]:
    """A read-only layer holding /layer/hello.txt and /etc/motd."""
    LAYER_DIR.mkdir(parents=True, exist_ok=True)
    LAYER_DIR.chmod(0o755)
    src = LAYER_DIR / f"src-{uuid.uuid4().hex}"
    (src / "layer").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "layer/hello.txt").write_text("hello from a layer\n")
    (src / "etc/motd").write_text("layer motd\n")
    image = LAYER_DIR / f"{src.name}.sqfs"
    subprocess.run(
        ["mksquashfs", str(src), str(image), "-quiet", "-noappend", "-all-root"],
        check=True,
        capture_output=True,
    )
    image.chmod(0o644)
    shutil.rmtree(src)
    try:
        yield Layer(image)
    finally:
        image.unlink(missing_ok=True)


@pytest.fixture
def erofs_layer() -> Iterator[Layer]:
    """A read-only erofs layer holding /lower/e.txt and an /etc/motd meant to be shadowed."""
    LAYER_DIR.mkdir(parents=True, exist_ok=True)
    src = LAYER_DIR / f"src-{uuid.uuid4().hex}"
    (src / "lower").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "lower/e.txt").write_text("hello from erofs\n")
    (src / "etc/motd").write_text("shadowed motd\n")
    image = LAYER_DIR / f"{src.name}.erofs"
    subprocess.run(
        ["mkfs.erofs", "--all-root", "-T0", str(image), str(src)], check=True, capture_output=True
    )
    image.chmod(0o644)
    shutil.rmtree(src)
    try:
        yield Layer(image, LayerFormat.EROFS)
    finally:
        image.unlink(missing_ok=True)


async def collect(receive: Any, into: dict[str, bytearray]) -> None:
    async with receive:
        async for stream, data in receive:
            into[stream] += data


__all__ = ["OutputChunk", "collect"]
