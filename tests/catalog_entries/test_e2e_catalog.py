"""Real ``vmlend node start`` schedulers: publish with the CLI, replicate, catch up after a stop."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from node.dht_records import public_key_of
from node.localnet import LocalNode, vmlend_command
from tests.catalog_entries.helpers import PUBLISHER, os_entry, package_entry

pytestmark = pytest.mark.e2e

ROLES = ("worker", "scheduler")


def trusting_data_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "node.toml").write_text(
        f'[catalog]\ntrusted_publishers = ["{PUBLISHER.public_bytes.hex()}"]\n'
    )
    return path


def vmlend(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*vmlend_command(), *argv], capture_output=True, text=True, timeout=60, check=False
    )


async def test_three_schedulers_publish_replicate_and_catch_up(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        nodes: list[LocalNode] = []
        for i in range(3):
            boot = nodes[0].addrs[:1] if nodes else ()
            node = LocalNode(f"s{i}", trusting_data_dir(tmp_path / f"s{i}"), ROLES, boot)
            nodes.append(node)
            await node.start(nursery)
        with trio.fail_after(60):
            for node in nodes:
                await node.call("peers.wait", {"count": 2, "timeout": 60})

        signed = tmp_path / "entry.bin"
        entry = os_entry("debian-12")
        signed.write_bytes(entry.encode())
        published = await trio.to_thread.run_sync(
            vmlend, "catalog", "publish", "--entry", str(signed), "--data", str(nodes[0].data_dir)
        )
        assert published.returncode == 0, published.stderr
        assert published.stdout.split()[0] == entry.id
        with trio.fail_after(10):
            for node in nodes[1:]:
                await node.call("catalog.wait", entry.id, {"timeout": 10})

        # The node's own key signs a publish by fields; others do not trust that key.
        blob_id = "ab" * 32
        own = await nodes[0].call(
            "catalog.publish",
            {"kind": "package", "name": "mine", "version": "1", "blobs": {"layer": blob_id}},
        )
        assert own["new"] is True

        stopped = nodes[2]
        assert await stopped.stop() == 0
        later = package_entry("python3")
        await nodes[1].call("catalog.publish", {"entry": later.encode()})
        await stopped.start(nursery)
        with trio.fail_after(30):
            await stopped.call("catalog.wait", later.id, {"timeout": 30})

        listed = await trio.to_thread.run_sync(
            vmlend, "catalog", "ls", "--json", "--data", str(stopped.data_dir)
        )
        assert listed.returncode == 0, listed.stderr
        ids = {e["id"] for e in json.loads(listed.stdout)}
        assert {entry.id, later.id} <= ids
        assert own["id"] not in ids  # signed by node 0's key, which node 2 does not trust
        for node in nodes:
            assert await node.stop() == 0
        nursery.cancel_scope.cancel()


async def test_a_fresh_scheduler_lists_the_os_it_builds(tmp_path: Path) -> None:
    """Issue 18, item 8: tasks with os = "tiny" run on a fresh scheduler, so its OS library
    says so from the start (signed by the scheduler's own key)."""
    async with trio.open_nursery() as nursery:
        node = LocalNode("s", tmp_path / "s", ("scheduler",), ())
        await node.start(nursery)
        with trio.fail_after(60):
            while not (oses := await node.call("catalog.list", {"kind": "os"})):  # noqa: ASYNC110
                await trio.sleep(0.2)
        assert [(e["name"], e["kind"]) for e in oses] == [("tiny", "os")]
        assert set(oses[0]["blobs"]) == {"kernel", "initrd", "root"}
        assert oses[0]["publisher"] == public_key_of(node.peer_id).hex()
        shown = await trio.to_thread.run_sync(
            vmlend, "catalog", "show", "tiny", "--data", str(node.data_dir)
        )
        assert shown.returncode == 0, shown.stderr
        assert "name:      tiny" in shown.stdout
        assert await node.stop() == 0
        nursery.cancel_scope.cancel()
