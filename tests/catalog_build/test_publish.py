"""``vmlend image build --publish``: the build's os, package and image entries enter the catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from catalog.blob import BlobStore, parse_blob_id
from catalog.build import BootFiles
from catalog.chunk_store import ChunkStore
from catalog.service import open_catalog
from node.cli import main
from node.identity import Identity

EXAMPLES = Path(__file__).parents[2] / "examples"


def _argv(data: Path, cache: Path, *extra: str) -> list[str]:
    argv = ["image", "build", str(EXAMPLES / "hello.toml"), "--data", str(data)]
    return [*argv, "--cache", str(cache), "--json", *extra]


async def _entries(data: Path) -> list[tuple[str, str, str, dict[str, str]]]:
    async with open_catalog(data, Identity.load_or_create(data), []) as catalog:
        entries = await catalog.library.list_entries()
    return sorted((e.kind, e.name, e.id, dict(e.blobs)) for e in entries)


def test_build_without_publish_leaves_the_catalog_empty(
    tmp_path: Path, boot: BootFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(tmp_path / "data", tmp_path / "cache")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "published" not in summary
    assert not (tmp_path / "data" / "catalog.db").exists()


async def test_publish_signs_os_and_image_entries_once(
    tmp_path: Path, boot: BootFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    argv = _argv(data, cache, "--publish")
    assert await trio.to_thread.run_sync(main, argv) == 0
    first = json.loads(capsys.readouterr().out)
    kinds = sorted((e["kind"], e["name"]) for e in first["published"])
    assert kinds == [("image", "hello"), ("os", "tiny")]

    entries = await _entries(data)
    assert [(k, n) for k, n, _, _ in entries] == [("image", "hello"), ("os", "tiny")]
    image_entry = next(e for e in entries if e[0] == "image")
    os_entry = next(e for e in entries if e[0] == "os")
    assert set(os_entry[3]) == {"kernel", "initrd", "root"}
    # Every blob an entry names is in this node's chunk store, ready to be served to workers.
    async with ChunkStore.open(data / "chunks") as store:
        held = {info.blob_id for info in await BlobStore(store).ls() if info.complete}
    for _, _, _, blobs in entries:
        assert {parse_blob_id(b) for b in blobs.values()} <= held
    assert image_entry[3]["manifest"] == first["manifest_blob"]

    # Publishing the same build again adds nothing: the same entries come back.
    assert await trio.to_thread.run_sync(main, argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in again["published"]] == [e["id"] for e in first["published"]]
    assert await _entries(data) == entries


def test_bad_task_file_is_refused_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "bad.toml"
    task.write_text('name = "x"\nos = "tiny"\ncommand = 42\n')
    code = main(["image", "build", str(task), "--data", str(tmp_path / "d"), "--publish"])
    assert code == 2
    assert "bad.toml:3" in capsys.readouterr().err


def test_a_task_file_naming_a_ready_image_has_nothing_to_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "ready.toml"
    task.write_text('name = "x"\nimage = "hello"\ncommand = "true"\n')
    assert main(["image", "build", str(task), "--data", str(tmp_path / "d")]) == 2
    assert "nothing to build" in capsys.readouterr().err
