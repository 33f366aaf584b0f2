"""The library on a real sqlite file: verified inserts only, idempotent, lookups, persistence."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from catalog.entries import TrustPolicy
from catalog.errors import (
    AmbiguousEntryError,
    EntrySignatureError,
    UnknownEntryError,
    UntrustedPublisherError,
)
from catalog.library import Library
from tests.catalog_entries.helpers import (
    NOW,
    OTHER_PUBLISHER,
    PUBLISHER,
    os_entry,
    package_entry,
    tampered,
)

POLICY = TrustPolicy({PUBLISHER.public_bytes})


@pytest.fixture
async def library(tmp_path: Path) -> AsyncIterator[Library]:
    async with Library.open(tmp_path, POLICY) as lib:
        yield lib


async def test_insert_is_idempotent_and_lookups_find_the_entry(library: Library) -> None:
    entry = os_entry()
    assert await library.insert(entry) is True
    assert await library.insert(entry) is False
    assert len(library) == 1
    assert entry.id in library
    assert await library.get(entry.id) == entry
    assert await library.find("os", "tiny") == entry
    assert await library.find("os", "tiny", "1") == entry
    assert await library.resolve(entry.id[:10]) == entry
    assert await library.resolve("tiny@1") == entry
    with pytest.raises(UnknownEntryError):
        await library.find("os", "tiny", "2")
    with pytest.raises(UnknownEntryError):
        await library.get("0" * 64)


async def test_latest_is_the_newest_created_at(library: Library) -> None:
    old = os_entry(version="1", now=NOW)
    new = os_entry(version="2", now=NOW + 60)
    await library.insert_many([new, old])
    assert await library.find("os", "tiny") == new
    assert await library.resolve("tiny") == new
    assert await library.resolve("tiny@1") == old
    assert [e.version for e in await library.list_entries("os")] == ["2", "1"]


async def test_list_filters_by_kind_and_names_are_resolved_across_kinds(library: Library) -> None:
    await library.insert_many([os_entry(), package_entry("python3"), package_entry("tiny")])
    assert [e.name for e in await library.list_entries("package")] == ["python3", "tiny"]
    assert len(await library.list_entries()) == 3
    with pytest.raises(AmbiguousEntryError, match="kinds os, package"):
        await library.resolve("tiny")
    assert (await library.resolve("tiny", kind="package")).kind == "package"


async def test_nothing_unverified_or_untrusted_ever_enters(library: Library) -> None:
    good = os_entry()
    with pytest.raises(EntrySignatureError):
        await library.insert(tampered(good, version="9"))
    with pytest.raises(UntrustedPublisherError, match="not trusted by this scheduler"):
        await library.insert(os_entry(identity=OTHER_PUBLISHER))
    # One bad entry in a batch: the whole batch is refused.
    with pytest.raises(EntrySignatureError):
        await library.insert_many([good, tampered(good, name="evil")])
    assert len(library) == 0
    assert await library.list_entries() == []


async def test_entries_survive_a_reopen(tmp_path: Path) -> None:
    entry = package_entry("python3")
    async with Library.open(tmp_path, POLICY) as lib:
        await lib.insert(entry)
    async with Library.open(tmp_path, POLICY) as lib:
        assert entry.id in lib
        assert await lib.get(entry.id) == entry
        assert lib.index.root() != type(lib.index)().root()


async def test_wait_for_returns_when_the_entry_arrives(library: Library) -> None:
    entry = os_entry()
    got: list[str] = []

    async def waiter() -> None:
        await library.wait_for(entry.id)
        got.append(entry.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await library.insert(package_entry("unrelated"))
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        with trio.fail_after(5):
            await library.insert(entry)
    assert got == [entry.id]
    with trio.fail_after(1):
        await library.wait_for(entry.id)  # already there: returns at once
