"""A private apt for one OS's archive: its own sources, index and dpkg status, never the host's.

The host's apt configuration (other archives, pins, recommends, its installed packages) must not
leak into what an OS or a package layer holds, so every apt call here runs with ``APT_CONFIG``
pointing at a configuration that names only this archive and, for resolution, the dpkg status
of the OS being extended. apt itself checks every index against the archive's signed InRelease
and every .deb against the index.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from catalog.build.tools import run
from catalog.errors import BuildError, PackageError

APT_TIMEOUT_S = 300.0
DOWNLOAD_TIMEOUT_S = 900.0
INDEX_MAX_AGE_S = 6 * 3600.0
LOCK_POLL_S = 0.2
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_INST_RE = re.compile(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+) .*\[(\S+)\]\)", re.M)


@dataclass(frozen=True, slots=True)
class Archive:
    """Where an OS's packages come from."""

    name: str
    suite: str
    sources: tuple[str, ...]
    """One-line apt sources, also handed to mmdebstrap as its mirrors."""
    arch: str = "amd64"


def debian_archive(name: str, suite: str, mirror: str = "http://deb.debian.org") -> Archive:
    signed = f"[signed-by={DEBIAN_KEYRING}]"
    return Archive(
        name=name,
        suite=suite,
        sources=(
            f"deb {signed} {mirror}/debian {suite} main",
            f"deb {signed} {mirror}/debian {suite}-updates main",
            f"deb {signed} {mirror}/debian-security {suite}-security main",
        ),
    )


@dataclass(frozen=True, slots=True, order=True)
class Resolved:
    """One binary package version of the archive."""

    name: str
    version: str
    arch: str

    @property
    def deb_name(self) -> str:
        # apt-get download escapes the epoch colon in file names.
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"

    def __str__(self) -> str:
        return f"{self.name}={self.version}"


class Apt:
    """apt-get and apt-cache confined to ``root`` and one archive."""

    def __init__(self, root: Path, archive: Archive) -> None:
        self.root = root
        self.archive = archive
        for sub in ("parts", "lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "empty-status").touch()
        _write_if_changed(root / "sources.list", "".join(f"{s}\n" for s in archive.sources))
        conf = {
            "Dir::Etc::SourceList": root / "sources.list",
            "Dir::Etc::SourceParts": root / "parts",
            "Dir::Etc::Parts": root / "parts",
            "Dir::Etc::Preferences": root / "parts/none",
            "Dir::Etc::PreferencesParts": root / "parts",
            "Dir::State": root,
            "Dir::State::Lists": root / "lists",
            "Dir::State::status": root / "empty-status",
            "Dir::Cache": root / "cache",
            "APT::Architecture": archive.arch,
            "APT::Install-Recommends": "false",
            "APT::Install-Suggests": "false",
            "Acquire::Languages": "none",
        }
        lines = [f'{k} "{v}";' for k, v in conf.items()]
        lines.append(f'APT::Architectures {{ "{archive.arch}"; }};')
        if os.geteuid() == 0:
            # Downloads land in our cache dir, which apt's _apt user may not write.
            lines.append('APT::Sandbox::User "root";')
        _write_if_changed(root / "apt.conf", "\n".join(lines) + "\n")
        self._env = {"APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C.UTF-8"}

    def _index_age(self) -> float | None:
        stamps = list((self.root / "lists").glob("*InRelease"))
        if not stamps:
            return None
        return time.time() - min(p.stat().st_mtime for p in stamps)

    async def update(self, *, refresh: bool = False) -> None:
        """Fetch the archive's index when it is missing, older than INDEX_MAX_AGE_S, or asked."""
        with trio.fail_after(APT_TIMEOUT_S):
            # apt-get update takes apt's own lock and fails, rather than waits, when another
            # build process holds it; so builds take turns on ours first.
            async with _flock(self.root / "update.lock"):
                age = self._index_age()
                if not refresh and age is not None and age < INDEX_MAX_AGE_S:
                    return
                await run(
                    ["apt-get", "update", "-q"],
                    env=self._env,
                    what=f"apt-get update for {self.archive.name}",
                )

    async def required(self) -> list[str]:
        """The archive's Essential and Priority: required packages (mmdebstrap's minbase,
        without apt)."""
        with trio.fail_after(APT_TIMEOUT_S):
            out = await run(["apt-cache", "dumpavail"], env=self._env)
        names = set()
        for record in out.decode(errors="replace").split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", record, re.M))
            if fields.get("Essential") == "yes" or fields.get("Priority") == "required":
                names.add(fields["Package"])
        if not names:
            raise BuildError(f"the index of {self.archive.name} lists no required packages")
        return sorted(names)

    async def resolve(self, packages: Sequence[str], *, status: Path | None) -> list[Resolved]:
        """What installing ``packages`` onto a system whose dpkg status is ``status`` (None:
        an empty system) would add, with exact versions.

        Refuses (:class:`PackageError`) a name the archive does not have, and a package that
        would need an installed one replaced: that package does not fit this OS build.
        """
        cmd = ["apt-get", "-s", "-q", "install", *packages]
        if status is not None:
            cmd[1:1] = ["-o", f"Dir::State::status={status}"]
        with trio.fail_after(APT_TIMEOUT_S):
            try:
                out = await run(cmd, env=self._env)
            except BuildError as e:
                raise PackageError(_apt_reason(str(e), packages, self.archive.name)) from e
        text = out.decode(errors="replace")
        added = []
        replaced = []
        for name, old, new, arch in _INST_RE.findall(text):
            if old:
                replaced.append(f"{name} {old} -> {new}")
            added.append(Resolved(name, new, arch))
        if replaced:
            raise PackageError(
                f"{', '.join(packages)} does not fit this {self.archive.name} build: it needs "
                f"installed packages replaced ({'; '.join(replaced)}); rebuild the OS"
            )
        return sorted(added)

    async def download(self, packages: Iterable[Resolved], into: Path) -> list[Path]:
        """The .deb of each package in ``into``, downloading those not there yet."""
        wanted = sorted(set(packages))
        missing = [p for p in wanted if not (into / p.deb_name).is_file()]
        if missing:
            with trio.fail_after(DOWNLOAD_TIMEOUT_S):
                await run(
                    ["apt-get", "download", "-q", *map(str, missing)],
                    cwd=into,
                    env=self._env,
                    what="apt-get download",
                )
        paths = [into / p.deb_name for p in wanted]
        if absent := [p.name for p in paths if not p.is_file()]:
            raise BuildError(f"apt-get download did not leave {', '.join(absent)} in {into}")
        return paths


@asynccontextmanager
async def _flock(path: Path) -> AsyncIterator[None]:
    """An exclusive lock between processes. Polled, because a thread blocked in flock could
    not be cancelled; the caller's deadline bounds the wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await trio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_if_changed(path: Path, text: str) -> None:
    """Another build process may be running apt with this file: never let it see half of it."""
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _apt_reason(error: str, packages: Sequence[str], archive: str) -> str:
    m = re.search(r"Unable to locate package (\S+)", error)
    if m:
        return f"package {m[1]} is not in the {archive} archive"
    m = re.search(r"Package '?(\S+?)'? has no installation candidate", error)
    if m:
        return f"package {m[1]} has no installable version in the {archive} archive"
    if "nmet dependencies" in error:
        return (
            f"{', '.join(packages)} does not fit this {archive} build (unmet dependencies; "
            f"rebuild the OS if the archive moved on): {error}"
        )
    return f"cannot install {', '.join(packages)} on {archive}: {error}"
