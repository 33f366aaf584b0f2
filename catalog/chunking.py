"""Content-defined chunking (FastCDC) and chunk IDs (blake3).

Why FastCDC: a new version of a VM layer differs from the old one in a few places, and
content-defined cut points move with the content, so an insertion shifts only the chunks around it
instead of every chunk after it (as fixed-size splitting would). Why pyfastcdc: its Cython core cuts
~2.4 GB/s on one core here, blake3 hashes ~5 GB/s, both far above disk and network rates; see
``bench/chunking.py``.

The chunking parameters are part of the format: the same bytes must give the same chunks on every
node, or dedup across nodes is lost. Changing :data:`DEFAULT_PARAMS` is a format change.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, NewType

import blake3
from pyfastcdc import FastCDC

KIB = 1024
MIB = 1024 * KIB

ChunkId = NewType("ChunkId", bytes)
"""The 32-byte blake3 digest of a chunk's bytes."""

ID_SIZE = 32

MAX_CHUNK_SIZE = 4 * MIB
"""No chunk is ever bigger: every frame, buffer and manifest check relies on it."""


def hash_chunk(data: bytes | bytearray | memoryview) -> ChunkId:
    """The ID of a chunk: blake3 of its bytes, so a fetched chunk verifies itself."""
    return ChunkId(blake3.blake3(data).digest())


class HashedChunk(NamedTuple):
    """Bytes received for a chunk and their blake3, computed by this process off the event loop
    (never a digest taken from a peer): the transfer plan compares ``digest`` with the ID it
    asked for instead of hashing the bytes again."""

    data: bytes
    digest: ChunkId


class SpooledChunk(NamedTuple):
    """Bytes received for a chunk, already written to a temp file of the chunk store (not yet
    fsynced or named), with the blake3 computed here before they were written."""

    path: Path
    size: int
    digest: ChunkId

    def discard(self) -> None:
        """Delete the file (a chunk that will not be adopted)."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkParams:
    """FastCDC size parameters, in bytes (``avg_size`` is FastCDC's target before min skipping)."""

    # Borg's defaults (restic's average is 1 MiB): each chunk costs a request, a spool file
    # and an index row, so a 2 MiB average fetches ~17 % faster than 1 MiB (bench/transfer,
    # 512 MiB), for coarser dedup (ten 1 % edits move 16.9 % of a blob, not 14.2 %).
    min_size: int = 512 * KIB
    avg_size: int = 2 * MIB
    max_size: int = MAX_CHUNK_SIZE

    def __post_init__(self) -> None:
        # The ranges pyfastcdc accepts, and our own frame limit on the maximum.
        if not 64 <= self.min_size <= MIB:
            raise ValueError(f"min_size must be in [64, {MIB}], got {self.min_size}")
        if not 256 <= self.avg_size <= 4 * MIB:
            raise ValueError(f"avg_size must be in [256, {4 * MIB}], got {self.avg_size}")
        if not 1024 <= self.max_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"max_size must be in [1024, {MAX_CHUNK_SIZE}], got {self.max_size}")
        if not self.min_size <= self.avg_size <= self.max_size:
            raise ValueError("need min_size <= avg_size <= max_size")


DEFAULT_PARAMS = ChunkParams()


class Chunker:
    """Cuts bytes or files into chunks. Not thread-safe: use one per operation (they are cheap)."""

    def __init__(self, params: ChunkParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._cdc = FastCDC(
            params.avg_size, min_size=params.min_size, max_size=params.max_size, seed=0
        )

    def cut(self, data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
        """Yield the chunks of ``data`` as views into it, in order."""
        for chunk in self._cdc.cut_buf(data):
            yield chunk.data

    def boundaries(self, data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
        """``(offset, length)`` of each chunk of ``data``."""
        return [(chunk.offset, chunk.length) for chunk in self._cdc.cut_buf(data)]

    def cut_file(self, path: Path) -> Generator[bytes, None, None]:
        """Yield the chunks of the file at ``path`` as ``bytes``, reading it as a stream.

        Blocking: iterate it in a worker thread. Not mmap (pyfastcdc's ``cut_file``), although
        that is ~2x faster: a file truncated by someone else while mapped kills the process with
        SIGBUS, and the node must survive whatever a user does to a file being added.
        """
        with path.open("rb", buffering=0) as stream:
            for chunk in self._cdc.cut_stream(stream):
                # The view is only valid until the next chunk is cut; callers batch chunks.
                yield bytes(chunk.data)
