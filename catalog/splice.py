"""Move a counted number of bytes from a socket into a file without copying them through
Python (Linux ``splice``), and hash a file through a mapping of its pages.

Why: a fetcher's reader thread received each chunk into a Python buffer and wrote it to its
spool file: two copies of every byte plus a buffer per chunk. With ``splice`` the socket's
pages move into a pipe and from there into the file's page cache: one copy, no buffer. The
chunk is then hashed where it lies, through a read-only mapping of those cached pages.
Where ``splice`` is missing, :data:`AVAILABLE` is False and callers receive into memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable

import blake3

from catalog.chunking import ChunkId
from catalog.errors import SpoolWriteError
from node.errors import StreamBrokenError

AVAILABLE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
PIPE_SIZE = 1 << 20  # the default limit for unprivileged pipes (/proc/sys/fs/pipe-max-size)
_READ_PIECE = 1 << 20


class Splicer:
    """A pipe through which counted bytes go from a socket to files. One per reader thread;
    not thread-safe. Close it when done."""

    def __init__(self) -> None:
        self._out, self._in = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only means more, smaller moves
            fcntl.fcntl(self._in, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def close(self) -> None:
        os.close(self._out)
        os.close(self._in)

    def move(self, sock: int, file: int, length: int, idle: Callable[[], None]) -> None:
        """Move exactly ``length`` bytes from ``sock`` (blocking, with a receive timeout) to
        ``file`` at its position. ``idle`` is called each time the socket's timeout passed
        with nothing to read (to check for a cancel, say; it may raise).

        Raises StreamBrokenError if the socket ends or fails first, SpoolWriteError if the
        file fails (the pipe is left empty either way)."""
        received = written = 0
        while written < length:
            if received == written:
                try:
                    count = os.splice(sock, self._in, min(length - received, PIPE_SIZE))
                except BlockingIOError:
                    idle()
                    continue
                except OSError as e:
                    raise StreamBrokenError(f"data channel: {e}") from e
                if count == 0:
                    raise StreamBrokenError(f"data channel: EOF after {received} of {length} bytes")
                received += count
            try:
                written += os.splice(self._out, file, received - written)
            except OSError as e:
                salvaged = self._salvage(file, written, received - written)
                raise SpoolWriteError(e, salvaged, length - received) from e

    def _salvage(self, file: int, written: int, in_pipe: int) -> bytes:
        """What was taken off the socket: the file's first ``written`` bytes and the pipe's."""
        try:
            pieces = [os.pread(file, written, 0)] if written else []
            while in_pipe:
                piece = os.read(self._out, in_pipe)
                pieces.append(piece)
                in_pipe -= len(piece)
        except OSError as e:  # the bytes are lost, and the answer with them
            raise StreamBrokenError(f"data channel: a received chunk was lost: {e}") from e
        return b"".join(pieces)


def hash_file(fd: int, length: int) -> ChunkId:
    """blake3 of the first ``length`` bytes of the open file ``fd`` (opened for reading).

    Through a read-only mapping: no copy of the bytes into Python. The file must not shrink
    meanwhile (reading a mapped page past the end is SIGBUS): callers hash their own fresh,
    private temp files only."""
    hasher = blake3.blake3()
    if length:
        try:
            with mmap.mmap(fd, length, prot=mmap.PROT_READ) as pages:
                hasher.update(pages)
        except OSError:  # no mapping to be had (out of address space, say): read it instead
            hasher = blake3.blake3()
            for offset in range(0, length, _READ_PIECE):
                hasher.update(os.pread(fd, min(_READ_PIECE, length - offset), offset))
    return ChunkId(hasher.digest())


__all__ = ["AVAILABLE", "Splicer", "hash_file"]
