"""The OS library's common shape, and its smallest member: ``tiny``.

An OS is a kernel, an initramfs holding our guest init (both from the VM backend's tiny OS
build, ``python -m worker_role.tinyos build``) and a read-only root layer. Every OS boots the
same kernel and init: the init mounts the layers, so an OS differs only in its root layer. For
``tiny`` that layer is busybox alone.

``catalog`` does not import ``worker_role`` (DESIGN.md: roles import catalog, not the reverse),
so the kernel and initramfs come in as a :class:`BootFiles`; ``worker_role.tinyos.TinyOs`` is one
(``worker_role.tinyos.locate()`` finds the built one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from catalog.build.cache import BuildCache, BuiltLayer
from catalog.build.tools import digest, squash, tree_digest
from catalog.errors import BuildError

RECIPE = "tiny-os/1"
BUSYBOX = Path("/bin/busybox")


class BootFiles(Protocol):
    """A kernel and an initramfs with the guest init (``worker_role.tinyos.TinyOs``)."""

    @property
    def ident(self) -> str: ...
    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def cmdline(self) -> str: ...
    @property
    def kernel_release(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class OsBuild:
    """An OS as the image assembler uses it, and the content of its ``os`` catalog entry."""

    name: str
    version: str
    key: str
    """Hash of every input of the OS; package layers built on it are keyed by it."""
    kernel: Path
    initrd: Path
    cmdline: str
    root: BuiltLayer
    dpkg_status: Path | None = None
    """Its dpkg database, against which package layers are resolved; None without dpkg."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """For the entry: no floats (entries refuse them), only what says what is inside."""


def boot_meta(boot: BootFiles) -> dict[str, Any]:
    return {
        "kernel_release": boot.kernel_release,
        "boot_ident": boot.ident,
        "cmdline": boot.cmdline,
    }


async def build_tiny(cache: BuildCache, boot: BootFiles) -> OsBuild:
    """The tiny OS: the given kernel and init, and a root layer of busybox."""
    try:
        busybox = await trio.Path(BUSYBOX).read_bytes()
    except OSError as e:
        raise BuildError(f"cannot read {BUSYBOX} (is busybox-static installed?): {e}") from e
    staging = cache.staging("tiny")
    try:
        tree = staging / "root"
        for d in ("bin", "etc", "root", "tmp", "out", "task"):
            (tree / d).mkdir(parents=True)
        (tree / "bin/busybox").write_bytes(busybox)
        (tree / "bin/busybox").chmod(0o755)
        (tree / "bin/sh").symlink_to("busybox")
        key = digest(RECIPE, tree_digest(tree))
        layer = cache.layer(key)
        if layer is None:
            await squash(tree, staging / "root.sqfs", all_root=True)
            layer = cache.add_layer(key, staging / "root.sqfs", "os tiny", {"busybox": True})
    finally:
        cache.discard(staging)
    return OsBuild(
        name="tiny",
        version=boot.ident,
        key=digest(RECIPE, key, boot.ident),
        kernel=boot.kernel,
        initrd=boot.initrd,
        cmdline=boot.cmdline,
        root=layer,
        meta={**boot_meta(boot), "root": "busybox"},
    )
