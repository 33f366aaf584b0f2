"""The tiny OS's pure parts: the newc writer, module ordering input, initramfs determinism."""

from __future__ import annotations

import random
import stat
import subprocess
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from worker_role.tinyos import _cpio
from worker_role.tinyos._build import build_initramfs


def _members(archive: bytes) -> list[tuple[str, int, bytes]]:
    out, pos = [], 0
    while True:
        hdr = archive[pos : pos + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        assert fields[2] == fields[3] == fields[5] == 0  # uid, gid, mtime fixed
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        data = archive[pos : pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            assert len(archive) % 512 == 0
            return out
        out.append((name, mode, data))


NAMES = st.text("abcdefgh", min_size=1, max_size=6)


@given(st.dictionaries(NAMES, st.binary(max_size=40), min_size=1, max_size=8), st.randoms())
def test_newc_is_order_independent_and_round_trips(
    files: dict[str, bytes], rnd: random.Random
) -> None:
    entries = [_cpio.directory("d")] + [_cpio.regular(f"d/{n}", b) for n, b in files.items()]
    shuffled = entries[:]
    rnd.shuffle(shuffled)
    archive = _cpio.write_newc(entries)
    assert archive == _cpio.write_newc(shuffled)
    members = _members(archive)
    assert [m[0] for m in members] == sorted(m[0] for m in members)
    assert {n: d for n, _, d in members if n != "d"} == {f"d/{n}": b for n, b in files.items()}


def test_cpio_tool_reads_our_archive(tmp_path: Path) -> None:
    archive = _cpio.write_newc(
        [
            _cpio.directory("bin"),
            _cpio.regular("bin/tool", b"#!/bin/sh\n", executable=True),
            _cpio.symlink("bin/sh", "busybox"),
            _cpio.chardev("console", 5, 1),
        ]
    )
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    for expected in ("bin/sh -> busybox", "bin/tool", "console"):
        assert expected in listing


def test_initramfs_is_a_pure_function_of_its_inputs() -> None:
    mods = [("virtio", b"\x7fELF-a"), ("virtio_blk", b"\x7fELF-b")]
    a = build_initramfs(b"busybox-bytes", b"#!/bin/sh\n", mods)
    assert a == build_initramfs(b"busybox-bytes", b"#!/bin/sh\n", mods)
    members = {n: (m, d) for n, m, d in _members(a)}
    assert members["init"][0] & 0o111
    assert stat.S_ISREG(members["init"][0])
    assert members["lib/modules/load-order"][1] == b"virtio.ko\nvirtio_blk.ko\n"
    assert stat.S_ISCHR(members["dev/console"][0])
    assert a != build_initramfs(b"busybox-bytes", b"#!/bin/sh\n", mods[::-1])  # order is content
