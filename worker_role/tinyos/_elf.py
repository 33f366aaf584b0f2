"""Just enough ELF reading: a kernel module's ``.modinfo`` and the vmlinux inside a bzImage."""

from __future__ import annotations

import lzma
import struct

from worker_role.errors import TinyOsError

_XZ_MAGIC = b"\xfd7zXZ\x00"


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a 64-bit little-endian module's ``.modinfo`` section."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise TinyOsError("not a 64-bit little-endian ELF module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize
        )
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = ko.index(b"\0", stroff + name_off)
        if ko[stroff + name_off : end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in ko[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise TinyOsError("module has no .modinfo section")


def vmlinux_from_bzimage(bzimage: bytes) -> bytes:
    """Decompress the xz payload of a bzImage: the ELF vmlinux, which QEMU boots through PVH.

    Skipping the in-guest decompression saves seconds per boot under TCG.
    """
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        raise TinyOsError("bzImage has no xz payload (is the kernel built with CONFIG_KERNEL_XZ?)")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = decoder.decompress(bzimage[start:])
    except lzma.LZMAError as e:
        raise TinyOsError(f"bzImage payload does not decompress: {e}") from e
    if not decoder.eof or elf[:4] != b"\x7fELF":
        raise TinyOsError("bzImage payload is not a complete ELF vmlinux")
    return elf
