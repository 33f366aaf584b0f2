"""Comparing the chunk store's index with its files, in a worker thread (these block): after
a crash, to finish what it interrupted (:func:`recover_files`), and on request, to report what
does not match (:func:`check_files`). The invariants they restore are described in
:mod:`catalog.chunk_store`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from catalog.chunk_files import chunk_path, read_chunk
from catalog.chunk_index import PRESENT, WRITING
from catalog.chunking import ChunkId
from catalog.errors import ChunkCorruptError, MissingChunkError


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What :meth:`~catalog.chunk_store.ChunkStore.check` found; ``ok`` when every list is empty."""

    missing_files: list[str] = field(default_factory=list)  # rows PRESENT without a file
    stray_files: list[str] = field(default_factory=list)  # files without a row
    corrupt: list[str] = field(default_factory=list)  # files whose bytes do not match
    unfinished_rows: list[str] = field(default_factory=list)  # rows WRITING/DELETING
    temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        lists = (self.missing_files, self.stray_files, self.corrupt, self.unfinished_rows)
        return not any(lists) and not self.temp_files


def recover_files(root: Path, rows: list[tuple[bytes, int]]) -> dict[ChunkId, bool]:
    """For each (id, state) row a crash left WRITING or DELETING: whether its chunk is whole
    and stays (True), or its file, if any, is deleted and the row must go (False)."""
    verdicts: dict[ChunkId, bool] = {}
    for raw_id, state in rows:
        chunk_id = ChunkId(raw_id)
        path = chunk_path(root, chunk_id)
        if state == WRITING:
            # The rename is atomic, so a file here is whole; verify anyway since it is cheap.
            with contextlib.suppress(MissingChunkError, ChunkCorruptError):
                read_chunk(root, chunk_id, verify=True)
                verdicts[chunk_id] = True
                continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        verdicts[chunk_id] = False
    return verdicts


def check_files(root: Path, rows: list[tuple[bytes, int]], verify: bool) -> CheckReport:
    """Compare the (id, state) rows of the index with the files under ``root`` (and, with
    ``verify``, every chunk's bytes with its ID)."""
    report = CheckReport()
    indexed = {bytes(raw).hex(): state for raw, state in rows}
    on_disk: set[str] = set()
    for sub in root.iterdir():
        if sub.is_dir() and len(sub.name) == 2:
            on_disk.update(p.name for p in sub.iterdir())
    tmp = root / "tmp"
    if tmp.exists():
        report.temp_files.extend(p.name for p in tmp.iterdir())
    for name, state in indexed.items():
        if state != PRESENT:
            report.unfinished_rows.append(name)
        elif name not in on_disk:
            report.missing_files.append(name)
        elif verify:
            try:
                read_chunk(root, ChunkId(bytes.fromhex(name)), verify=True)
            except ChunkCorruptError:
                report.corrupt.append(name)
    report.stray_files.extend(sorted(on_disk - indexed.keys()))
    return report
