"""The scrubber on a real chunk store: it finds rot and lost files, paced, on schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from catalog.chunk_store import ChunkStore
from catalog.scrubber import Scrubber
from tests.catalog.conftest import random_bytes


async def test_a_pass_quarantines_rot_and_forgets_lost_files(store: ChunkStore) -> None:
    good, rotten, lost = [await store.put(random_bytes(4000, i)) for i in range(3)]
    path = store.path_of(rotten)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    store.path_of(lost).unlink()
    found = await Scrubber(store, interval=0, rate=0).scrub_once()
    assert (found.checked, found.bytes_read, found.corrupt, found.missing) == (3, 12000, 1, 1)
    assert await store.present([good, rotten, lost]) == {good}  # the others can be fetched again
    assert (store.root / "corrupt" / rotten.hex()).exists()  # kept aside for a look
    assert (await store.check()).ok


async def test_a_pass_reads_at_most_rate_bytes_a_second(
    store: ChunkStore, autojump_clock: trio.testing.MockClock
) -> None:
    for i in range(4):
        await store.put(random_bytes(5000, i))
    began = trio.current_time()
    found = await Scrubber(store, interval=0, rate=1000).scrub_once()
    assert found.bytes_read == 20000
    assert 20 <= trio.current_time() - began < 21


async def test_passes_come_every_interval_and_zero_means_never(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with ChunkStore.open(tmp_path / "chunks") as store, trio.open_nursery() as nursery:
        chunk_id = await store.put(b"some bytes")
        never = Scrubber(store, interval=0, rate=0)
        await nursery.start(never.run)  # returns at once: no pass is ever due
        scrubber = Scrubber(store, interval=3600, rate=0)
        began = trio.current_time()
        await nursery.start(scrubber.run)
        first = await scrubber.next_pass()
        assert first.checked == 1
        assert 3600 <= trio.current_time() - began < 3601
        store.path_of(chunk_id).write_bytes(b"rotted bytes")
        second = await scrubber.next_pass()
        assert second.corrupt == 1
        assert 7200 <= trio.current_time() - began < 7201
        assert never.last is None
        nursery.cancel_scope.cancel()


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="interval"):
        Scrubber(None, interval=-1, rate=0)  # type: ignore[arg-type]


async def test_a_restarted_node_keeps_the_schedule(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    wall = [1_000_000.0]  # the wall clock, moved by hand alongside trio's
    stamp = tmp_path / "chunks" / "scrubbed"

    async def first_pass_after_a_start(store: ChunkStore) -> float:
        """Start a scrubber (a node starting); seconds until its first pass is done."""
        scrubber = Scrubber(store, interval=3600, rate=0, wall_clock=lambda: wall[0])
        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            await nursery.start(scrubber.run)
            await scrubber.next_pass()
            nursery.cancel_scope.cancel()
        return trio.current_time() - began

    async with ChunkStore.open(tmp_path / "chunks") as store:
        await store.put(b"some bytes")
        assert 3600 <= await first_pass_after_a_start(store) < 3601  # none recorded yet
        assert float(stamp.read_text()) == wall[0]
        wall[0] += 3000  # restarted 3000 s after that pass: the next is due 600 s later
        assert 600 <= await first_pass_after_a_start(store) < 601
        stamp.write_text(f"{wall[0] + 10**6}\n")  # from the future: the clock was set back
        assert 3600 <= await first_pass_after_a_start(store) < 3601  # counts as just now
