"""What the builds put in the catalog: unsigned entry fields, signed with :meth:`Draft.sign`.

Blobs are hex blob IDs in the chunk store; ``meta`` holds only what entries accept (no floats).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.build.assemble import AssembledImage
from catalog.build.cache import BuiltLayer
from catalog.build.os_tiny import OsBuild
from catalog.entries import Entry, make_entry, register_kind_validator
from catalog.errors import InvalidEntryError
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


# Rules for what the builds put in ``meta``; lenient about entries made by other tools (a key
# that is absent is not checked), strict about the shape of a key that is there.
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_packages(entry: Entry) -> None:
    packages = entry.meta.get("packages")
    if packages is not None and not (
        isinstance(packages, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in packages.items())
    ):
        raise InvalidEntryError(
            f"{entry.kind} {entry.name}: meta.packages must map names to versions"
        )


def _check_image(entry: Entry) -> None:
    image_id = entry.meta.get("image_id")
    if image_id is not None and not (isinstance(image_id, str) and _HEX64.fullmatch(image_id)):
        raise InvalidEntryError(f"image {entry.name}: meta.image_id must be 64 hex digits")


register_kind_validator("os", _check_packages)
register_kind_validator("package", _check_packages)
register_kind_validator("image", _check_image)
