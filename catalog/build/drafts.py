"""What the builds put in the catalog: unsigned entry fields, signed with :meth:`Draft.sign`.

Blobs are hex blob IDs in the chunk store; ``meta`` holds only what entries accept (no floats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.build.assemble import AssembledImage
from catalog.build.cache import BuiltLayer
from catalog.build.os_tiny import OsBuild
from catalog.entries import Entry, make_entry
from node.identity import Identity


@dataclass(frozen=True, slots=True, kw_only=True)
class Draft:
    kind: str
    name: str
    version: str
    blobs: Mapping[str, str]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def sign(self, identity: Identity, *, now: float) -> Entry:
        return make_entry(
            identity,
            kind=self.kind,
            name=self.name,
            version=self.version,
            blobs=self.blobs,
            meta=self.meta,
            now=now,
        )


def os_draft(os_build: OsBuild, *, kernel: str, initrd: str, root: str) -> Draft:
    """An ``os`` entry: kernel, initramfs (role ``initrd``) and root layer blobs."""
    return Draft(
        kind="os",
        name=os_build.name,
        version=os_build.version,
        blobs={"kernel": kernel, "initrd": initrd, "root": root},
        meta={**os_build.meta, "key": os_build.key},
    )


def package_draft(layer: BuiltLayer, names: Sequence[str], *, blob: str) -> Draft:
    """A ``package`` entry for a layer of Debian packages (or a directory: ``names`` = its name)."""
    return Draft(
        kind="package",
        name="+".join(names)[:64],
        version=layer.key[:16],
        blobs={"layer": blob},
        meta={**layer.meta, "key": layer.key},
    )


def image_draft(image: AssembledImage, task_name: str) -> Draft:
    """An ``image`` entry: the manifest blob, and the image ID it hashes to."""
    m = image.manifest
    return Draft(
        kind="image",
        name=task_name,
        version=image.image_id[:16],
        blobs={"manifest": image.manifest_blob},
        meta={
            "image_id": image.image_id,
            "os": m.os,
            "os_version": m.os_version,
            "layers": [ref.what for ref in m.layers],
        },
    )
