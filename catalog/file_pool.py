"""Empty files kept for reuse: the chunk store recycles the files of the chunks it deletes as
the temp files of the chunks it writes next.

Why: the store writes one file per chunk (a 512 MiB fetch creates ~420) and gc deletes one per
chunk. On this machine kind (ext4 without a journal) creating a file cost ~150 us when many
inodes had been freed in the last minute (ext4 then skips each such inode, reading its inode
table block, on every allocation); renaming an existing empty file into place costs ~9 us
(measured here: 422 files in 64 ms vs 3.7 ms). Databases recycle their log segments for the
same reason. Pooled files are emptied, so they hold no disk blocks and no data; the
pool's directory is inside the store, readable by its owner only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
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

    def keep(self, path: Path) -> bool:
        """Blocking: pool a file that is no longer needed (moved here, then emptied); False if
        the pool is full or the file cannot be moved (the caller deletes it then). The caller
        makes sure nobody has it open: its next user gets a file whose bytes change under it.
        """
        with self._lock:
            if len(self._names) >= self._limit:
                return False
        name = secrets.token_hex(8)
        try:
            os.rename(path, self.directory / name)
        except FileNotFoundError:
            return True  # already gone: nothing to delete either
        except OSError:
            return False
        with contextlib.suppress(OSError):  # kept anyway: take() opens it with O_TRUNC
            os.truncate(self.directory / name, 0)
        with self._lock:
            self._names.append(name)
        return True


__all__ = ["POOL_LIMIT", "FilePool"]
