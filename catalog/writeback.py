"""Start a file's writeback to disk without waiting for it (Linux ``sync_file_range``).

Why: the chunk store fsyncs every chunk before it names it. Written first and fsynced later, a
batch's bytes all sit dirty in the page cache until the fsyncs, which then wait for the whole
batch at once; and a long transfer piles up dirty pages until the kernel throttles the writer.
Asking for writeback as soon as a file is written keeps the disk busy while the next chunks
arrive, so the later fsync finds little left to do (measured here: 512 MiB of ~1 MiB chunk files
durable in 0.36-0.51 s this way, 0.75-1.3 s with write-all-then-fsync).

Python's ``os`` has no ``sync_file_range``; it is called through ctypes. Where it is missing
(not Linux, or a libc without it) this is a no-op and fsync alone does the work, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_sync_file_range = _load()


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now. Best effort: an error here only
    means the later fsync does all the work, and that fsync reports any real I/O error."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


def available() -> bool:
    return _sync_file_range is not None


__all__ = ["available", "start_writeback"]
