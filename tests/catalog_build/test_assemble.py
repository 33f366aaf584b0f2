"""Image assembly on the tiny OS: deterministic across directories, reuse, errors, manifests."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import msgpack
import pytest

from catalog.blob import BlobStore, parse_blob_id
from catalog.build import (
    AssembledImage,
    Assembler,
    BootFiles,
    BuildCache,
    image_draft,
    os_draft,
    package_draft,
)
from catalog.build.cli import main as cli_main
from catalog.build.packages import merge_usr
from catalog.caps import Caps
from catalog.chunk_store import ChunkStore
from catalog.entries import check_signature, decode_entry
from catalog.errors import (
    BuildError,
    ImageManifestError,
    InvalidEntryError,
    PackageError,
    TaskInputError,
    UnknownOsError,
)
from catalog.manifest import ImageManifest, LayerRef
from catalog.taskfile import load, loads
from node.identity import Identity
from tests.catalog_build.conftest import write_task

TASK = """
name = "det"
os = "tiny"
packages = ["./tools"]
files = ["main.sh", "data"]
command = ["sh", "main.sh"]
env = { B = "2", A = "1" }

[resources]
memory = "64MiB"
"""
FILES = {
    "main.sh": "echo main\n",
    "data/a.txt": "a\n",
    "data/deep/b.txt": "b\n",
    "tools/usr/bin/hello": "#!/bin/sh\necho hello\n",
}


async def assemble(path: Path, root: Path, boot: BootFiles) -> tuple[Assembler, AssembledImage]:
    async with ChunkStore.open(root / "chunks") as store:
        assembler = Assembler(BuildCache(root / "cache"), BlobStore(store), boot)
        image = await assembler.assemble(load(path))
    return assembler, image


async def test_same_task_in_two_directories_gives_the_same_image(
    tmp_path: Path, boot: BootFiles
) -> None:
    one = write_task(tmp_path / "one", TASK, FILES)
    two = write_task(tmp_path / "elsewhere/two", TASK, FILES)
    # Nothing about the copy but its content may matter: times and modes of dirs differ.
    os.utime(two.parent / "main.sh", (1, 1))
    (two.parent / "data").chmod(0o700)
    _, a = await assemble(one, tmp_path / "build-a", boot)
    _, b = await assemble(two, tmp_path / "build-b", boot)
    assert a.image_id == b.image_id
    assert a.manifest.encode() == b.manifest.encode()
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.path != lb.path
        assert la.path.read_bytes() == lb.path.read_bytes()
    m = a.manifest
    assert [x.what for x in m.layers] == ["task det", "directory tools", "os tiny"]
    assert m.command == ("sh", "main.sh")
    assert m.env == (("A", "1"), ("B", "2"))
    assert m.cwd == "/task"
    assert m.caps.memory_mib == 64
    assert ImageManifest.decode(m.encode(), expected_id=a.image_id) == m

    # Another task with the same files and tools dir: reusing the layers "det" built must give
    # the image a fresh cache gives (layer names come from the task, not the cache).
    three = write_task(tmp_path / "three", TASK.replace('"det"', '"other"'), FILES)
    (three.parent / "tools").rename(three.parent / "bin-tools")
    three.write_text(TASK.replace('"det"', '"other"').replace("./tools", "./bin-tools"))
    _, c = await assemble(three, tmp_path / "build-a", boot)
    _, d = await assemble(three, tmp_path / "build-c", boot)
    assert [x.reused for x in c.layers] == [True, True, True]
    assert [x.what for x in c.manifest.layers] == ["task other", "directory bin-tools", "os tiny"]
    assert c.image_id == d.image_id


async def test_reuse_of_images_and_layers(tmp_path: Path, boot: BootFiles) -> None:
    path = write_task(tmp_path / "t", TASK, FILES)
    root = tmp_path / "build"
    _, first = await assemble(path, root, boot)
    assert not first.reused
    _, again = await assemble(path, root, boot)
    assert again.reused
    assert again.image_id == first.image_id
    assert all(x.reused for x in again.layers)
    assert [x.meta for x in again.layers] == [x.meta for x in first.layers]

    # A new command: a new image, every layer reused.
    path.write_text(TASK.replace('["sh", "main.sh"]', '["sh", "-c", "ls"]'))
    _, cmd = await assemble(path, root, boot)
    assert cmd.image_id != first.image_id
    assert not cmd.reused
    assert [x.reused for x in cmd.layers] == [True, True, True]

    # A changed file: only the task layer is built again.
    (path.parent / "data/a.txt").write_text("changed\n")
    _, changed = await assemble(path, root, boot)
    assert [x.reused for x in changed.layers] == [False, True, True]

    # Another data dir with the same cache: the image is reused and its blobs land in the new
    # store.
    async with ChunkStore.open(tmp_path / "other-chunks") as store:
        blobs = BlobStore(store)
        image = await Assembler(BuildCache(root / "cache"), blobs, boot).assemble(load(path))
        assert image.reused
        for ref in image.manifest.layers:
            assert not await blobs.missing(parse_blob_id(ref.blob))


async def test_errors(tmp_path: Path, boot: BootFiles) -> None:
    root = tmp_path / "build"
    async with ChunkStore.open(root / "chunks") as store:
        assembler = Assembler(BuildCache(root / "cache"), BlobStore(store), boot)
        with pytest.raises(UnknownOsError, match="unknown OS 'plan9'"):
            await assembler.assemble(loads('name="t"\nos="plan9"\ncommand="x"\n'))
        with pytest.raises(PackageError, match="need a Debian OS"):
            await assembler.assemble(
                loads('name="t"\nos="tiny"\npackages=["python3"]\ncommand="x"\n')
            )
        task_dir = tmp_path / "t"
        path = write_task(
            task_dir,
            'name="t"\nos="tiny"\nfiles=["gone.txt"]\ncommand="x"\n',
            {"gone.txt": "soon gone"},
        )
        task = load(path)
        (task_dir / "gone.txt").unlink()
        with pytest.raises(TaskInputError, match=r"gone\.txt"):
            await assembler.assemble(task)


def test_manifest_refuses_tampered_and_non_canonical_bytes() -> None:
    m = ImageManifest(
        os="tiny",
        os_version="x",
        kernel="a" * 64,
        initramfs="b" * 64,
        cmdline="console=ttyS0",
        layers=(LayerRef(blob="c" * 64, what="os tiny"),),
        caps=Caps(),
        command=("true",),
        env=(),
        cwd="/",
        timeout_s=5,
    )
    data = m.encode()
    assert ImageManifest.decode(data, expected_id=m.id) == m
    with pytest.raises(ImageManifestError, match="do not hash"):
        ImageManifest.decode(data.replace(b"console", b"CONSOLE"), expected_id=m.id)
    reordered = msgpack.packb(dict(reversed(list(msgpack.unpackb(data).items()))))
    with pytest.raises(ImageManifestError, match="canonical"):
        ImageManifest.decode(reordered)
    with pytest.raises(ImageManifestError, match="not a blob ID"):
        dataclasses.replace(m, kernel="zz")
    with pytest.raises(ImageManifestError, match="sorted"):
        dataclasses.replace(m, env=(("B", "1"), ("A", "2")))


def test_merge_usr_moves_top_dirs_under_usr(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/tool").write_text("x")
    (tmp_path / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "lib/x86_64-linux-gnu/libz.so").write_text("z")
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr/lib/x86_64-linux-gnu/liby.so").write_text("y")
    merge_usr(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["usr"]
    assert (tmp_path / "usr/bin/tool").read_text() == "x"
    assert sorted(os.listdir(tmp_path / "usr/lib/x86_64-linux-gnu")) == ["liby.so", "libz.so"]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/tool").write_text("again")
    with pytest.raises(BuildError, match="merged /usr"):
        merge_usr(tmp_path)


def test_cli_builds_prints_reuse_and_refuses_bad_files(
    tmp_path: Path, boot: BootFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_task(tmp_path / "t", TASK, FILES)
    args = [
        "image",
        "build",
        str(path),
        "--data",
        str(tmp_path / "data"),
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert cli_main([*args, "--json"], boot=lambda: boot) == 0
    first = json.loads(capsys.readouterr().out)
    assert not first["reused"]
    assert [x["reused"] for x in first["layers"]] == [False, False, False]
    assert cli_main(args, boot=lambda: boot) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"image {first['image_id']} (reused)\n")
    assert "  reused " in out
    assert "task det" in out
    path.write_text(TASK + '\n[limits]\nmax_runtime = "forever"\n')
    assert cli_main(args, boot=lambda: boot) == 2
    err = capsys.readouterr().err
    assert f"{path}:13: limits.max_runtime: not a duration" in err
    shutil.rmtree(tmp_path / "t")


async def test_built_parts_become_signed_entries(tmp_path: Path, boot: BootFiles) -> None:
    path = write_task(tmp_path / "t", TASK, FILES)
    assembler, image = await assemble(path, tmp_path / "build", boot)
    m = image.manifest
    os_build = await assembler.build_os("tiny")
    me = Identity.generate()
    drafts = [
        os_draft(os_build, kernel=m.kernel, initrd=m.initramfs, root=m.layers[-1].blob),
        package_draft(image.layers[1], ["tools"], blob=m.layers[1].blob),
        image_draft(image, "det"),
    ]
    for draft in drafts:
        entry = draft.sign(me, now=1_700_000_000)
        again = decode_entry(entry.encode())
        check_signature(again)
        assert again.id == entry.id
        assert (again.kind, again.name) == (draft.kind, draft.name)
    assert drafts[2].meta["image_id"] == image.image_id
    assert drafts[2].blobs == {"manifest": image.manifest_blob}
    with pytest.raises(InvalidEntryError, match="image_id"):
        dataclasses.replace(drafts[2], meta={"image_id": "nope"}).sign(me, now=0)
