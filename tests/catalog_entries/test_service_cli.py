"""The catalog's RPC methods behind a real RPC server, and ``vmlend catalog`` against them."""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog.cli import add_catalog_parser
from catalog.entries import decode_entry
from catalog.service import open_catalog
from node.errors import RpcError
from node.identity import Identity
from node.rpc_client import AsyncClient
from node.rpc_server import RpcServer
from tests.catalog_entries.helpers import (
    NOW,
    OTHER_PUBLISHER,
    PUBLISHER,
    blob,
    os_entry,
    package_entry,
    tampered,
)

NODE = Identity.generate()  # the node's own key signs entries published by fields


@pytest.fixture
async def node_dir(tmp_path: Path) -> AsyncIterator[Path]:
    # As the daemon opens it: the configured publishers, plus the node's own key.
    async with (
        open_catalog(tmp_path, NODE, [PUBLISHER.public_bytes], wall_clock=lambda: NOW) as service,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RpcServer(tmp_path / "rpc.sock", service.rpc_methods()).run)
        await service.library.insert_many([os_entry("debian-12"), package_entry("python3")])
        yield tmp_path
        nursery.cancel_scope.cancel()


async def call(node_dir: Path, method: str, *params: Any) -> Any:
    async with AsyncClient.connect(node_dir) as client:
        return await client.call(method, *params)


async def test_list_and_show(node_dir: Path) -> None:
    listed = await call(node_dir, "catalog.list")
    assert [(e["kind"], e["name"]) for e in listed] == [("os", "debian-12"), ("package", "python3")]
    only = await call(node_dir, "catalog.list", {"kind": "package"})
    assert [e["name"] for e in only] == ["python3"]
    shown = await call(node_dir, "catalog.show", "debian-12")
    assert shown == os_entry("debian-12").to_dict()
    assert (await call(node_dir, "catalog.show", shown["id"][:12]))["name"] == "debian-12"
    with pytest.raises(RpcError, match="not_found"):
        await call(node_dir, "catalog.show", "debian-13")
    with pytest.raises(RpcError, match="invalid_params"):
        await call(node_dir, "catalog.list", {"kind": "vm"})


async def test_publish_signed_bytes_or_fields(node_dir: Path) -> None:
    entry = package_entry("curl")
    reply = await call(node_dir, "catalog.publish", {"entry": entry.encode()})
    assert reply["id"] == entry.id
    assert reply["new"] is True
    again = await call(node_dir, "catalog.publish", {"entry": entry.encode()})
    assert again["new"] is False
    fields = {"kind": "task", "name": "hello", "version": "1", "blobs": {}, "meta": {"cmd": "x"}}
    mine = await call(node_dir, "catalog.publish", fields)
    assert mine["entry"]["publisher"] == NODE.public_bytes.hex()
    assert mine["entry"]["created_at"] == int(NOW)


async def test_wait_returns_when_the_entry_arrives_or_times_out(node_dir: Path) -> None:
    entry = package_entry("late")
    async with AsyncClient.connect(node_dir) as client, trio.open_nursery() as nursery:
        got: list[Any] = []

        async def waiter() -> None:
            got.append(await client.call("catalog.wait", entry.id, {"timeout": 10}))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        await call(node_dir, "catalog.publish", {"entry": entry.encode()})
    assert got[0]["id"] == entry.id
    with pytest.raises(RpcError, match="timeout"):
        await call(node_dir, "catalog.wait", "0" * 64, {"timeout": 0.05})
    with pytest.raises(RpcError, match="invalid_params"):
        await call(node_dir, "catalog.wait", "late")


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        ({"entry": tampered(os_entry(), version="2").encode()}, "forged_entry", "does not verify"),
        (
            {"entry": os_entry(identity=OTHER_PUBLISHER).encode()},
            "untrusted_publisher",
            f"publisher {OTHER_PUBLISHER.public_bytes.hex()} is not trusted by this scheduler",
        ),
        ({"entry": b"\x92\xc4\x00"}, "invalid_entry", "malformed"),
        ({"kind": "os", "name": "x", "version": "1", "blobs": {}}, "invalid_entry", "lacks blob"),
        ({"kind": "os", "name": "x"}, "invalid_params", "missing fields"),
    ],
)
async def test_publish_refuses_with_a_reason(
    node_dir: Path, request_: dict[str, Any], code: str, message: str
) -> None:
    with pytest.raises(RpcError, match=message) as caught:
        await call(node_dir, "catalog.publish", request_)
    assert caught.value.code == code
    assert len(await call(node_dir, "catalog.list")) == 2


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vmlend")
    add_catalog_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


async def test_the_cli_lists_shows_and_publishes(
    node_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data", str(node_dir)]

    errors: list[str] = []

    async def cli(*argv: str) -> tuple[int, str]:
        code = await trio.to_thread.run_sync(lambda: run_cli(*argv))
        captured = capsys.readouterr()
        errors.append(captured.err)
        return code, captured.out

    code, out = await cli("catalog", "ls", *data)
    assert code == 0
    assert out.splitlines()[0].split() == ["KIND", "NAME", "VERSION", "ID", "PUBLISHER", "CREATED"]
    assert "debian-12" in out
    assert "python3" in out
    code, out = await cli("catalog", "ls", "--kind", "os", "--json", *data)
    assert [e["name"] for e in json.loads(out)] == ["debian-12"]
    code, out = await cli("catalog", "show", "python3", *data)
    assert f"blob:      layer {blob('python31.0')}" in out
    assert 'meta:      depends = ["libc6"]' in out

    args = ["catalog", "publish", "package", "--name", "jq", "--version", "1.6"]
    args += ["--blob", f"layer={blob('jq').upper()}", "--meta", 'os="debian-12"', "--json"]
    code, out = await cli(*args, *data)
    published = json.loads(out)
    assert published["entry"]["blobs"] == {"layer": blob("jq")}
    assert published["entry"]["meta"] == {"os": "debian-12"}

    signed = tmp_path / "entry.bin"
    signed.write_bytes(package_entry("git").encode())
    code, out = await cli("catalog", "publish", "--entry", str(signed), *data)
    assert out.strip() == f"{package_entry('git').id} (published)"
    assert decode_entry(signed.read_bytes()).name == "git"

    code, _ = await cli("catalog", "publish", "package", "--name", "x", *data)
    assert code == 2
    assert "--version" in errors[-1]
