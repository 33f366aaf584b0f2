"""The build cache: every OS, layer and image built, under the hash of its inputs.

Layout under the cache root (default :func:`default_cache_dir`)::

    apt/<os>/            a private apt configuration and index for that OS's archive
    debs/                downloaded .deb files (apt checked each against the signed index)
    os/<os>/<key>/       root.sqfs, status (its dpkg database), os.json
    layers/<key>.sqfs    package and task layers, with <key>.json describing each
    images/<key>.json    an assembled image: its manifest, by the key of all its inputs
    tmp/                 staging; a crashed build leaves only this, cleared after a day

A result appears under its key only when complete (rename), so a key that exists is a finished
build of exactly those inputs and is reused as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catalog.build.tools import public_dirs, read_json, write_json

CACHE_ENV = "VMLEND_BUILD_CACHE"
STALE_STAGING_S = 24 * 3600.0


def default_cache_dir() -> Path:
    """``$VMLEND_BUILD_CACHE``, else /var/cache/vmlend/build as root (readable by QEMU's user),
    else ~/.cache/vmlend/build."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).absolute()
    if os.geteuid() == 0:
        return Path("/var/cache/vmlend/build")
    return Path.home() / ".cache/vmlend/build"


@dataclass(frozen=True, slots=True)
class BuiltLayer:
    """A read-only squashfs layer in the cache."""

    key: str
    path: Path
    what: str
    """What it holds, for people: "os debian-12", "package python3", "task hello"."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    reused: bool = False
    """True when this call found it already built."""


class BuildCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_cache_dir()).absolute()
        for sub in ("", "os", "layers", "images", "debs", "apt", "tmp"):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
            public_dirs(d)
        self._clear_stale_staging()

    def _clear_stale_staging(self) -> None:
        """Remove what crashed builds left. Only old entries: another process may be building
        right now, and no build step takes a day."""
        cutoff = time.time() - STALE_STAGING_S
        for entry in (self.root / "tmp").iterdir():
            try:
                if entry.lstat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except FileNotFoundError:
                pass  # its builder finished meanwhile

    def staging(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix=f"{prefix}."))

    def discard(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def apt_dir(self, os_name: str) -> Path:
        return self.root / "apt" / os_name

    @property
    def debs(self) -> Path:
        return self.root / "debs"

    def os_dir(self, os_name: str, key: str) -> Path:
        return self.root / "os" / os_name / key

    def layer(self, key: str) -> BuiltLayer | None:
        """The layer built under ``key``, if any."""
        path = self.root / "layers" / f"{key}.sqfs"
        meta = read_json(self.root / "layers" / f"{key}.json")
        if meta is None or not path.is_file():
            return None
        return BuiltLayer(key, path, meta["what"], meta["meta"], reused=True)

    def add_layer(self, key: str, image: Path, what: str, meta: Mapping[str, Any]) -> BuiltLayer:
        """Move the squashfs ``image`` into the cache under ``key``."""
        path = self.root / "layers" / f"{key}.sqfs"
        image.chmod(0o644)
        image.replace(path)
        write_json(self.root / "layers" / f"{key}.json", {"what": what, "meta": dict(meta)})
        return BuiltLayer(key, path, what, meta, reused=False)

    def image_record(self, key: str) -> Path:
        return self.root / "images" / f"{key}.json"
