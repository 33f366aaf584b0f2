"""``vmlend image build --publish`` with a node running: built inside it, entries in its catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, vmlend_command

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).parents[2] / "examples"


async def test_image_build_goes_through_the_running_node_and_publishes(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        node = LocalNode("builder", tmp_path / "node", ("scheduler",))
        await node.start(nursery)
        cmd = [*vmlend_command(), "image", "build", str(EXAMPLES / "hello.toml")]
        cmd += ["--data", str(node.data_dir), "--publish", "--json"]
        with trio.fail_after(120):
            done = await trio.run_process(
                cmd, capture_stdout=True, capture_stderr=True, check=False
            )
        assert done.returncode == 0, done.stderr.decode()
        summary = json.loads(done.stdout)
        published = {(e["kind"], e["name"]): e["id"] for e in summary["published"]}
        assert set(published) == {("os", "tiny"), ("image", "hello")}
        with trio.fail_after(30):
            listed = await node.call("catalog.list")
        ids = {e["id"] for e in listed}
        assert set(published.values()) <= ids
        blobs = {b["id"] for b in await node.call("blob.ls")}
        assert summary["manifest_blob"] in blobs
        assert await node.stop() == 0
        nursery.cancel_scope.cancel()
