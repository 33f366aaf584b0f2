"""The blobs of a lease: its image fetched before the VM starts, its result's bytes stored after.

:class:`LeaseBlobs` is what the worker agent needs; :class:`NodeLeaseBlobs` serves it from the
node's :class:`BlobService`, and the agent's tests pass an in-memory one. A result's bytes are
announced so that the scheduler, which fetches them before it counts the report, finds them here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from catalog.blob import BlobId
from catalog.blob_fetch import ensure_blob, read_small
from catalog.blob_service import BlobService
from catalog.dispatch import LeaseGrant
from catalog.manifest import MAX_IMAGE_SIZE, MAX_MANIFEST_SIZE, ImageManifest, materialize
from catalog.transfer_plan import Event, Progress
from worker_role.vm.interface import Image
from worker_role.vm.task import Layer, LayerFormat

FETCH_TIMEOUT = 300.0

Fetched = Callable[[int], None]
"""Told the bytes of a lease's image on disk so far, as they grow (resumed ones included)."""


class LeaseBlobs(Protocol):
    @property
    def images(self) -> frozenset[bytes]:
        """The IDs of the images held here (an offer lists them: schedulers prefer holders)."""
        ...

    async def image(
        self, grant: LeaseGrant, addrs: list[str], fetched: Fetched = lambda n: None
    ) -> tuple[Image, ImageManifest]:
        """The boot files and manifest of ``grant``'s image, fetched from the scheduler at
        ``addrs`` if they are not here, telling ``fetched`` how far it got. Raises
        ``CatalogError`` or ``trio.TooSlowError``."""
        ...

    async def publish(self, data: bytes) -> bytes:
        """Store ``data`` as a blob, announce it, and return its blob ID."""
        ...


class NodeLeaseBlobs:
    """:class:`LeaseBlobs` from the node's blob service; images materialise in ``images_dir``."""

    def __init__(self, blobs: BlobService, images_dir: Path) -> None:
        self.blobs = blobs
        self._images_dir = images_dir
        self._images: set[bytes] = set()

    @property
    def images(self) -> frozenset[bytes]:
        return frozenset(self._images)

    async def publish(self, data: bytes) -> bytes:
        blob = await self.blobs.blobs.add_bytes(data)
        self.blobs.announce(blob)
        return bytes(blob)

    async def _ensure_blob(
        self, blob: BlobId, addrs: list[str], max_size: int, fetched: Fetched
    ) -> int:
        """From the scheduler at ``addrs`` and every other peer that provides the blob; its
        size, which may not exceed ``max_size`` (checked before anything is fetched)."""

        def on_event(event: Event) -> None:
            if isinstance(event, Progress):
                fetched(event.bytes_done)

        result = await ensure_blob(
            self.blobs,
            blob,
            sources=addrs,
            timeout=FETCH_TIMEOUT,
            max_size=max_size,
            on_event=on_event,
        )
        return result.bytes_total

    async def image(
        self, grant: LeaseGrant, addrs: list[str], fetched: Fetched = lambda n: None
    ) -> tuple[Image, ImageManifest]:
        done = 0  # bytes of the blobs complete so far

        def so_far(n: int) -> None:
            fetched(done + n)

        manifest_blob = BlobId(grant.image_id)
        done += await self._ensure_blob(manifest_blob, addrs, MAX_MANIFEST_SIZE, so_far)
        data = await read_small(self.blobs.blobs, manifest_blob, max_size=MAX_MANIFEST_SIZE)
        manifest = ImageManifest.decode(data)
        # A scheduler names the image: all of it together stays within MAX_IMAGE_SIZE, so a
        # manifest repeating one huge blob (or naming many) cannot fill this machine's disk.
        left = MAX_IMAGE_SIZE
        for blob in (manifest.kernel, manifest.initramfs, *(x.blob for x in manifest.layers)):
            size = await self._ensure_blob(BlobId(bytes.fromhex(blob)), addrs, left, so_far)
            left -= size
            done += size
            fetched(done)
        self._images.add(grant.image_id)
        paths = await materialize(manifest, self.blobs.blobs, self._images_dir)
        layers = tuple(
            Layer(p, LayerFormat(ref.format))
            for p, ref in zip(paths.layers, manifest.layers, strict=True)
        )
        boot = Image(kernel=paths.kernel, initrd=paths.initrd, cmdline=paths.cmdline, layers=layers)
        return boot, manifest
