"""What every build step shares: running a tool, squashing a tree reproducibly, hashing inputs.

Every subprocess goes through :func:`run`, which maps a failure to :class:`BuildError` with the
tool's own words; deadlines are the callers' (``with trio.fail_after(...)`` around the call), as
everywhere in vmlend.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from catalog.errors import BuildError

# Every timestamp inside a layer: squashfs, tar and mmdebstrap all take it, so two builds of the
# same inputs on different days give the same bytes. 2023-11-14, any fixed value would do.
SOURCE_DATE_EPOCH = 1700000000
SQUASHFS_TIMEOUT_S = 600.0
# Fixed compression and options: they are part of what makes a layer's bytes, so they are part
# of every cache key (digest). zstd because a guest under TCG decompresses it several times
# faster than xz; level 9 because it squashes debian-12 8x faster than the default 15 (2 s vs
# 17 s of CPU here) for a layer 7% larger.
_MKSQUASHFS_OPTS = (
    "-noappend",
    "-quiet",
    "-no-progress",
    "-reproducible",
    "-no-xattrs",
    "-comp",
    "zstd",
    "-Xcompression-level",
    "9",
    "-b",
    "131072",
    "-mkfs-time",
    str(SOURCE_DATE_EPOCH),
    "-all-time",
    str(SOURCE_DATE_EPOCH),
)


async def run(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> bytes:
    """Run ``cmd``; its stdout, or :class:`BuildError` with the end of its stderr."""
    argv = [str(c) for c in cmd]
    try:
        proc = await trio.run_process(
            argv,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            stdin=b"",
        )
    except OSError as e:
        raise BuildError(f"cannot run {argv[0]} (is it installed?): {e}") from e
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise BuildError(f"{what or ' '.join(argv[:3])} failed ({proc.returncode}): {tail}")
    return bytes(proc.stdout)


async def squash(tree: Path, out: Path, *, all_root: bool) -> None:
    """``tree`` as a squashfs image at ``out``: the same tree gives the same bytes.

    ``all_root`` makes every file root's (for trees a user made: their uid means nothing in a
    guest); a root file system keeps the owners its packages gave it.
    """
    opts = [*_MKSQUASHFS_OPTS, *(["-all-root"] if all_root else [])]
    with trio.fail_after(SQUASHFS_TIMEOUT_S):
        await run(["mksquashfs", tree, out, *opts], what=f"mksquashfs of {tree}")
    await trio.Path(out).chmod(0o644)


def digest(*parts: Any) -> str:
    """A stable hex key of JSON-able ``parts`` (the cache key of a build step)."""
    text = json.dumps(
        [_MKSQUASHFS_OPTS, *parts], sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()


def tree_digest(root: Path) -> str:
    """A key of a file tree: paths, types, exec bits, link targets and contents (not owners or
    times, which squash/-all-root/-all-time drop anyway). Raises OSError for the caller to map."""
    h = hashlib.sha256()
    entries = [root] if not root.is_dir() or root.is_symlink() else sorted(_walk(root))
    for path in entries:
        rel = "." if path == root else path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
        elif stat.S_ISDIR(st.st_mode):
            h.update(f"D {rel}\n".encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(f"F {rel} {int(bool(st.st_mode & 0o111))} {_file_sha256(path)}\n".encode())
        else:
            raise BuildError(f"{path}: only files, directories and symlinks can go in a layer")
    return h.hexdigest()


def normalize_modes(root: Path) -> None:
    """Directories 0755, files 0755 or 0644 by their owner's exec bit: the modes a user's tree
    happens to have (umask, a chmod 700) must not change a layer's bytes; tree_digest ignores
    them too."""
    root.chmod(0o755)
    for path in _walk(root):
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            path.chmod(0o755)
        elif stat.S_ISREG(st.st_mode):
            path.chmod(0o755 if st.st_mode & 0o111 else 0o644)


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        out += [base / d for d in dirnames] + [base / f for f in filenames]
    return out


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish_dir(staging: Path, final: Path) -> None:
    """Make ``staging`` appear as ``final`` at once (readers never see a half-built result). If
    another build published the same key first, keep theirs: same key, same bytes."""
    public_dirs(staging)
    try:
        staging.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def public_dirs(path: Path) -> None:
    """QEMU runs as libvirt-qemu: it must traverse every directory above a layer it boots."""
    path.chmod(0o755)


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    tmp.chmod(0o644)
    tmp.replace(path)


def read_json(path: Path) -> Any:
    """The JSON at ``path``, or None when it is missing or damaged (then it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
