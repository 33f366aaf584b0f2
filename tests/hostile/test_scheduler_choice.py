"""A ground scheduler key against a real owner (issue 14, "scheduler capture"): two real
schedulers (libp2p hosts, chunk stores, sqlite queues) publish real signed records, one of them
under a key ground to sort first by peer ID, which took every default submission when the owner
picked the first by peer ID. A whole owner node (as ``vmlend node start`` composes it) that
trusts the other one submits there, and ``vmlend schedulers`` says which is trusted and which
is the default. An owner that trusts none submits by its own rule and says so once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog import scheduler_record
from catalog.blob import BlobStore
from catalog.blob_service import BlobService, data_host_for
from catalog.build.os_tiny import BootFiles
from catalog.chunk_store import ChunkStore
from node.cli import main
from node.config import load_config
from node.daemon import Node
from node.dht_records import Record, peer_id_of
from node.identity import Identity
from node.p2p import P2PNode
from node.rpc_client import AsyncClient
from scheduler_role.errors import UnknownTaskError
from scheduler_role.service import SchedulerService
from tests.p2p_helpers import FAST, LOOPBACK

TASK = 'name = "t"\nos = "tiny"\ncommand = "true"\n'
OWNER_LOGGER = "vmlend.owner"
P2P_OPTIONS: dict[str, Any] = dict(FAST)


def _no_boot_files() -> BootFiles:
    # The choice of a scheduler is under test, not the image builder: each task's assembly fails.
    raise OSError("no boot files in these tests")


@dataclass
class RealScheduler:
    p2p: P2PNode
    service: SchedulerService

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id


def ground_identity(below: str, tries: int = 200) -> Identity:
    """The key an attacker grinds: of ``tries`` keys, the one whose peer ID sorts first (it
    sorts before ``below``, the honest scheduler's, or the test says so)."""
    keys = [Identity.generate() for _ in range(tries)]
    ground = min(keys, key=lambda k: peer_id_of(k.public_bytes))
    assert peer_id_of(ground.public_bytes) < below
    return ground


async def start_scheduler(
    stack: AsyncExitStack,
    nursery: trio.Nursery,
    home: Path,
    identity: Identity,
    bootstrap: list[str],
    name: str,
    *,
    advertised: bool = True,
) -> RealScheduler:
    store = await stack.enter_async_context(ChunkStore.open(home / "chunks"))
    p2p = P2PNode(identity, listen=[LOOPBACK], bootstrap=bootstrap, **P2P_OPTIONS)
    await nursery.start(p2p.run)
    blobs = BlobService(p2p, BlobStore(store), data_host=data_host_for(p2p.addrs))
    await nursery.start(blobs.run)
    service = SchedulerService(p2p, blobs, home, boot=_no_boot_files, lease_timeout=5.0)
    await nursery.start(service.run)
    if advertised:
        await advertise(p2p, name)
    return RealScheduler(p2p, service)


async def advertise(p2p: P2PNode, name: str) -> None:
    advert = scheduler_record.SchedulerRecord(
        name=name, peer_id=p2p.peer_id, addrs=tuple(p2p.addrs)
    )
    await p2p.put_record(scheduler_record.KIND, p2p.peer_id, advert.to_payload(), ttl=600)


@dataclass
class Network:
    honest: RealScheduler
    ground: RealScheduler
    nursery: trio.Nursery
    home: Path


@asynccontextmanager
async def two_schedulers(tmp_path: Path, *, honest_advertised: bool) -> AsyncIterator[Network]:
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        honest_key = Identity.generate()
        ground_key = ground_identity(peer_id_of(honest_key.public_bytes))
        honest = await start_scheduler(
            stack, nursery, tmp_path / "honest", honest_key, [], "honest",
            advertised=honest_advertised,
        )  # fmt: skip
        ground = await start_scheduler(
            stack, nursery, tmp_path / "ground", ground_key, honest.p2p.addrs[:1], "ground"
        )
        yield Network(honest, ground, nursery, tmp_path)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[Network]:
    async with two_schedulers(tmp_path, honest_advertised=True) as network:
        yield network


async def start_owner(network: Network, name: str, trusted: list[str], *, seen: int = 2) -> Node:
    """A whole owner node trusting ``trusted``, once it sees ``seen`` schedulers' records."""
    data_dir = network.home / name
    await trio.Path(data_dir).mkdir()
    flags = {
        "node.roles": ["owner"],
        "network.listen": [LOOPBACK],
        "network.bootstrap": network.honest.p2p.addrs[:1],
        "network.trusted_schedulers": trusted,
    }
    node = Node(load_config(data_dir, flags, env={}), data_dir, Identity.generate())
    await network.nursery.start(node.run)
    found = await call(node, "schedulers.wait", {"count": seen, "timeout": 60})
    assert {s["peer_id"] for s in found} <= {network.honest.peer_id, network.ground.peer_id}
    return node


async def call(node: Node, method: str, *params: Any) -> Any:
    with trio.fail_after(60):
        async with AsyncClient.connect(node.data_dir / "rpc.sock") as client:
            return await client.call(method, *params, timeout=None)


async def submit(owner: Node, home: Path) -> dict[str, Any]:
    """Submit :data:`TASK` without naming a scheduler; the answer, once the task is over (its
    assembly fails here), so no scheduler is still busy with it when the test ends."""
    answer: dict[str, Any] = await call(owner, "task.submit", {"text": TASK, "base_dir": str(home)})
    status = await call(owner, "task.wait", {"task_id": answer["task_id"], "timeout": 60})
    assert status["state"] == "failed"
    return answer


async def test_an_owner_trusting_a_scheduler_never_submits_to_a_ground_key(
    network: Network, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, OWNER_LOGGER)
    owner = await start_owner(network, "owner", [network.honest.peer_id])
    for _ in range(3):
        answer = await submit(owner, network.home)
        assert answer["scheduler"] == network.honest.peer_id
        await network.honest.service.queue.status(answer["task_id"])  # it holds the task
        with pytest.raises(UnknownTaskError):
            await network.ground.service.queue.status(answer["task_id"])
    assert not [r for r in caplog.records if r.name == OWNER_LOGGER]  # trusted: nothing to say


async def test_vmlend_schedulers_marks_the_trusted_one_and_the_default(
    network: Network, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = await start_owner(network, "owner", [network.honest.peer_id])
    argv = ["schedulers", "--data", str(owner.data_dir)]
    assert await trio.to_thread.run_sync(main, [*argv, "--json"]) == 0
    listed = {s["peer_id"]: s for s in json.loads(capsys.readouterr().out)}
    assert set(listed) == {network.honest.peer_id, network.ground.peer_id}
    assert listed[network.honest.peer_id]["trusted"] is True
    assert listed[network.honest.peer_id]["default"] is True
    assert listed[network.ground.peer_id]["trusted"] is False
    assert listed[network.ground.peer_id]["default"] is False

    assert await trio.to_thread.run_sync(main, argv) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "PEER", "ID", "TRUSTED", "DEFAULT", "SEEN", "ADDRESSES"]
    cells = {row.split()[1]: row.split() for row in rows}
    assert cells[network.honest.peer_id][:4] == ["honest", network.honest.peer_id, "yes", "yes"]
    assert cells[network.ground.peer_id][:3] == ["ground", network.ground.peer_id, "no"]
    assert cells[network.ground.peer_id][3] == "now"  # no DEFAULT cell, then SEEN
    assert cells[network.honest.peer_id][4] == "now"


async def test_an_owner_trusting_none_submits_by_its_own_rule_and_says_so_once(
    network: Network, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, OWNER_LOGGER)
    owner = await start_owner(network, "owner", [])
    expected = owner.choice.choose([network.honest.peer_id, network.ground.peer_id])
    listed = await call(owner, "schedulers.list")
    assert [s["peer_id"] for s in listed if s["default"]] == [expected]
    for _ in range(2):
        assert (await submit(owner, network.home))["scheduler"] == expected
    warned = [r for r in caplog.records if r.name == OWNER_LOGGER]
    assert len(warned) == 1
    assert warned[0].args == (expected,)
    assert "not in network.trusted_schedulers" in warned[0].getMessage()


async def test_an_owner_waits_for_its_trusted_scheduler_rather_than_take_the_first_found(
    tmp_path: Path,
) -> None:
    # The ground key's record is in the DHT first; the trusted one's appears only once the
    # submission is under way.
    async with two_schedulers(tmp_path, honest_advertised=False) as network:
        owner = await start_owner(network, "owner", [network.honest.peer_id], seen=1)
        looked = trio.Event()
        find_records = owner.p2p.find_records

        async def spy(kind: str, *, timeout: float) -> list[Record]:  # noqa: ASYNC109
            records = await find_records(kind, timeout=timeout)
            looked.set()
            return records

        owner.p2p.find_records = spy  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            answers: list[dict[str, Any]] = []

            async def submit_one() -> None:
                answers.append(await submit(owner, network.home))

            nursery.start_soon(submit_one)
            await looked.wait()  # the owner looked, and found only the ground key
            await advertise(network.honest.p2p, "honest")
        assert answers[0]["scheduler"] == network.honest.peer_id
