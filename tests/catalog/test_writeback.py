"""catalog.writeback: the early-writeback hint is available here and never fails a write."""

from __future__ import annotations

import os
from pathlib import Path

from catalog import writeback


def test_available_here() -> None:  # vmlend runs on Linux (libvirt, QEMU)
    assert writeback.available()


def test_start_writeback_then_fsync_keeps_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        writeback.start_writeback(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_a_hint_the_kernel_refuses_is_ignored() -> None:
    read, write = os.pipe()  # sync_file_range on a pipe fails with ESPIPE
    try:
        writeback.start_writeback(write)
    finally:
        os.close(read)
        os.close(write)
