"""``image.build`` over the node's local RPC: build (and publish) with the node's own stores.

A running node holds the chunk store, so ``vmlend image build`` asks the node to build rather
than opening the store itself; the entries it publishes go to the node's library, from where a
scheduler's replication carries them on.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from catalog.blob import BlobStore
from catalog.build.assemble import Assembler
from catalog.build.cache import BuildCache
from catalog.build.os_tiny import BootFiles
from catalog.build.publish import publish_build
from catalog.errors import PackageError, TaskFileError, TaskInputError, UnknownOsError
from catalog.library import Library
from catalog.taskfile import load
from node import rpc_params
from node.errors import RpcError, VmlendError
from node.identity import Identity

BAD_TASK_ERRORS = (TaskFileError, UnknownOsError, PackageError, TaskInputError)
INVALID_TASK = "invalid_task"
BUILD_FAILED = "build_failed"

Handler = Callable[[list[Any]], Awaitable[Any]]


class ImageBuildService:
    def __init__(
        self,
        blobs: BlobStore,
        library: Library,
        identity: Identity,
        boot: Callable[[], BootFiles],
        *,
        cache_dir: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._blobs = blobs
        self._library = library
        self._identity = identity
        self._boot = boot
        self._cache_dir = cache_dir
        self._wall_clock = wall_clock

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {"image.build": self._rpc_build}

    async def _rpc_build(self, params: list[Any]) -> dict[str, Any]:
        """``[{"task": ABSOLUTE PATH, "publish": bool, "cache": PATH?}]`` -> the build summary."""
        options = rpc_params.options(params, 0, {"task", "publish", "cache"}, required=True)
        task_path = options.get("task")
        if not isinstance(task_path, str) or not Path(task_path).is_absolute():
            raise RpcError("invalid_params", "task must be an absolute path")
        cache = options.get("cache")
        if cache is not None and not isinstance(cache, str):
            raise RpcError("invalid_params", "cache must be a path")
        try:
            return await build_and_publish(
                Path(task_path),
                blobs=self._blobs,
                library=self._library if options.get("publish") else None,
                identity=self._identity,
                boot=self._boot,
                cache_dir=Path(cache) if cache else self._cache_dir,
                now=self._wall_clock(),
            )
        except BAD_TASK_ERRORS as e:
            raise RpcError(INVALID_TASK, str(e)) from e
        except VmlendError as e:
            raise RpcError(BUILD_FAILED, str(e)) from e


async def build_and_publish(
    task_path: Path,
    *,
    blobs: BlobStore,
    library: Library | None,
    identity: Identity,
    boot: Callable[[], BootFiles],
    cache_dir: Path | None,
    now: float,
) -> dict[str, Any]:
    """Assemble the task's image into ``blobs``; with a ``library``, publish its entries too."""
    task = load(task_path)
    if task.image:
        raise TaskFileError(
            f"names the ready image {task.image!r}: there is nothing to build (submit it as is)",
            source=str(task_path),
            key="image",
        )
    assembler = Assembler(BuildCache(cache_dir), blobs, boot())
    image = await assembler.assemble(task)
    summary = image.summary()
    if library is not None:
        entries = await publish_build(
            assembler, task, image, identity=identity, library=library, now=now
        )
        summary["published"] = [
            {"kind": e.kind, "name": e.name, "version": e.version, "id": e.id} for e in entries
        ]
    return summary
