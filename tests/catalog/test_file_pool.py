"""The pool of recycled empty files, on a real directory."""

from __future__ import annotations

import os
from pathlib import Path

from catalog.file_pool import FilePool


def files(directory: Path, count: int, size: int = 1000) -> list[Path]:
    directory.mkdir(exist_ok=True)
    paths = [directory / f"f{i}" for i in range(count)]
    for path in paths:
        path.write_bytes(b"x" * size)
    return paths


def test_kept_files_come_back_empty_and_writable(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "free")
    pool.load()
    assert pool.take(tmp_path / "none") is None  # empty pool: the caller creates a file
    doomed = files(tmp_path / "old", 3)
    inodes = {p.stat().st_ino for p in doomed}
    assert all(pool.keep(p) for p in doomed)
    assert not any(p.exists() for p in doomed)
    assert [p.stat().st_size for p in (tmp_path / "free").iterdir()] == [0, 0, 0]
    taken = tmp_path / "new"
    fd = pool.take(taken)
    assert fd is not None
    try:
        os.write(fd, b"fresh")
        assert os.pread(fd, 10, 0) == b"fresh"
    finally:
        os.close(fd)
    assert taken.stat().st_ino in inodes  # the same file, recycled
    assert taken.read_bytes() == b"fresh"
    assert len(pool) == 2


def test_the_pool_keeps_at_most_its_limit(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "free", limit=2)
    pool.load()
    doomed = files(tmp_path / "old", 5)
    assert [pool.keep(p) for p in doomed] == [True, True, False, False, False]
    assert all(p.exists() for p in doomed[2:])  # the caller deletes these
    assert len(pool) == 2


def test_a_new_pool_finds_the_files_a_previous_run_kept(tmp_path: Path) -> None:
    first = FilePool(tmp_path / "free")
    first.load()
    for path in files(tmp_path / "old", 2):
        first.keep(path)
    again = FilePool(tmp_path / "free")
    again.load()
    assert len(again) == 2
    fd = again.take(tmp_path / "t")
    assert fd is not None
    os.close(fd)


def test_files_removed_from_the_pool_behind_its_back_are_skipped(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "free")
    pool.load()
    for path in files(tmp_path / "old", 2):
        pool.keep(path)
    victim = next((tmp_path / "free").iterdir())
    victim.unlink()
    fd = pool.take(tmp_path / "t")
    assert fd is not None  # the other one
    os.close(fd)
    assert pool.take(tmp_path / "u") is None
    assert pool.keep(tmp_path / "never-existed")  # already gone: nothing left to delete
    assert len(pool) == 0
