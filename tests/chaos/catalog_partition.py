"""Schedulers cut apart and healed: how long until their catalogs agree again.

Three real scheduler nodes, each on its own host of the network lab, trust one publisher. A round
cuts one scheduler off (its cable pulled, :meth:`Lab.cut`) for longer than the peer timeout, so
each side declares the other dead; while cut, an entry is published on each side; then the cable
goes back and the round measures, from that moment, when every scheduler holds both entries
(``catalog.wait`` returns the moment an entry lands). During the cut it also asks a scheduler on
the healthy side to list the schedulers, which must answer within its timeout.

Used by ``tests/chaos/test_catalog_partition.py`` (one round) and ``bench/chaos.py`` (several).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from catalog.entries import Entry, make_entry
from node.identity import Identity
from node.localnet import stop_all
from tests.netlab.lab import Lab, NetNode
from tests.netlab.topology import HostSpec, Topology

PORT = 4100
SCHEDULERS = ("s0", "s1", "s2")
CONVERGE_BOUND = 120.0  # a round whose catalogs never agree fails after this, not hangs


@dataclass(frozen=True)
class RoundReport:
    cut: str
    held_s: float
    listing_during_cut_s: float  # how long the healthy side took to list the schedulers
    listed_during_cut: int  # how many it listed (the cut one may be there, marked stale)
    converged_after_s: float  # from the mend to the last entry landing on the last scheduler
    each_after_s: dict[str, float]  # per scheduler, when it held the other side's entry


def topology() -> Topology:
    return Topology("catalog", public=tuple(HostSpec(h) for h in SCHEDULERS))


def _entry(publisher: Identity, tag: str) -> Entry:
    blob = (tag.encode().hex() * 64)[:64]  # any 64 hex digits stand for a blob ID
    return make_entry(
        publisher, kind="package", name=f"chaos-{tag}", version="1", blobs={"layer": blob},
        meta={"os": "tiny"}, now=time.time(),
    )  # fmt: skip


class CatalogPartition:
    def __init__(self, lab: Lab, base: Path) -> None:
        self.lab, self.base = lab, base
        self.publisher = Identity.generate()
        self.nodes = [self._node(name) for name in SCHEDULERS]

    def _node(self, host: str) -> NetNode:
        data = self.base / host
        data.mkdir(parents=True, exist_ok=True)
        (data / "node.toml").write_text(
            f'[catalog]\ntrusted_publishers = ["{self.publisher.public_bytes.hex()}"]\n'
        )
        return self.lab.node(host, data, ("scheduler",), port=PORT)

    async def run(self, rounds: int, hold: float) -> list[RoundReport]:
        async with trio.open_nursery() as nursery:
            try:
                return await self._run(nursery, rounds, hold)
            finally:
                with trio.CancelScope(shield=True):
                    for node in self.nodes:
                        await self.lab.mend(node.name)
                    await stop_all(self.nodes)
                nursery.cancel_scope.cancel()

    async def _run(self, nursery: trio.Nursery, rounds: int, hold: float) -> list[RoundReport]:
        first = self.nodes[0]
        await first.start(nursery)
        for node in self.nodes[1:]:
            node.bootstrap = first.addrs[:1]
            await node.start(nursery)
        with trio.fail_after(60):
            for node in self.nodes:
                await node.call("peers.wait", {"count": len(self.nodes) - 1, "timeout": 60})
        return [
            await self._round(n, self.nodes[-1 - n % len(self.nodes)], hold) for n in range(rounds)
        ]

    async def _round(self, n: int, cut: NetNode, hold: float) -> RoundReport:
        healthy = [node for node in self.nodes if node is not cut]
        inside, outside = _entry(self.publisher, f"{n}in"), _entry(self.publisher, f"{n}out")
        await self.lab.cut(cut.name)
        cut_at = trio.current_time()
        await cut.call("catalog.publish", {"entry": inside.encode()})
        await healthy[0].call("catalog.publish", {"entry": outside.encode()})
        asked = trio.current_time()
        listed = await healthy[1].call("schedulers.list")
        listing_s = trio.current_time() - asked
        await trio.sleep(max(0.0, cut_at + hold - trio.current_time()))
        await self.lab.mend(cut.name)
        mended = trio.current_time()
        each: dict[str, float] = {}

        async def until_held(node: NetNode, entry: Entry) -> None:
            await node.call("catalog.wait", entry.id, {"timeout": CONVERGE_BOUND})
            each[node.name] = round(trio.current_time() - mended, 3)

        with trio.fail_after(CONVERGE_BOUND + 10):
            async with trio.open_nursery() as waits:
                waits.start_soon(until_held, cut, outside)
                for node in healthy:
                    waits.start_soon(until_held, node, inside)
        return RoundReport(
            cut=cut.name,
            held_s=round(mended - cut_at, 3),
            listing_during_cut_s=round(listing_s, 3),
            listed_during_cut=len(listed),
            converged_after_s=max(each.values()),
            each_after_s=each,
        )


def as_dicts(reports: list[RoundReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]


async def run_catalog_partition(
    prefix: str, base: Path, *, rounds: int, hold: float
) -> list[RoundReport]:
    """Build the lab under ``prefix``, run ``rounds`` cuts of ``hold`` seconds, tear it down."""
    async with Lab(topology(), prefix, base / "lab") as lab:
        return await CatalogPartition(lab, base).run(rounds, hold)
