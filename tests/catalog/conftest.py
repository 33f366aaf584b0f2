from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from catalog.blob import BlobStore
from catalog.chunk_store import ChunkStore
from catalog.chunking import KIB, ChunkParams

# Small chunks keep tests fast while still giving many chunks per blob.
SMALL = ChunkParams(min_size=1 * KIB, avg_size=4 * KIB, max_size=16 * KIB)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    async with ChunkStore.open(tmp_path / "chunks") as s:
        yield s


@pytest.fixture
def blobs(store: ChunkStore) -> BlobStore:
    return BlobStore(store, params=SMALL, batch_bytes=64 * KIB)
