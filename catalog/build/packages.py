"""The package library's layers: from Debian package names, or from a local directory.

From names: the names are resolved against the OS's own dpkg database with a private apt
(:mod:`catalog.build.apt`), so only what the OS lacks goes into the layer (``python3`` on
``debian-12`` gives python3 and the libraries minbase does not have). Each .deb is unpacked with
``dpkg-deb -x``, sorted by name, then squashed reproducibly. Maintainer scripts do not run: a
layer is files only, which is what interpreters and libraries need; a package that only works
after its postinst has run is not a good layer.

Debian 12 is merged-/usr (``/bin`` is a symlink to ``usr/bin``), but many of its packages still
ship files under ``/bin`` or ``/lib``. In a layer those would be real directories, and an
overlay directory hides the OS's symlink beneath it, breaking the whole root; so they are moved
under ``/usr`` first, which is where dpkg's writes through the symlinks would have put them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import trio

from catalog.build.cache import BuildCache, BuiltLayer
from catalog.build.os_debian import apt_for
from catalog.build.os_tiny import OsBuild
from catalog.build.tools import digest, normalize_modes, run, squash, tree_digest
from catalog.errors import BuildError, PackageError, TaskInputError

log = logging.getLogger("vmlend.catalog.build")

RECIPE = "package-layer/1"
DIRECTORY_RECIPE = "directory-layer/1"
DPKG_DEB_TIMEOUT_S = 120.0
MERGED_USR_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


async def build_debian_packages(
    cache: BuildCache, os_build: OsBuild, names: Sequence[str]
) -> BuiltLayer:
    """One layer with ``names`` and whatever they need that ``os_build`` does not have."""
    if os_build.dpkg_status is None:
        raise PackageError(
            f"OS {os_build.name} has no Debian package database: Debian packages "
            f"({', '.join(names)}) need a Debian OS such as debian-12"
        )
    apt = apt_for(cache, os_build.name)
    await apt.update()
    resolved = await apt.resolve(names, status=os_build.dpkg_status)
    key = digest(RECIPE, os_build.key, sorted(names), [str(p) for p in resolved])
    what = f"packages {' '.join(names)}"
    if hit := cache.layer(key):
        # Named as this call names it, not as whoever built it first did: the name goes into
        # the manifest, which must not depend on the cache's history.
        return dataclasses.replace(hit, what=what)
    log.info("building a layer of %s: %d packages", " ".join(names), len(resolved))
    debs = await apt.download(resolved, cache.debs)
    staging = cache.staging("packages")
    try:
        tree = staging / "root"
        tree.mkdir()
        for deb in debs:
            with trio.fail_after(DPKG_DEB_TIMEOUT_S):
                await run(["dpkg-deb", "-x", deb, tree], what=f"dpkg-deb -x {deb.name}")
        await trio.to_thread.run_sync(merge_usr, tree)
        await squash(tree, staging / "layer.sqfs", all_root=False)
        meta = {
            "os": os_build.name,
            "os_version": os_build.version,
            "requested": sorted(names),
            "packages": {p.name: p.version for p in resolved},
        }
        return cache.add_layer(key, staging / "layer.sqfs", what, meta)
    finally:
        cache.discard(staging)


async def build_directory(cache: BuildCache, source: Path, *, merged_usr: bool) -> BuiltLayer:
    """A layer holding the tree at ``source`` as the guest's root sees it (``source/usr/bin/x``
    becomes ``/usr/bin/x``); owners become root. ``merged_usr``: the OS's /bin is a symlink."""
    if not await trio.Path(source).is_dir():
        raise TaskInputError(f"package directory {source} does not exist or is not a directory")
    try:
        tree_key = await trio.to_thread.run_sync(tree_digest, source)
    except OSError as e:
        raise TaskInputError(f"cannot read package directory {source}: {e}") from e
    key = digest(DIRECTORY_RECIPE, tree_key, merged_usr)
    what = f"directory {source.name}"
    if hit := cache.layer(key):
        return dataclasses.replace(hit, what=what)  # see build_debian_packages
    staging = cache.staging("directory")
    try:
        tree = staging / "root"
        try:
            await trio.to_thread.run_sync(_copy_tree, source, tree)
        except OSError as e:
            raise TaskInputError(f"cannot copy package directory {source}: {e}") from e
        if merged_usr:
            await trio.to_thread.run_sync(merge_usr, tree)
        await squash(tree, staging / "layer.sqfs", all_root=True)
        return cache.add_layer(key, staging / "layer.sqfs", what, {"tree": tree_key})
    finally:
        cache.discard(staging)


def _copy_tree(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, symlinks=True)
    normalize_modes(dest)


def merge_usr(tree: Path) -> None:
    """Move ``tree/bin`` & co. under ``tree/usr`` (see the module docstring)."""
    for name in MERGED_USR_DIRS:
        top = tree / name
        if top.is_symlink() or not top.exists():
            continue
        if not top.is_dir():
            raise BuildError(f"layer has a file /{name} where the OS has a directory link")
        _merge_into(top, tree / "usr" / name)


def _merge_into(src: Path, dest: Path) -> None:
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        src.rename(dest)
        return
    if dest.is_symlink() or not dest.is_dir():
        raise BuildError(f"cannot merge {src} into {dest}: it is not a directory")
    for child in sorted(os.listdir(src)):
        s, d = src / child, dest / child
        if s.is_dir() and not s.is_symlink():
            _merge_into(s, d)
        elif d.exists() or d.is_symlink():
            raise BuildError(f"layer ships both {s} and {d} (merged /usr)")
        else:
            s.rename(d)
    src.rmdir()
