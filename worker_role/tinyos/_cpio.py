"""A reproducible cpio "newc" writer: sorted entries, fixed inodes, mtimes and owners."""

from __future__ import annotations

import stat
from dataclasses import dataclass

_MAGIC = b"070701"


@dataclass(frozen=True, slots=True)
class Entry:
    """One archive member: ``path`` without a leading slash, ``data`` the body or link target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(
    ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], namesize: int
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return _MAGIC + b"".join(b"%08X" % f for f in fields)


def write_newc(entries: list[Entry]) -> bytes:
    """Serialise ``entries`` sorted by path, so parents come before children and order is stable."""
    out = bytearray()
    seen: set[str] = set()
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.path), start=1):
        if entry.path in seen or entry.path.startswith("/"):
            raise ValueError(f"bad or duplicate cpio path {entry.path!r}")
        seen.add(entry.path)
        name = entry.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        hdr = _header(ino, entry.mode, nlink, len(entry.data), entry.rdev, len(name))
        out += hdr + name + _pad4(len(hdr) + len(name))
        out += entry.data + _pad4(len(entry.data))
    trailer = b"TRAILER!!!\0"
    hdr = _header(0, 0, 1, 0, (0, 0), len(trailer))
    out += hdr + trailer + _pad4(len(hdr) + len(trailer))
    # The kernel reads the archive in 512-byte blocks, as cpio(1) pads it.
    out += b"\0" * ((512 - len(out) % 512) % 512)
    return bytes(out)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def regular(path: str, data: bytes, *, executable: bool = False) -> Entry:
    return Entry(path, stat.S_IFREG | (0o755 if executable else 0o644), data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int) -> Entry:
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))
