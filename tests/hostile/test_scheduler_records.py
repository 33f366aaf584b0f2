"""Hostile scheduler records against real nodes: a peer publishes a correctly signed record of
kind ``scheduler`` whose payload is no scheduler record (empty, addresses of the wrong type, or
naming another peer than its signer) and announces it in the index, over real libp2p hosts on
loopback. Every reader skips it and keeps serving: a real node's ``schedulers.list`` RPC, its
owner's ``task.submit`` (which picks a scheduler from the DHT).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog import scheduler_record
from node.config import load_config
from node.daemon import Node
from node.identity import Identity
from node.p2p import P2PNode
from node.rpc_client import AsyncClient
from tests.hostile.conftest import Scheduler
from tests.p2p_helpers import FAST, LOOPBACK

LOGGER = "vmlend.catalog.scheduler_record"
TASK = 'name = "t"\nos = "tiny"\ncommand = "true"\n'


def hostile_payloads(honest: P2PNode, rogue: P2PNode) -> list[dict[str, Any]]:
    return [
        {},
        {"name": "wrong-type", "peer_id": rogue.peer_id, "addrs": rogue.addrs[0]},
        # Someone else's scheduler, pointing its workers at the rogue's addresses.
        {"name": "impostor", "peer_id": honest.peer_id, "addrs": honest.addrs},
    ]


async def publish_hostile_records(
    nursery: trio.Nursery, honest: P2PNode, count: int = 3
) -> list[P2PNode]:
    """Three peers, each publishing one correctly signed hostile scheduler record."""
    rogues = []
    for i in range(count):
        rogue = P2PNode(Identity.generate(), listen=[LOOPBACK], bootstrap=honest.addrs[:1], **FAST)
        await nursery.start(rogue.run)
        payload = hostile_payloads(honest, rogue)[i]
        await rogue.put_record(scheduler_record.KIND, rogue.peer_id, payload, ttl=600)
        rogues.append(rogue)
    return rogues


async def advertise(p2p: P2PNode, name: str) -> dict[str, Any]:
    advert = scheduler_record.SchedulerRecord(
        name=name, peer_id=p2p.peer_id, addrs=tuple(p2p.addrs)
    )
    await p2p.put_record(scheduler_record.KIND, p2p.peer_id, advert.to_payload(), ttl=600)
    return advert.to_payload()


async def start_daemon(
    nursery: trio.Nursery,
    data_dir: Path,
    bootstrap: list[str],
    roles: list[str],
    *,
    exist_ok: bool = False,
) -> Node:
    """A whole node as ``vmlend node start`` composes it, in this process."""
    await trio.Path(data_dir).mkdir(exist_ok=exist_ok)
    flags = {"node.roles": roles, "network.listen": [LOOPBACK], "network.bootstrap": bootstrap}
    config = load_config(data_dir, flags, env={})
    node = Node(config, data_dir, Identity.generate())
    await nursery.start(node.run)
    return node


@pytest.fixture
async def owner_node(
    scheduler_and_peer: tuple[Scheduler, Any], tmp_path: Path
) -> AsyncIterator[tuple[Scheduler, Node, list[P2PNode], dict[str, Any]]]:
    scheduler, _ = scheduler_and_peer
    async with trio.open_nursery() as nursery:
        honest = await advertise(scheduler.p2p, "honest")
        rogues = await publish_hostile_records(nursery, scheduler.p2p)
        node = await start_daemon(nursery, tmp_path / "owner", scheduler.p2p.addrs[:1], ["owner"])
        # The hostile records are really there for the node to read (a lookup on a loaded
        # machine may come back short: ask again until all are found).
        expected = {scheduler.p2p.peer_id} | {r.peer_id for r in rogues}
        with trio.fail_after(60):
            while {  # noqa: ASYNC110 (records have no change event)
                r.owner for r in await node.p2p.find_records(scheduler_record.KIND, timeout=10)
            } != expected:
                await trio.sleep(0.5)
        yield scheduler, node, rogues, honest
        nursery.cancel_scope.cancel()


async def call(node: Node, method: str, *params: Any) -> Any:
    with trio.fail_after(30):
        async with AsyncClient.connect(node.data_dir / "rpc.sock") as client:
            return await client.call(method, *params, timeout=None)


async def test_the_schedulers_rpc_lists_only_real_schedulers_and_reports_each_rogue_once(
    owner_node: tuple[Scheduler, Node, list[P2PNode], dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    _, node, rogues, honest = owner_node
    for _ in range(3):
        assert await call(node, "schedulers.list") == [
            {**honest, "trusted": False, "default": True, "stale": False}
        ]
    reported = [r for r in caplog.records if r.name == LOGGER]
    assert sorted(r.args[0] for r in reported) == sorted(r.peer_id for r in rogues)  # type: ignore[index]


async def test_an_owner_submits_to_the_real_scheduler_beside_hostile_records(
    owner_node: tuple[Scheduler, Node, list[P2PNode], dict[str, Any]], tmp_path: Path
) -> None:
    scheduler, node, _, _ = owner_node
    for _ in range(2):
        answer = await call(node, "task.submit", {"text": TASK, "base_dir": str(tmp_path)})
        assert answer["scheduler"] == scheduler.p2p.peer_id
