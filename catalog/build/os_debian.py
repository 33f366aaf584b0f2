"""``debian-12``: a minimal Debian root file system built from Debian's packages, as one layer.

Reproducible: the package set is resolved first, against a private index of the archive
(:mod:`catalog.build.apt`), and the build is keyed by exactly that set (name=version of every
package; the archive never gives two .debs one version). mmdebstrap then installs it with
``SOURCE_DATE_EPOCH`` set, which makes it drop logs, caches and machine IDs; squashing with fixed
times and options turns the same packages into the same bytes, which a test checks by building
twice. If the archive moved on between resolution and installation, the build is refused rather
than stored under the wrong key.

The exact versions are recorded in the OS's meta (``packages``), and its dpkg database is kept
next to the layer: package layers are resolved against it (:mod:`catalog.build.packages`).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import trio

from catalog.build.apt import Apt, Archive, Resolved, debian_archive
from catalog.build.cache import BuildCache, BuiltLayer
from catalog.build.os_tiny import BootFiles, OsBuild, boot_meta
from catalog.build.tools import (
    SOURCE_DATE_EPOCH,
    digest,
    publish_dir,
    read_json,
    run,
    squash,
    write_json,
)
from catalog.errors import BuildError, UnknownOsError

log = logging.getLogger("vmlend.catalog.build")

RECIPE = "debian-os/1"
MMDEBSTRAP_TIMEOUT_S = 1800.0
# Documentation and translations are most of a minimal root's size and no task needs them.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)


@dataclass(frozen=True, slots=True)
class DebianRecipe:
    name: str
    archive: Archive
    variant: str = "minbase"


RECIPES = {"debian-12": DebianRecipe("debian-12", debian_archive("debian-12", "bookworm"))}


def recipe(name: str) -> DebianRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownOsError(
            f"unknown OS {name!r} (known: tiny, {', '.join(sorted(RECIPES))})"
        ) from None


def apt_for(cache: BuildCache, name: str) -> Apt:
    return Apt(cache.apt_dir(name), recipe(name).archive)


async def resolve(apt: Apt, variant: str) -> list[Resolved]:
    """The packages of a ``variant`` root (mmdebstrap's minbase: required + apt)."""
    if variant != "minbase":
        raise BuildError(f"unsupported variant {variant!r}")
    return await apt.resolve([*await apt.required(), "apt"], status=None)


async def build_debian(
    cache: BuildCache, boot: BootFiles, name: str = "debian-12", *, refresh_index: bool = False
) -> OsBuild:
    """The Debian OS ``name``: built, or found in the cache when its package set is unchanged."""
    r = recipe(name)
    apt = apt_for(cache, name)
    await apt.update(refresh=refresh_index)
    packages = await resolve(apt, r.variant)
    key = digest(RECIPE, r.archive.sources, r.variant, DPKG_OPTIONS, [str(p) for p in packages])
    out = cache.os_dir(name, key)
    built = read_json(out / "os.json") is None
    if built:
        log.info("building %s from %d packages (mmdebstrap, 1-3 min)", name, len(packages))
        await _build_into(cache, out, r, packages)
    info = read_json(out / "os.json")
    if info is None:
        raise BuildError(f"OS build {out} is incomplete")
    return OsBuild(
        name=name,
        version=f"12-{key[:16]}",
        key=key,
        kernel=boot.kernel,
        initrd=boot.initrd,
        cmdline=boot.cmdline,
        root=BuiltLayer(key, out / "root.sqfs", f"os {name}", info, reused=not built),
        dpkg_status=out / "status",
        meta={**boot_meta(boot), **info},
    )


async def _build_into(
    cache: BuildCache, out: Path, r: DebianRecipe, packages: list[Resolved]
) -> None:
    staging = cache.staging(r.name)
    try:
        tree = staging / "root"
        cmd = [
            "mmdebstrap",
            "--mode=root",
            f"--variant={r.variant}",
            "--format=directory",
            f"--architectures={r.archive.arch}",
            "--quiet",
            *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
            r.archive.suite,
            str(tree),
            *r.archive.sources,
        ]
        with trio.fail_after(MMDEBSTRAP_TIMEOUT_S):
            await run(cmd, env={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}, what="mmdebstrap")
        installed = installed_packages(tree / "var/lib/dpkg/status")
        expected = {p.name: p.version for p in packages}
        if installed != expected:
            diff = sorted(set(installed.items()) ^ set(expected.items()))[:6]
            raise BuildError(
                f"{r.name}: mmdebstrap installed another package set than resolved "
                f"(the archive changed meanwhile?): {diff}; build again"
            )
        shutil.copyfile(tree / "var/lib/dpkg/status", staging / "status")
        (staging / "status").chmod(0o644)
        await squash(tree, staging / "root.sqfs", all_root=False)
        await trio.to_thread.run_sync(shutil.rmtree, tree)
        write_json(
            staging / "os.json",
            {
                "suite": r.archive.suite,
                "variant": r.variant,
                "arch": r.archive.arch,
                "sources": list(r.archive.sources),
                "packages": dict(sorted(installed.items())),
                "merged_usr": True,
                "source_date_epoch": SOURCE_DATE_EPOCH,
            },
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.parent.chmod(0o755)
        publish_dir(staging, out)
    except BaseException:
        cache.discard(staging)
        raise


def installed_packages(status: Path) -> dict[str, str]:
    """name -> version of every package a dpkg status file says is installed."""
    try:
        text = status.read_text(errors="replace")
    except OSError as e:
        raise BuildError(f"cannot read dpkg status {status}: {e}") from e
    out = {}
    for record in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", record, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out[fields["Package"]] = fields["Version"]
    return out
