"""Assembled images booted through the VM backend: the tiny example, and debian-12 + python3
from Debian's archive.

The first run on a machine builds debian-12 (mmdebstrap, ~1-2 min) into the shared build cache;
later runs reuse it. The VM boots the blobs exported from the chunk store, not the cache's files,
so what runs is exactly what the manifest names.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from catalog.blob import BlobStore
from catalog.build import (
    AssembledImage,
    Assembler,
    BootFiles,
    BuildCache,
    os_draft,
    package_draft,
)
from catalog.build.os_debian import build_debian, installed_packages
from catalog.build.packages import build_debian_packages
from catalog.chunk_store import ChunkStore
from catalog.errors import PackageError
from catalog.manifest import materialize
from catalog.taskfile import load, loads
from node.identity import Identity
from tests.catalog_build.conftest import write_task
from worker_role.errors import GuestFailedError
from worker_role.vm import GuestCommand, Image, Layer, VmResult, open_backend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
BOOT_ALLOWANCE_S = 90.0


async def boot_image(image: AssembledImage, blobs: BlobStore, into: Path) -> VmResult:
    m = image.manifest
    paths = await materialize(m, blobs, into)
    vm_image = Image(
        kernel=paths.kernel,
        initrd=paths.initrd,
        cmdline=paths.cmdline,
        layers=tuple(Layer(p) for p in paths.layers),
    )
    task = GuestCommand(argv=m.command, env=dict(m.env), cwd=m.cwd, timeout_s=m.timeout_s)
    async with open_backend(boot_allowance_s=BOOT_ALLOWANCE_S) as backend:
        try:
            return await backend.run(vm_image, task, m.caps)
        except GuestFailedError as e:
            pytest.fail(f"{e}\n" + "\n".join(e.console_tail))


@pytest.mark.vm
async def test_debian_python3_image_runs_a_python_one_liner(
    tmp_path: Path, boot: BootFiles, shared_cache: BuildCache, vm_files: Path
) -> None:
    path = write_task(
        tmp_path / "task",
        """
name = "py-one-liner"
os = "debian-12"
packages = ["python3"]
command = 'python3 -c "print(6*7)"'
[limits]
max_runtime = "2m"
""",
    )
    async with ChunkStore.open(tmp_path / "chunks") as store:
        blobs = BlobStore(store)
        image = await Assembler(shared_cache, blobs, boot).assemble(load(path))
        assert [x.what for x in image.layers] == ["packages python3", "os debian-12"]
        result = await boot_image(image, blobs, vm_files)
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"42\n", b""), result


@pytest.mark.vm
async def test_tiny_example_boots(tmp_path: Path, boot: BootFiles, vm_files: Path) -> None:
    async with ChunkStore.open(tmp_path / "chunks") as store:
        blobs = BlobStore(store)
        image = await Assembler(BuildCache(tmp_path / "cache"), blobs, boot).assemble(
            load(EXAMPLES / "hello.toml")
        )
        result = await boot_image(image, blobs, vm_files)
    assert (result.exit_code, result.stdout) == (0, b"hello from x86_64\n"), result


@pytest.mark.vm
async def test_python_example_with_task_files_runs(
    tmp_path: Path, boot: BootFiles, shared_cache: BuildCache, vm_files: Path
) -> None:
    async with ChunkStore.open(tmp_path / "chunks") as store:
        blobs = BlobStore(store)
        image = await Assembler(shared_cache, blobs, boot).assemble(load(EXAMPLES / "python.toml"))
        result = await boot_image(image, blobs, vm_files)
    assert result.exit_code == 0, result
    assert result.stdout.startswith(b"hello from python 3.11"), result
    assert result.stdout.endswith(b": 42\n")


async def test_python3_layer_holds_only_what_debian_12_lacks(
    tmp_path: Path, boot: BootFiles, shared_cache: BuildCache
) -> None:
    os_build = await build_debian(shared_cache, boot)
    in_os = installed_packages(os_build.dpkg_status)  # type: ignore[arg-type]
    assert {"libc6", "dash", "coreutils", "apt"} <= set(in_os)
    assert os_build.meta["packages"] == in_os  # exact versions recorded for the entry
    async with ChunkStore.open(tmp_path / "chunks") as store:
        image = await Assembler(shared_cache, BlobStore(store), boot).assemble(
            loads('name="p"\nos="debian-12"\npackages=["python3"]\ncommand="python3"\n')
        )
    layer = image.layers[0]
    added = layer.meta["packages"]
    assert {"python3", "python3.11", "libpython3.11-stdlib"} <= set(added)
    assert not set(added) & set(in_os)  # nothing the OS already has is repeated
    # Both fit in signed catalog entries, exact versions and all.
    m = image.manifest
    me = Identity.generate()
    os_entry = os_draft(os_build, kernel=m.kernel, initrd=m.initramfs, root=m.layers[-1].blob)
    assert os_entry.sign(me, now=0).meta["packages"] == in_os
    pkg_entry = package_draft(layer, ["python3"], blob=m.layers[0].blob).sign(me, now=0)
    assert pkg_entry.meta["packages"] == added


async def test_package_errors_on_debian(
    tmp_path: Path, boot: BootFiles, shared_cache: BuildCache
) -> None:
    async with ChunkStore.open(tmp_path / "chunks") as store:
        assembler = Assembler(shared_cache, BlobStore(store), boot)
        with pytest.raises(PackageError, match="not in the debian-12 archive"):
            await assembler.assemble(
                loads('name="p"\nos="debian-12"\npackages=["no-such-package-zz"]\ncommand="x"\n')
            )
        # An OS whose libc6 is older than python3 needs: python3 does not fit it.
        os_build = await assembler.build_os("debian-12")
        status = tmp_path / "status"
        stanzas = os_build.dpkg_status.read_text().split("\n\n")  # type: ignore[union-attr]
        status.write_text(
            "\n\n".join(
                re.sub(r"(?m)^Version: .*$", "Version: 2.0-1", s)
                if s.startswith("Package: libc6\n")
                else s
                for s in stanzas
            )
        )
        old = dataclasses.replace(os_build, dpkg_status=status, key="old-libc")
        with pytest.raises(PackageError, match="does not fit"):
            await build_debian_packages(shared_cache, old, ["python3"])


@pytest.mark.skipif(
    not os.environ.get("VMLEND_SLOW_TESTS"),
    reason="rebuilds debian-12 from scratch (~2 min); set VMLEND_SLOW_TESTS=1",
)
async def test_debian_12_and_python3_layers_are_reproducible(
    tmp_path: Path, boot: BootFiles, shared_cache: BuildCache
) -> None:
    shared = await build_debian(shared_cache, boot)
    fresh_cache = BuildCache(tmp_path / "cache")
    fresh = await build_debian(fresh_cache, boot)
    assert fresh.key == shared.key
    assert not fresh.root.reused
    assert fresh.root.path.read_bytes() == shared.root.path.read_bytes()
    python = await build_debian_packages(shared_cache, shared, ["python3"])
    again = await build_debian_packages(fresh_cache, fresh, ["python3"])
    assert not again.reused
    assert again.path.read_bytes() == python.path.read_bytes()
