"""Blobs between real ``vmlend node start`` processes: the CLI end to end, and a fetching node
killed mid-transfer that resumes after its restart."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import trio

from catalog.blob import BlobStore
from catalog.blob_service import BlobService
from catalog.chunk_store import ChunkStore
from catalog.chunking import KIB, ChunkId, ChunkParams
from node.errors import NetworkError, RpcError
from node.identity import Identity
from node.localnet import LocalNode, local_network, vmlend_command
from node.p2p import P2PNode
from tests.catalog.conftest import random_bytes

pytestmark = pytest.mark.e2e

MIB = 1 << 20


async def vmlend(*args: str) -> tuple[int, str, str]:
    done = await trio.run_process(
        [*vmlend_command(), *args], capture_stdout=True, capture_stderr=True, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_blob_cli_between_real_nodes(tmp_path: Path) -> None:
    data = random_bytes(3 * MIB, 1)
    (tmp_path / "in.bin").write_bytes(data)
    async with local_network(tmp_path, 2) as (me, provider):
        code, out, err = await vmlend(
            "blob", "add", str(tmp_path / "in.bin"), "--data", str(provider.data_dir)
        )
        assert code == 0, err
        blob_id = out.strip()
        assert len(blob_id) == 64
        target = tmp_path / "out.bin"
        code, out, err = await vmlend(
            "blob", "get", blob_id, "-o", str(target), "--from", provider.addrs[0],
            "--data", str(me.data_dir), "--json",
        )  # fmt: skip
        assert code == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        assert events[-1]["event"] == "done"
        assert events[-1]["bytes_fetched"] == len(data)
        assert any(e["event"] == "progress" for e in events)
        assert target.read_bytes() == data
        code, out, err = await vmlend("blob", "ls", "--json", "--data", str(me.data_dir))
        [listed] = json.loads(out)
        assert listed["id"] == blob_id
        assert listed["complete"] is True
        # Found through the DHT this time (the provider announced it); nothing left to move.
        again = await me.call("blob.get", blob_id, {"out": str(tmp_path / "again.bin")})
        assert again["bytes_fetched"] == 0
        # Held here, it is named by the start of its ID too.
        code, out, err = await vmlend(
            "blob",
            "get",
            blob_id[:8],
            "-o",
            str(tmp_path / "short.bin"),
            "--data",
            str(me.data_dir),
        )
        assert code == 0, err
        assert (tmp_path / "short.bin").read_bytes() == data
        assert await me.call("blob.providers", blob_id) == [provider.peer_id]
        code, out, err = await vmlend("blob", "rm", blob_id, "--data", str(me.data_dir))
        assert code == 0, err
        code, out, err = await vmlend("blob", "gc", "--json", "--data", str(me.data_dir))
        assert json.loads(out)["bytes_freed"] == len(data)
        code, out, err = await vmlend(
            "blob", "get", "00" * 32, "-o", str(tmp_path / "x"), "--from", provider.addrs[0],
            "--data", str(me.data_dir),
        )  # fmt: skip
        assert code == 1
        assert "does not hold it" in err
        code, out, err = await vmlend("blob", "rm", "nope", "--data", str(me.data_dir))
        assert code == 1
        assert "not a blob ID" in err
        code, out, err = await vmlend("blob", "rm", "abcd", "--data", str(me.data_dir))
        assert code == 1
        assert "no blob here starts with 'abcd' (one held elsewhere needs its whole ID)" in err


class GatedStore(ChunkStore):
    """Serves ``allowed`` chunks, then holds every further read until ``gate`` is set, on both
    serving paths (libp2p streams read with ``get``, the data channel sends ``open_file_sync``)."""

    allowed = 1 << 30
    served = 0
    gate: trio.Event

    async def _turn(self) -> None:
        if self.served >= self.allowed:
            await self.gate.wait()
        self.served += 1

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        await self._turn()
        return await super().get(chunk_id, verify=verify)

    def open_file_sync(self, chunk_id: ChunkId) -> tuple[int, int]:
        trio.from_thread.run(self._turn)  # called in the data channel's thread
        return super().open_file_sync(chunk_id)


async def test_fetching_node_killed_mid_transfer_resumes_after_restart(tmp_path: Path) -> None:
    data = random_bytes(4 * MIB, 2)
    (tmp_path / "in.bin").write_bytes(data)
    params = ChunkParams(min_size=16 * KIB, avg_size=64 * KIB, max_size=256 * KIB)
    async with (
        GatedStore.open(tmp_path / "provider") as store,
        trio.open_nursery() as nursery,
    ):
        assert isinstance(store, GatedStore)
        p2p = P2PNode(Identity.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
        await nursery.start(p2p.run)
        provider = BlobService(p2p, BlobStore(store, params=params))
        await nursery.start(provider.run)
        raw_id = await provider.add(tmp_path / "in.bin")
        blob_id = raw_id.hex()
        chunk_count = len((await provider.blobs.manifest(raw_id)).chunks)
        store.allowed, store.gate = chunk_count // 4, trio.Event()

        me = LocalNode("fetcher", tmp_path / "fetcher", ("worker", "owner"))
        await me.start(nursery)
        options = {"out": str(tmp_path / "out.bin"), "from": [p2p.addrs[0]]}

        async def doomed_get() -> None:
            with contextlib.suppress(NetworkError, RpcError):
                await me.call("blob.get", blob_id, options)

        nursery.start_soon(doomed_get)
        with trio.fail_after(30):  # wait until the chunks served so far are on its disk
            while True:
                listed = await me.call("blob.ls")
                if listed and listed[0]["missing"] <= chunk_count - store.allowed:
                    break
                await trio.sleep(0.05)
        assert await me.kill() != 0
        store.gate.set()

        restarted = LocalNode("fetcher", me.data_dir, me.roles)
        await restarted.start(nursery)
        [listed] = await restarted.call("blob.ls")
        assert listed["complete"] is False
        result = await restarted.call("blob.get", blob_id, options)
        assert 0 < result["bytes_fetched"] < len(data)
        assert result["bytes_present"] + result["bytes_fetched"] == len(data)
        assert (tmp_path / "out.bin").read_bytes() == data
        assert await restarted.stop() == 0
        nursery.cancel_scope.cancel()


async def test_blob_check_quarantines_a_rotted_chunk(tmp_path: Path) -> None:
    data = random_bytes(3 * MIB, 3)
    (tmp_path / "in.bin").write_bytes(data)
    async with local_network(tmp_path, 1) as [node]:
        blob_id = (await node.call("blob.add", str(tmp_path / "in.bin")))["id"]
        code, out, err = await vmlend("blob", "check", "--data", str(node.data_dir))
        assert (code, out.strip()) == (0, "chunk store ok"), err
        victim = next(p for p in (node.data_dir / "chunks").glob("??/*") if p.is_file())
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0xFF
        victim.write_bytes(bytes(raw))
        code, out, err = await vmlend("blob", "check", "--data", str(node.data_dir), "--json")
        assert code == 1, err
        report = json.loads(out)
        assert report["corrupt"] == [victim.name]
        [listed] = await node.call("blob.ls")
        assert (listed["id"], listed["complete"], listed["missing"]) == (blob_id, False, 1)
        code, out, err = await vmlend("blob", "check", "--data", str(node.data_dir))
        assert code == 0, err  # quarantined: nothing corrupt is left in the store
