"""A task that names a ready image (``image = REF`` in its task file) skips assembly.

The reference is an image entry of the catalog (``NAME`` or ``NAME@VERSION``, or the entry's ID)
or an image ID (64 hex digits: the blake3 of the manifest), which is looked up among the image
entries' ``meta.image_id``. The entry's ``blobs.manifest`` is fetched if it is not here (from
whichever peers provide it), and its bytes must hash to the image ID the entry names. The task's
own command, env (added to the image's), cwd (if given), runtime limit and caps then go into a
derived manifest over the same layers: a new small blob, and no layer is built.
"""

from __future__ import annotations

import dataclasses
import math
import re

from catalog.blob import BlobId
from catalog.blob_fetch import ensure_blob, read_small
from catalog.blob_service import BlobService
from catalog.build.assemble import default_caps
from catalog.entries import Entry
from catalog.errors import ImageManifestError, UnknownEntryError
from catalog.library import Library
from catalog.manifest import MAX_MANIFEST_SIZE, ImageManifest
from catalog.taskfile import TaskFile

__all__ = ["ready_manifest", "resolve_image"]

_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
FETCH_TIMEOUT = 300.0


async def resolve_image(library: Library, ref: str) -> Entry:
    """The image entry ``ref`` names (by image ID, entry ID or name[@version])."""
    if _IMAGE_ID.fullmatch(ref):
        for entry in await library.list_entries("image"):
            if entry.meta.get("image_id") == ref:
                return entry
    try:
        return await library.resolve(ref, kind="image")
    except UnknownEntryError:
        raise UnknownEntryError(f"no image {ref!r} in this scheduler's catalog") from None


async def ready_manifest(
    library: Library, blobs: BlobService, task: TaskFile
) -> tuple[BlobId, ImageManifest]:
    """The manifest blob a task with ``image = REF`` runs, stored and verified here."""
    entry = await resolve_image(library, task.image)
    image_id = str(entry.meta.get("image_id", ""))
    try:
        blob = BlobId(bytes.fromhex(str(entry.blobs["manifest"])))
    except (KeyError, ValueError):
        raise ImageManifestError(f"image entry {entry.id} names no manifest blob") from None
    await ensure_blob(blobs, blob, timeout=FETCH_TIMEOUT)
    data = await read_small(blobs.blobs, blob, max_size=MAX_MANIFEST_SIZE)
    base = ImageManifest.decode(data, expected_id=image_id)
    env = dict(base.env) | dict(task.env)
    derived = dataclasses.replace(
        base,
        command=task.command,
        env=tuple(sorted(env.items())),
        cwd=task.cwd or base.cwd,
        caps=default_caps(task),
        timeout_s=math.ceil(task.limits.max_runtime),
    )
    if derived == base:
        return blob, base
    return await blobs.blobs.add_bytes(derived.encode()), derived
