"""Image assembly (DESIGN.md step 4): OS + package layers + task layer -> an image manifest.

:meth:`Assembler.assemble` builds (or finds in the cache) each part, adds every file to the chunk
store as a blob, and returns the :class:`~catalog.manifest.ImageManifest`, whose ID is the
hash of its canonical bytes. The same task file gives the same ID wherever it is built: every
part is a reproducible function of its inputs, and nothing about the building machine (paths,
times, owners of the task's files) enters a layer or the manifest.

Reuse happens at two levels. Each layer is cached under the hash of its inputs, so a task that
changes only its command reuses every layer. And a whole image is cached under the hash of all
the task's inputs (including the state of the OS archive's index), so building an unchanged task
again costs no resolution and no squashing at all.

Layer order, top first: the task's files (``/task``), then local package directories (the last
listed highest), then the Debian packages (one layer), then the OS root.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from catalog.blob import BlobStore, parse_blob_id
from catalog.blob_fetch import is_complete
from catalog.build import os_debian
from catalog.build.cache import BuildCache, BuiltLayer
from catalog.build.os_tiny import BootFiles, OsBuild, build_tiny
from catalog.build.packages import build_debian_packages, build_directory
from catalog.build.tools import (
    digest,
    normalize_modes,
    read_json,
    squash,
    tree_digest,
    write_json,
)
from catalog.caps import Caps, NetworkMode
from catalog.errors import BuildError, ImageManifestError, TaskInputError
from catalog.manifest import ImageManifest, LayerRef
from catalog.taskfile import TASK_DIR, TASK_LIMITS, TaskFile

RECIPE = "image/2"
TASK_RECIPE = "task-layer/1"


@dataclass(frozen=True, slots=True)
class AssembledImage:
    manifest: ImageManifest
    image_id: str
    manifest_blob: str
    """Blob ID (hex) of the manifest's bytes in the chunk store, for the ``image`` entry."""
    layers: tuple[BuiltLayer, ...]
    """Top first, as in the manifest; each says whether it was reused."""
    reused: bool
    """The whole image was found in the cache."""

    def summary(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "reused": self.reused,
            "manifest_blob": self.manifest_blob,
            "layers": [
                {"what": layer.what, "blob": ref.blob, "reused": layer.reused}
                for layer, ref in zip(self.layers, self.manifest.layers, strict=True)
            ],
        }


def buildable_oses() -> tuple[str, ...]:
    """The OS names an assembler builds (what a task file's ``os`` may say)."""
    return ("tiny", *sorted(os_debian.RECIPES))


class Assembler:
    """Builds images into ``blobs`` using ``cache``; ``boot`` is the kernel + init every OS
    boots (``worker_role.tinyos.locate()``)."""

    def __init__(self, cache: BuildCache, blobs: BlobStore, boot: BootFiles) -> None:
        self.cache = cache
        self.blobs = blobs
        self.boot = boot

    async def build_os(self, name: str) -> OsBuild:
        """The OS ``name`` (:class:`UnknownOsError` for one the catalog cannot build)."""
        if name == "tiny":
            return await build_tiny(self.cache, self.boot)
        os_debian.recipe(name)  # refuses an unknown name before any network access
        return await os_debian.build_debian(self.cache, self.boot, name)

    async def assemble(self, task: TaskFile) -> AssembledImage:
        key = await self._input_key(task)
        record = self.cache.image_record(key)
        cached = await self._from_record(read_json(record))
        if cached is not None:
            return cached
        os_build = await self.build_os(task.os)
        layers: list[BuiltLayer] = []
        if task.files:
            layers.append(await self.task_layer(task))
        merged = bool(os_build.meta.get("merged_usr", False))
        for directory in reversed(task.local_packages):
            layers.append(await build_directory(self.cache, directory, merged_usr=merged))
        if task.debian_packages:
            layers.append(await build_debian_packages(self.cache, os_build, task.debian_packages))
        layers.append(os_build.root)
        kernel = await self._add(os_build.kernel)
        initrd = await self._add(os_build.initrd)
        refs = tuple([LayerRef(blob=await self._add(x.path), what=x.what) for x in layers])
        manifest = ImageManifest(
            os=os_build.name,
            os_version=os_build.version,
            kernel=kernel,
            initramfs=initrd,
            cmdline=os_build.cmdline,
            layers=refs,
            caps=default_caps(task),
            command=task.command,
            env=tuple(sorted(task.env.items())),
            cwd=task.cwd,
            timeout_s=math.ceil(task.limits.max_runtime),
        )
        encoded = manifest.encode()
        manifest_blob = (await self.blobs.add_bytes(encoded)).hex()
        paths = {kernel: os_build.kernel, initrd: os_build.initrd}
        paths.update({ref.blob: x.path for ref, x in zip(refs, layers, strict=True)})
        write_json(
            record,
            {
                "manifest": encoded.hex(),
                "paths": {blob: str(p) for blob, p in paths.items()},
                "layers": [{"key": x.key, "what": x.what, "meta": dict(x.meta)} for x in layers],
            },
        )
        return AssembledImage(manifest, manifest.id, manifest_blob, tuple(layers), reused=False)

    async def task_layer(self, task: TaskFile) -> BuiltLayer:
        """The task's files under /task, owned by root, times fixed."""
        sources = [(rel, task.base_dir / rel) for rel in task.files]
        try:
            digests = [(rel, await trio.to_thread.run_sync(tree_digest, p)) for rel, p in sources]
        except OSError as e:
            raise TaskInputError(f"cannot read task file {e.filename}: {e.strerror}") from e
        key = digest(TASK_RECIPE, TASK_DIR, digests)
        what = f"task {task.name}"
        if hit := self.cache.layer(key):
            return dataclasses.replace(hit, what=what)  # see build_debian_packages
        staging = self.cache.staging("task")
        try:
            root = staging / "root"
            try:
                await trio.to_thread.run_sync(_copy_files, sources, root / TASK_DIR.strip("/"))
            except OSError as e:
                raise TaskInputError(f"cannot copy task file {e.filename}: {e.strerror}") from e
            await squash(root, staging / "layer.sqfs", all_root=True)
            meta = {"files": list(task.files)}
            return self.cache.add_layer(key, staging / "layer.sqfs", what, meta)
        finally:
            self.cache.discard(staging)

    async def _input_key(self, task: TaskFile) -> str:
        """Every input of the image, without building anything."""
        index = None
        if task.os != "tiny":
            apt = os_debian.apt_for(self.cache, task.os)
            await apt.update()
            index = _index_state(apt.root / "lists")
        try:
            files = [
                (rel, await trio.to_thread.run_sync(tree_digest, task.base_dir / rel))
                for rel in task.files
            ]
            dirs = [await trio.to_thread.run_sync(tree_digest, d) for d in task.local_packages]
        except OSError as e:
            raise TaskInputError(f"cannot read {e.filename}: {e.strerror}") from e
        # Everything the manifest says, names included (they label its layers).
        return digest(
            RECIPE,
            self.boot.ident,
            task.name,
            task.os,
            index,
            task.debian_packages,
            [(d.name, tree) for d, tree in zip(task.local_packages, dirs, strict=True)],
            files,
            task.command,
            sorted(task.env.items()),
            task.cwd,
            default_caps(task).__repr__(),
            math.ceil(task.limits.max_runtime),
        )

    async def _from_record(self, record: Mapping[str, Any] | None) -> AssembledImage | None:
        """The cached image, its blobs put back in the store if this store lacks them; None
        when there is no record or a file it names is gone (then it is built again)."""
        if record is None:
            return None
        try:
            encoded = bytes.fromhex(record["manifest"])
            manifest = ImageManifest.decode(encoded)
            paths = {blob: Path(p) for blob, p in record["paths"].items()}
            layer_info = [(x["key"], x["what"], x["meta"]) for x in record["layers"]]
        except (ImageManifestError, KeyError, TypeError, ValueError):
            return None  # a damaged record: build again
        if not all(p.is_file() for p in paths.values()):
            return None
        for blob, path in paths.items():
            if not await self._has(blob) and await self._add(path) != blob:
                return None  # the cached file changed under us: rebuild
        manifest_blob = (await self.blobs.add_bytes(encoded)).hex()
        layers = tuple(
            BuiltLayer(key, paths[ref.blob], what, meta, reused=True)
            for (key, what, meta), ref in zip(layer_info, manifest.layers, strict=True)
        )
        return AssembledImage(manifest, manifest.id, manifest_blob, layers, reused=True)

    async def _add(self, path: Path) -> str:
        return (await self.blobs.add_file(path)).hex()

    async def _has(self, blob: str) -> bool:
        return await is_complete(self.blobs, parse_blob_id(blob))


def default_caps(task: TaskFile) -> Caps:
    """The task file's resources as caps, rounded up to whole MiB, the share to thousandths, and
    clamped to the least a VM can run with (:meth:`node.limits.Limit.from_written`) -- the one
    mapping: the scheduler places a task by these and its manifest records them, so the two
    always agree."""
    r = task.resources
    return Caps.of(
        {limit.name: limit.from_written(r.amounts[key]) for key, limit in TASK_LIMITS.items()},
        network=NetworkMode(r.network),
        net_allow=r.allow,
    )


def _index_state(lists: Path) -> str:
    """Which archive state an apt index holds: the hash of its signed InRelease files."""
    paths = sorted(lists.glob("*InRelease"))
    if not paths:
        raise BuildError(f"no apt index in {lists}")
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _copy_files(sources: list[tuple[str, Path]], dest: Path) -> None:
    dest.mkdir(parents=True)
    for rel, src in sources:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy(src, target, follow_symlinks=False)
    normalize_modes(dest.parent)
