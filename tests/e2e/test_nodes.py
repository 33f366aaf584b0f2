"""Real ``vmlend node start`` processes on loopback: discovery, records, failure, restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.localnet import LocalNode, local_network

pytestmark = pytest.mark.e2e

NODES = 5


async def test_five_nodes_discover_each_other_and_find_a_scheduler(tmp_path: Path) -> None:
    roles = [("worker", "scheduler")] + [("worker", "owner")] * (NODES - 1)
    async with local_network(tmp_path, NODES, roles=roles) as nodes:
        ids = {n.peer_id for n in nodes}
        assert len(ids) == NODES
        for n in nodes:
            peers = await n.call("peers.wait", {"count": NODES - 1, "timeout": 60})
            assert {p["peer_id"] for p in peers} == ids - {n.peer_id}
        for n in nodes:
            found = await n.call("schedulers.wait", {"count": 1, "timeout": 60})
            assert [s["peer_id"] for s in found] == [nodes[0].peer_id]
            assert found[0]["addrs"]
        info = await nodes[0].call("node.info")
        assert info["peer_id"] == nodes[0].peer_id
        assert info["name"] == ""  # node.name's default
        assert info["lending_problem"] is None  # this machine can run VMs
        assert sorted(info["roles"]) == ["scheduler", "worker"]
        assert all(a.endswith(f"/p2p/{nodes[0].peer_id}") for a in info["addrs"])
    for n in nodes:
        assert n.process is not None
        assert n.process.returncode == 0, n.output[-10:]


async def test_killed_node_leaves_peer_lists_and_restart_keeps_peer_id(tmp_path: Path) -> None:
    async with local_network(tmp_path, 3) as nodes:
        for n in nodes:
            await n.call("peers.wait", {"count": 2, "timeout": 60})
        victim = nodes[2]
        old_id = victim.peer_id
        assert await victim.kill() != 0
        # The heartbeat window (peer_timeout, 6 s by default) bounds how long a dead peer lingers.
        with trio.fail_after(15):
            for n in nodes[:2]:
                await n.call("peers.wait", {"absent": old_id, "timeout": 15})
        async with trio.open_nursery() as nursery:
            restarted = LocalNode("again", victim.data_dir, victim.roles, nodes[0].addrs[:1])
            await restarted.start(nursery)
            assert restarted.peer_id == old_id
            await nodes[0].call("peers.wait", {"count": 2, "timeout": 60})
            assert await restarted.stop() == 0
            nursery.cancel_scope.cancel()


async def test_worker_that_cannot_run_vms_keeps_the_node_up_and_says_why(tmp_path: Path) -> None:
    # No tiny OS where this node looks for one: the worker role cannot lend, the node still runs.
    empty = tmp_path / "no-tiny-os"
    empty.mkdir()
    async with trio.open_nursery() as nursery:
        node = LocalNode("no-vms", tmp_path / "n", ("worker", "owner"))
        node.env["VMLEND_DATA_DIR"] = str(empty)
        await node.start(nursery)
        with trio.fail_after(30):
            info = await node.call("node.info")
        assert "tiny OS" in info["lending_problem"], info
        assert sorted(info["roles"]) == ["owner", "worker"]
        assert await node.stop() == 0
        assert any("not lending" in line for line in node.output), node.output[-5:]
        nursery.cancel_scope.cancel()
