"""Put what a build made into the catalog's libraries: its OS, its package layers, the image;
and an OS a scheduler can build, before any task asks for it (:func:`publish_os`).

The builds only produce blobs and a manifest; this signs an entry for each of them with the
node's key and stores them in the library, from where replication carries them to the other
schedulers. An entry this publisher already stored with the same name, version, blobs and meta
is reused, so publishing the same build twice adds nothing (a new ``created_at`` alone would
otherwise make a new entry ID every time).
"""

from __future__ import annotations

from catalog.build.assemble import AssembledImage, Assembler
from catalog.build.drafts import Draft, image_draft, os_draft, package_draft
from catalog.entries import Entry
from catalog.errors import UnknownEntryError
from catalog.library import Library
from catalog.taskfile import TaskFile
from node.identity import Identity

_PACKAGE_LAYERS = ("packages ", "directory ")


async def drafts_for(assembler: Assembler, task: TaskFile, image: AssembledImage) -> list[Draft]:
    """The entries a build of ``task`` adds to the libraries: os, packages, image (in order)."""
    os_build = await assembler.build_os(task.os)  # a cache hit: the image was just built
    manifest = image.manifest
    root = manifest.layers[-1]  # layers are top first; the OS root is always the bottom one
    drafts = [os_draft(os_build, kernel=manifest.kernel, initrd=manifest.initramfs, root=root.blob)]
    for layer, ref in zip(image.layers, manifest.layers, strict=True):
        for prefix in _PACKAGE_LAYERS:
            if layer.what.startswith(prefix):
                names = layer.what.removeprefix(prefix).split()
                drafts.append(package_draft(layer, names, blob=ref.blob))
    drafts.append(image_draft(image, task.name))
    return drafts


async def publish_build(
    assembler: Assembler,
    task: TaskFile,
    image: AssembledImage,
    *,
    identity: Identity,
    library: Library,
    now: float,
) -> list[Entry]:
    """Sign and store the build's entries; return them (new or already present)."""
    entries: list[Entry] = []
    new: list[Entry] = []
    for draft in await drafts_for(assembler, task, image):
        existing = await _same_entry(library, draft, identity.public_bytes)
        if existing is None:
            existing = draft.sign(identity, now=now)
            new.append(existing)
        entries.append(existing)
    await library.insert_many(new)
    return entries


async def publish_os(
    assembler: Assembler, name: str, *, identity: Identity, library: Library, now: float
) -> Entry:
    """Build the OS ``name`` (a cache hit once built) with its blobs in the assembler's store,
    and sign and store its ``os`` entry unless this publisher's same entry is there."""
    os_build = await assembler.build_os(name)
    blobs = [await assembler.blobs.add_file(p) for p in (os_build.kernel, os_build.initrd)]
    root = await assembler.blobs.add_file(os_build.root.path)
    draft = os_draft(os_build, kernel=blobs[0].hex(), initrd=blobs[1].hex(), root=root.hex())
    existing = await _same_entry(library, draft, identity.public_bytes)
    if existing is not None:
        return existing
    entry = draft.sign(identity, now=now)
    await library.insert(entry)
    return entry


async def _same_entry(library: Library, draft: Draft, publisher: bytes) -> Entry | None:
    try:
        entry = await library.find(draft.kind, draft.name, draft.version)
    except UnknownEntryError:
        return None
    same = (
        entry.publisher == publisher
        and dict(entry.blobs) == dict(draft.blobs)
        and dict(entry.meta) == dict(draft.meta)
    )
    return entry if same else None
