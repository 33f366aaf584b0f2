"""Building the catalog's content: OSes, package layers, task layers and image manifests.

:class:`Assembler` turns a :class:`catalog.taskfile.TaskFile` into an :class:`ImageManifest`
(``vmlend image build``, :mod:`catalog.build.cli`; the manifest format itself is
:mod:`catalog.manifest`, which workers read without this package); :mod:`catalog.build.drafts`
turns what was built into catalog entries. Needs mmdebstrap, apt, dpkg-deb and mksquashfs on
the building machine (scripts/setup-system.sh).
"""

from __future__ import annotations

from catalog.build.assemble import AssembledImage, Assembler, default_caps
from catalog.build.cache import BuildCache, BuiltLayer, default_cache_dir
from catalog.build.drafts import Draft, image_draft, os_draft, package_draft
from catalog.build.os_tiny import BootFiles, OsBuild

__all__ = [
    "AssembledImage",
    "Assembler",
    "BootFiles",
    "BuildCache",
    "BuiltLayer",
    "Draft",
    "OsBuild",
    "default_cache_dir",
    "default_caps",
    "image_draft",
    "os_draft",
    "package_draft",
]
