"""Empty files kept for reuse: the chunk store recycles the files of the chunks it deletes as
the temp files of the chunks it writes next.

Why: the store writes one file per chunk (a 512 MiB fetch creates ~420) and gc deletes one per
chunk. On this machine kind (ext4 without a journal) creating a file cost ~150 us when many
inodes had been freed in the last minute (ext4 then skips each such inode, reading its inode
table block, on every allocation); renaming an existing empty file into place costs ~9 us
(measured here: 422 files in 64 ms vs 3.7 ms). Databases recycle their log segments for the
same reason. Only empty files are kept, so a pooled file holds no disk blocks and no data;
the pool's directory is inside the store, readable by its owner only.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

POOL_LIMIT = 4096  # files kept at most (inodes only: they are empty)


class FilePool:
    """A directory of empty files; thread-safe. Call :meth:`load` (blocking) before use."""

    def __init__(self, directory: Path, limit: int = POOL_LIMIT) -> None:
        self.directory = directory
        self._limit = limit
        self._names: list[str] = []
        self._lock = threading.Lock()

    def load(self) -> None:
        """Blocking: create the directory, or take stock of the files a previous run left."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        with self._lock:
            self._names = [entry.name for entry in os.scandir(self.directory)]

    def __len__(self) -> int:
        return len(self._names)

    def take(self, path: Path) -> int | None:
        """Blocking: move a pooled file to ``path`` (which must not exist) and open it for
        reading and writing; None if the pool is empty."""
        while True:
            with self._lock:
                if not self._names:
                    return None
                name = self._names.pop()
            try:
                os.rename(self.directory / name, path)
            except FileNotFoundError:  # someone removed it: try the next one
                continue
            try:
                # O_TRUNC only in case someone wrote to it in the pool: pooled files are empty.
                return os.open(path, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC)
            except BaseException:
                path.unlink(missing_ok=True)
                raise

    def keep(self, paths: Iterable[Path]) -> list[Path]:
        """Blocking: empty files that are no longer needed and pool them, up to the limit;
        return those not pooled (the caller deletes them). A file that cannot be emptied or
        moved is returned too."""
        rest: list[Path] = []
        for path in paths:
            with self._lock:
                full = len(self._names) >= self._limit
            if full:
                rest.append(path)
                continue
            name = secrets.token_hex(8)
            try:
                os.truncate(path, 0)
                os.rename(path, self.directory / name)
            except FileNotFoundError:
                continue
            except OSError:
                rest.append(path)
                continue
            with self._lock:
                self._names.append(name)
        return rest


__all__ = ["POOL_LIMIT", "FilePool"]
